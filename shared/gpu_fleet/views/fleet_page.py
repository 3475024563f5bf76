"""The fleet map as one self-contained HTML page: inline SVG, inline CSS, a few lines of inline JS.

Researchers would rather look at a picture than read lease tables, and operators want to mail it
or open it on a laptop with no network: so nothing is fetched (no CDN, no fonts, no images; the
favicon is a ``data:`` URL so even the browser's own request for one stays offline).

The page is a pure function of ``views.fleet_map``'s data: ``kubectl runs viz`` renders what the
manager answers, ``make demo`` what the demo stack holds, and the browser test checks the same
elements a person sees.  Every GPU slot is one ``<rect class="slot">`` whose ``fill`` is the
colour of its state (``CLASS_COLOURS``) and whose ``data-*`` attributes and ``<title>`` carry the
details shown on hover; the script only highlights a run's slots and bars together and copies the
hovered element's details into a side panel, so the page is complete even with scripts off.
"""

from __future__ import annotations

import html
import itertools
from typing import Any

from gpu_fleet.views.fleet_map import CLASSES, FREE, SLOT_STATES, UNAVAILABLE

CLASS_COLOURS: dict[str, str] = {
    "owned": "#2e7d32",
    "shared": "#1f77b4",
    "borrowed": "#ff7f0e",
    "unfunded": "#d62728",
    FREE: "#e4e4e4",
    UNAVAILABLE: "#5f5f5f",
}
"""Fill of a slot by state; the legend, ``kubectl runs top`` and the tests read the same map."""

CLOSED_COLOUR = "#a8a8a8"
RESERVATION_COLOUR = "#7b1fa2"
FORECAST_COLOUR = "#000000"
NOW_COLOUR = "#c2185b"

SLOT, GAP, SLOTS_PER_LINE, NODE_LABEL = 16, 3, 16, 92
TIMELINE_ROWS_MAX = 120
TIMELINE_WIDTH, TIMELINE_LABEL, ROW = 1100, 220, 20
BURN_W, BURN_H, BURN_PAD = 360, 150, 34

_CSS = """
body{font:13px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:16px 20px;color:#222}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:22px 0 8px}
h3{font-size:13px;margin:0 0 6px}.muted{color:#666}
.legend{display:flex;flex-wrap:wrap;gap:12px;margin:8px 0}
.legend span{display:inline-flex;align-items:center;gap:5px}
.sw{width:12px;height:12px;display:inline-block;border:1px solid #0003}
.domains,.teams{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
.domain,.team{border:1px solid #ddd;border-radius:6px;padding:8px 10px;background:#fafafa}
.team{max-width:380px}
.slot{stroke:#0004;stroke-width:1}.slot.spare{stroke:#000;stroke-dasharray:2 2}
.slot.hl,.bar.hl{stroke:#000;stroke-width:2.5}
.bar{stroke:#0003}.reservation{fill:url(#hatch);stroke:#7b1fa2}
text{font:11px system-ui,sans-serif;fill:#333}.axis{stroke:#999}
.domain svg,.team svg{display:block;margin:4px 0}tspan.muted{fill:#888}
#info{position:fixed;right:14px;bottom:14px;max-width:360px;white-space:pre-wrap;
background:#fff;border:1px solid #bbb;border-radius:6px;padding:8px 10px;
box-shadow:0 2px 8px #0002;font:12px ui-monospace,monospace}
"""

_SCRIPT = """
(function(){
  var info=document.getElementById('info');
  function mark(run,on){
    if(!run)return;
    document.querySelectorAll('[data-run]').forEach(function(el){
      if(el.getAttribute('data-run')===run){el.classList.toggle('hl',on);}
    });
  }
  document.querySelectorAll('[data-detail]').forEach(function(el){
    el.addEventListener('mouseenter',function(){
      info.textContent=el.getAttribute('data-detail');mark(el.getAttribute('data-run'),true);
    });
    el.addEventListener('mouseleave',function(){mark(el.getAttribute('data-run'),false);});
  });
})();
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _iso(t: dict[str, Any] | None) -> str:
    return t["iso"] if t else "-"


def render_page(
    data: dict[str, Any], title: str = "gpu-fleet fleet map", refresh: int | None = None
) -> str:
    """The whole page for one ``fleet_map`` answer.

    ``refresh`` (seconds) makes the browser reload it: the live page ``gpu-fleet up`` serves,
    where every load reads the manager's fold afresh.  The exported file (``viz``) has none.
    """
    counts = data["counts"]
    summary = ", ".join(f"{counts[s]} {s}" for s in SLOT_STATES if counts.get(s))
    live = f" &middot; live: reloads every {refresh} s" if refresh else ""
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        *([f'<meta http-equiv="refresh" content="{refresh}">'] if refresh else []),
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>{_e(title)} at {_e(data['at']['iso'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">at {_e(data["at"]["iso"])} &middot; {data["gpus"]} GPUs: '
        f"{_e(summary)}{live}</p>",
        _legend(),
        '<section id="map"><h2>Fleet: fabric domains &times; nodes &times; GPU slots</h2>',
        '<div class="domains">',
        *(_domain(d) for d in data["domains"]),
        "</div></section>",
        '<section id="timeline"><h2>Timeline: leases, reservations, forecast P50&ndash;P90</h2>',
        _timeline(data["timeline"], data["at"]["unix"]),
        "</section>",
        '<section id="burn"><h2>Budget burn per team</h2><div class="teams">',
        *(_team(b, data["timeline"]["start"]["unix"], data["at"]["unix"]) for b in data["burn"]),
        "</div></section>",
        '<div id="info">Hover a slot or a bar for details.</div>',
        f"<script>{_SCRIPT}</script>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _legend() -> str:
    items = [
        f'<span><i class="sw" style="background:{CLASS_COLOURS[s]}"></i>{_e(s)}</span>'
        for s in SLOT_STATES
    ]
    items.append('<span><i class="sw" style="border:1px dashed #000"></i>spare (dashed)</span>')
    items.append(f'<span><i class="sw" style="background:{CLOSED_COLOUR}"></i>closed lease</span>')
    items.append(
        f'<span><i class="sw" style="border:1px solid {RESERVATION_COLOUR}"></i>'
        "reservation (hatched)</span>"
    )
    items.append(
        "<span>&#9670; earliest start &nbsp; &#9474;&mdash;&#9474; forecast P50&ndash;P90</span>"
    )
    return f'<div class="legend" id="legend">{"".join(items)}</div>'


def _slot_detail(s: dict[str, Any], node: dict[str, Any]) -> str:
    if "run" not in s:
        why = "" if s["state"] == FREE else f" (node {node['health']})"
        return f"{s['slot']}: {s['state']}{why}"
    lines = [
        f"{s['slot']}  {s['class']}{' spare' if s['role'] == 'Spare' else ''}",
        f"run    {s['run']}",
        f"team   {s['team']}",
        f"lease  {s['lease']} (group {s['group']})",
        f"payer  {s['payer'] or '-'}",
        f"since  {_iso(s['start'])}",
    ]
    if s.get("end"):
        lines.append(f"ends   {_iso(s['end'])}")
    if s.get("preemption"):
        p = s["preemption"]
        lines.append(f"preempted at {_iso(p['deadline'])}: {p['reason']}")
    return "\n".join(lines)


def _bar(counts: dict[str, int], width: int) -> str:
    total = sum(counts.values()) or 1
    x, out = 0.0, []
    for s in SLOT_STATES:
        n = counts.get(s, 0)
        if not n:
            continue
        w = width * n / total
        out.append(
            f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="8" fill="{CLASS_COLOURS[s]}">'
            f"<title>{_e(s)}: {n}</title></rect>"
        )
        x += w
    return f'<svg width="{width}" height="8" role="img">{"".join(out)}</svg>'


def _domain(d: dict[str, Any]) -> str:
    rows: list[str] = []
    y = 0
    max_line = min(SLOTS_PER_LINE, max((n["gpus"] for n in d["nodes"]), default=1) or 1)
    width = NODE_LABEL + max_line * (SLOT + GAP)
    for node in d["nodes"]:
        lines = max(1, -(-node["gpus"] // SLOTS_PER_LINE))
        health = "" if node["health"] == "Ready" else f" ({node['health']})"
        rows.append(
            f'<text x="0" y="{y + SLOT - 4}" class="node" data-node="{_e(node["name"])}">'
            f"{_e(node['name'])}{_e(health)}</text>"
        )
        for s in node["slots"]:
            i = s["index"]
            sx = NODE_LABEL + (i % SLOTS_PER_LINE) * (SLOT + GAP)
            sy = y + (i // SLOTS_PER_LINE) * (SLOT + GAP)
            detail = _slot_detail(s, node)
            spare = " spare" if s.get("role") == "Spare" else ""
            run = f' data-run="{_e(s["run"])}"' if "run" in s else ""
            rows.append(
                f'<rect class="slot{spare}" x="{sx}" y="{sy}" width="{SLOT}" height="{SLOT}"'
                f' rx="2" fill="{CLASS_COLOURS[s["state"]]}" data-state="{_e(s["state"])}"'
                f' data-slot="{_e(s["slot"])}"{run} data-detail="{_e(detail)}">'
                f"<title>{_e(detail)}</title></rect>"
            )
        y += lines * (SLOT + GAP) + 4
    runs = ", ".join(f"{r['run']} ({r['gpus']})" for r in d["runs"]) or "no runs"
    c = d["counts"]
    used = sum(c[k] for k in CLASSES)
    return (
        f'<div class="domain" data-domain="{_e(d["key"])}">'
        f"<h3>{_e(d['key'])} <span class='muted'>{_e(', '.join(d['flavors']))} &middot; "
        f"{used}/{d['gpus']} in use</span></h3>"
        f"{_bar(c, width)}"
        f'<svg width="{width}" height="{max(y, 1)}" role="img" '
        f'aria-label="domain {_e(d["key"])}">{"".join(rows)}</svg>'
        f'<div class="muted" style="max-width:{width}px">{_e(runs)}</div></div>'
    )


# -- timeline --------------------------------------------------------------------------------


class _Scale:
    def __init__(self, t0: int, t1: int, x0: float, x1: float) -> None:
        if t1 <= t0:
            t1 = t0 + 60
        self.t0, self.t1, self.x0, self.x1 = t0, t1, x0, x1

    def __call__(self, t: int) -> float:
        return self.x0 + (t - self.t0) * (self.x1 - self.x0) / (self.t1 - self.t0)


def _ticks(t0: int, t1: int, n: int = 6) -> list[int]:
    span = max(1, t1 - t0)
    minute, hour, day = 60, 3600, 86400
    steps = [1, 5, 10, 30, minute, 5 * minute, 15 * minute, 30 * minute, hour, 3 * hour]
    steps += [6 * hour, 12 * hour, day, 7 * day, 30 * day]
    step = next((s for s in steps if span / s <= n), steps[-1])
    first = -(-t0 // step) * step
    return list(range(first, t1 + 1, step))


def _tick_label(t: int, span: int) -> str:
    import datetime as dt  # noqa: PLC0415 - only for labels

    d = dt.datetime.fromtimestamp(t, tz=dt.UTC)
    if span > 86400:
        return d.strftime("%m-%d %H:%M")
    return d.strftime("%H:%M" if span > 600 else "%H:%M:%S")


def _timeline(tl: dict[str, Any], now: int) -> str:
    rows = tl["rows"]
    hidden = max(0, len(rows) - TIMELINE_ROWS_MAX)
    rows = rows[hidden:]
    t0, t1 = tl["start"]["unix"], tl["end"]["unix"]
    pad = max(1, (t1 - t0) // 40)
    x = _Scale(t0 - pad, t1 + pad, TIMELINE_LABEL, TIMELINE_WIDTH - 10)
    height = 24 + ROW * len(rows) + 6
    out = [
        '<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="6" height="6" fill="#f3e5f5"/>'
        f'<line x1="0" y1="0" x2="0" y2="6" stroke="{RESERVATION_COLOUR}" stroke-width="2"/>'
        "</pattern></defs>"
    ]
    span = x.t1 - x.t0
    for t in _ticks(x.t0, x.t1):
        px = x(t)
        out.append(
            f'<line class="axis" x1="{px:.1f}" y1="14" x2="{px:.1f}" y2="{height}" '
            'stroke-dasharray="1 3"/>'
            f'<text x="{px:.1f}" y="10" text-anchor="middle">{_e(_tick_label(t, span))}</text>'
        )
    for i, r in enumerate(rows):
        y = 20 + i * ROW
        run = _e(r["run"])
        out.append(
            f'<text x="0" y="{y + 13}" data-run="{run}">{run} '
            f"<tspan class='muted'>{_e(r['phase'])}</tspan></text>"
        )
        for res in r["reservations"]:
            start = res["createdAt"]["unix"]
            stop = res["releasedAt"]["unix"] if res["releasedAt"] else now
            detail = (
                f"reservation {res['name']} ({res['kind']}, {res['state']})\n"
                f"created {_iso(res['createdAt'])}\nearliest start {_iso(res['earliestStart'])}"
                f"\ndeficit {res['deficitGPUs']} GPUs"
            )
            out.append(
                f'<rect class="bar reservation" x="{x(start):.1f}" y="{y + 3}" '
                f'width="{max(2.0, x(stop) - x(start)):.1f}" height="{ROW - 8}" '
                f'data-run="{run}" data-detail="{_e(detail)}"><title>{_e(detail)}</title></rect>'
            )
            if res["releasedAt"]:
                continue  # its promise is history: the bar says when it was released
            ex = x(res["earliestStart"]["unix"])
            out.append(
                f'<path d="M{ex:.1f} {y + 1} l5 8 l-5 8 l-5 -8 z" fill="{RESERVATION_COLOUR}">'
                f"<title>earliest start {_e(_iso(res['earliestStart']))}</title></path>"
            )
        for lease in r["leases"]:
            start, stop = lease["start"]["unix"], lease["until"]["unix"]
            fill = CLASS_COLOURS[lease["class"]] if lease["class"] else CLOSED_COLOUR
            detail = (
                f"lease {lease['lease']} on {lease['node']}: {lease['gpus']} GPUs "
                f"{lease['role']}\n{_iso(lease['start'])} - "
                f"{'now' if lease['open'] else _iso(lease['until'])}"
                + (f"\nclosed: {lease['closureReason']}" if lease["closureReason"] else "")
                + (f"\nclass {lease['class']}" if lease["class"] else "")
            )
            out.append(
                f'<rect class="bar lease" x="{x(start):.1f}" y="{y + 4}" '
                f'width="{max(2.0, x(stop) - x(start)):.1f}" height="{ROW - 10}" '
                f'fill="{fill}" data-run="{run}" data-detail="{_e(detail)}">'
                f"<title>{_e(detail)}</title></rect>"
            )
        f = r["forecast"]
        if f and f["p50"] and f["p90"]:
            a, b = x(f["p50"]["unix"]), x(f["p90"]["unix"])
            detail = (
                f"forecast for {r['run']} ({f['confidence']})\n"
                f"P50 {_iso(f['p50'])}\nP90 {_iso(f['p90'])}"
            )
            mid = y + ROW // 2
            out.append(
                f'<g class="forecast" data-run="{run}" data-detail="{_e(detail)}">'
                f"<title>{_e(detail)}</title>"
                f'<line x1="{a:.1f}" y1="{mid}" x2="{b:.1f}" y2="{mid}" '
                f'stroke="{FORECAST_COLOUR}" stroke-width="2"/>'
                f'<line x1="{a:.1f}" y1="{mid - 6}" x2="{a:.1f}" y2="{mid + 6}" '
                f'stroke="{FORECAST_COLOUR}" stroke-width="2"/>'
                f'<line x1="{b:.1f}" y1="{mid - 6}" x2="{b:.1f}" y2="{mid + 6}" '
                f'stroke="{FORECAST_COLOUR}" stroke-width="2"/></g>'
            )
    nx = x(now)
    out.append(
        f'<line x1="{nx:.1f}" y1="12" x2="{nx:.1f}" y2="{height}" stroke="{NOW_COLOUR}" '
        'stroke-width="1.5"/>'
        f'<text x="{nx + 3:.1f}" y="{height - 2}" fill="{NOW_COLOUR}">now</text>'
    )
    note = f'<p class="muted">{hidden} older runs not shown.</p>' if hidden else ""
    if not rows:
        return '<p class="muted">No leases or reservations yet.</p>'
    return (
        f'<svg width="{TIMELINE_WIDTH}" height="{height}" role="img" aria-label="timeline">'
        f"{''.join(out)}</svg>{note}"
    )


# -- burn ------------------------------------------------------------------------------------


def _team(b: dict[str, Any], t0: int, now: int) -> str:
    series = b["series"]
    ymax_gpus: int = max([b["concurrency"], *(p["gpus"] for p in series), 1])
    hours_top: float = max(
        [b["gpuHoursConsumed"], b["gpuHoursAllowance"] or 0.0, *(p["gpuHours"] for p in series)]
    )
    ymax_hours = hours_top or 1.0
    first = min([t0, *(p["t"] for p in series)])
    x = _Scale(first, now, BURN_PAD, BURN_W - BURN_PAD)
    top, bottom = 10, BURN_H - 22

    def yg(v: float) -> float:
        return float(bottom - (bottom - top) * v / ymax_gpus)

    def yh(v: float) -> float:
        return bottom - (bottom - top) * v / ymax_hours

    out = [
        f'<line class="axis" x1="{BURN_PAD}" y1="{bottom}" x2="{BURN_W - BURN_PAD}" '
        f'y2="{bottom}"/>',
        f'<text x="2" y="{top + 4}">{ymax_gpus}</text><text x="2" y="{bottom}">0</text>',
        f'<text x="{BURN_W - BURN_PAD + 2}" y="{top + 4}">{ymax_hours:.3g}h</text>',
        f'<text x="{BURN_PAD}" y="{BURN_H - 6}">{_e(_tick_label(x.t0, x.t1 - x.t0))}</text>',
        f'<text x="{BURN_W - BURN_PAD}" y="{BURN_H - 6}" text-anchor="end">'
        f"{_e(_tick_label(now, x.t1 - x.t0))} (now)</text>",
    ]
    if series:
        pts = [f"{x(series[0]['t']):.1f},{bottom}"]
        for prev, p in itertools.pairwise(series):
            pts.append(f"{x(p['t']):.1f},{yg(prev['gpus']):.1f}")
            pts.append(f"{x(p['t']):.1f},{yg(p['gpus']):.1f}")
        pts.insert(1, f"{x(series[0]['t']):.1f},{yg(series[0]['gpus']):.1f}")
        pts.append(f"{x(series[-1]['t']):.1f},{bottom}")
        out.append(
            f'<polygon points="{" ".join(pts)}" fill="{CLASS_COLOURS["owned"]}" '
            'fill-opacity="0.25" stroke="none"><title>GPUs held</title></polygon>'
        )
        hours = " ".join(f"{x(p['t']):.1f},{yh(p['gpuHours']):.1f}" for p in series)
        out.append(
            f'<polyline points="{hours}" fill="none" stroke="{CLASS_COLOURS["shared"]}" '
            'stroke-width="2"><title>cumulative GPU-hours consumed</title></polyline>'
        )
    if b["concurrency"]:
        yc = yg(b["concurrency"])
        out.append(
            f'<line x1="{BURN_PAD}" y1="{yc:.1f}" x2="{BURN_W - BURN_PAD}" y2="{yc:.1f}" '
            f'stroke="{CLASS_COLOURS["owned"]}" stroke-dasharray="5 3">'
            f"<title>concurrency of active envelopes: {b['concurrency']}</title></line>"
        )
    if b["gpuHoursAllowance"]:
        ya = yh(b["gpuHoursAllowance"])
        out.append(
            f'<line x1="{BURN_PAD}" y1="{ya:.1f}" x2="{BURN_W - BURN_PAD}" y2="{ya:.1f}" '
            f'stroke="{CLASS_COLOURS["shared"]}" stroke-dasharray="5 3">'
            f"<title>GPU-hour allowance: {b['gpuHoursAllowance']}</title></line>"
        )
    allowance = f" of {b['gpuHoursAllowance']:g}" if b["gpuHoursAllowance"] is not None else ""
    envs = "".join(
        f"<li>{_e(e['envelope'])}: {e['inUse']}/{e['concurrency']} GPUs, "
        f"{e['gpuHoursUsed']:.3g}"
        f"{'/' + format(e['gpuHours'], 'g') if e['gpuHours'] is not None else ''} GPU-h"
        f"{'' if e['active'] else ' (window closed)'}</li>"
        for e in b["envelopes"]
    )
    return (
        f'<div class="team" data-team="{_e(b["team"])}"><h3>{_e(b["team"])}</h3>'
        f'<svg width="{BURN_W}" height="{BURN_H}" role="img" '
        f'aria-label="burn {_e(b["team"])}">{"".join(out)}</svg>'
        f'<div class="muted">held {b["gpusHeld"]} of {b["concurrency"]} GPUs '
        f"(green; dashed: concurrency of its active envelopes) &middot; its runs consumed "
        f"{b['gpuHoursConsumed']:.3g} GPU-h (blue); its envelopes were charged "
        f"{b['gpuHoursCharged']:.3g}{_e(allowance)} GPU-h</div>"
        f'<ul class="muted" style="margin:4px 0 0 16px;padding:0">{envs}</ul></div>'
    )
