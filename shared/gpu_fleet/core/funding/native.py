"""The compiled parts of the funding matching, where this install has them.

``_native`` is a C extension built with the package (``_native.c``; pyproject's
``ext-modules``, marked optional): an install without a C compiler still works, and the
matching then runs its Python reference for every step (``matching._walk``, ``_match``,
``_gather``, ``_take``).  Setting
``GPU_FLEET_NATIVE=0`` in the environment does the same on an install that has it - for an
operator who suspects the compiled code, or to measure one against the other.  Either way the
decisions are the same: the tests run both and compare them element by element.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

DISABLE_VARIABLE = "GPU_FLEET_NATIVE"


def load() -> ModuleType | None:
    """The compiled module, or ``None`` if it is not built or ``GPU_FLEET_NATIVE=0``."""
    if os.environ.get(DISABLE_VARIABLE, "").strip() in {"0", "false", "no", "off"}:
        return None
    try:
        return importlib.import_module("gpu_fleet.core.funding._native")
    except ImportError:
        return None


NATIVE = load()
"""What the matching calls into (``None``: the Python reference everywhere)."""
