"""Server-side printing: a ``meta.k8s.io/v1`` Table for custom resources, from their CRD's
``additionalPrinterColumns``, so ``kubectl get runs,budgets,reservations,gpuleases -A`` against
the emulator shows the columns a real API server would.

kubectl asks for a Table in its Accept header (``application/json;as=Table;v=v1;g=meta.k8s.io``)
and prints whatever the server returns; without this it falls back to NAME and AGE.  Only the
JSONPath subset printer columns use is evaluated here: ``.a.b``, ``.a[0].b`` and one filter
``.a[?(@.k=="v")].b``.  ``date`` columns become an age ("5m", "3h") as the API server renders
them; absent values are empty cells (kubectl shows ``<none>``).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

Obj = dict[str, Any]

_STEP = re.compile(r'\.([^.\[]+)|\[(\d+)\]|\[\?\(@\.([^=]+)==["\']([^"\']*)["\']\)\]')


def json_path(obj: Any, path: str) -> Any:
    """The value at ``path`` (None when any step is missing)."""
    cur = obj
    pos = 0
    while pos < len(path):
        m = _STEP.match(path, pos)
        if m is None:
            return None
        pos = m.end()
        key, index, fkey, fval = m.groups()
        if key is not None:
            cur = cur.get(key) if isinstance(cur, dict) else None
        elif index is not None:
            i = int(index)
            cur = cur[i] if isinstance(cur, list) and i < len(cur) else None
        else:
            found = [x for x in cur or [] if isinstance(x, dict) and str(x.get(fkey)) == fval]
            cur = found[0] if found else None
        if cur is None:
            return None
    return cur


def age(stamp: str, now: dt.datetime) -> str:
    """``2h``, ``5m``, ``3d`` - as kubectl shows ages."""
    try:
        then = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return stamp
    seconds = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * (2 if unit != "d" else 1):
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def wants_table(accept: str) -> bool:
    return "as=Table" in accept


def columns_of(crd: Obj) -> list[Obj]:
    versions = (crd.get("spec") or {}).get("versions") or []
    served = next((v for v in versions if v.get("storage")), versions[0] if versions else {})
    return list(served.get("additionalPrinterColumns") or [])


def table(items: list[Obj], columns: list[Obj], rv: str, now: dt.datetime, full: bool) -> Obj:
    """The Table kubectl prints: Name first, then the printer columns in their order."""
    defs = [{"name": "Name", "type": "string", "format": "name", "description": "", "priority": 0}]
    defs += [
        {
            "name": c["name"],
            "type": c.get("type", "string"),
            "format": c.get("format", ""),
            "description": c.get("description", ""),
            "priority": int(c.get("priority", 0)),
        }
        for c in columns
    ]
    rows = []
    for obj in items:
        cells: list[Any] = [obj["metadata"]["name"]]
        for c in columns:
            v = json_path(obj, c["jsonPath"])
            if v is None:
                cells.append(None)
            elif c.get("type") == "date":
                cells.append(age(str(v), now))
            elif isinstance(v, list | dict):
                cells.append(",".join(str(x) for x in v) if isinstance(v, list) else str(v))
            else:
                cells.append(v)
        shown = (
            obj
            if full
            else {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": obj["metadata"],
            }
        )
        rows.append({"cells": cells, "object": shown})
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv},
        "columnDefinitions": defs,
        "rows": rows,
    }
