"""The audit as one self-contained HTML file: device occupancy chart, statistics, event table.

Everything is inline (CSS, SVG, a few lines of script), so the file opens anywhere, offline,
and can be attached to an incident ticket as it is. Pure: a string from the audit's values.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape

from eventdispatch.audit import (
    LATENCIES,
    Row,
    Span,
    Stats,
    detail,
    human_ms,
    iso,
)

OUTCOME_COLOURS = {
    "succeeded": "#2e9d4f",
    "failed": "#d64545",
    "retried": "#e0a030",
    "timed out": "#9b59b6",
    "canceled": "#9aa0a6",
    "open": "#3b82f6",
}
MAX_ROWS = 20_000
"""Rows of the event table in the file; beyond that a browser struggles, so the rest is cut
(the file says so) and --format jsonl has them all."""
MAX_LANES = 2_000

LABEL_W, PLOT_W, RIGHT_MARGIN, LANE_H, LANE_GAP, AXIS_H = 190, 900, 60, 18, 4, 28

CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1f2328}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:28px 0 8px}
.meta{color:#59636e;margin:0 0 16px}
table{border-collapse:collapse;margin:0 0 12px} th,td{padding:3px 8px;text-align:left;
border-bottom:1px solid #e5e7eb;vertical-align:top} th{background:#f6f8fa;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.legend span{display:inline-block;margin-right:14px}
.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-1px}
svg.chart text{font:11px system-ui,sans-serif;fill:#1f2328} svg.chart .tick{stroke:#d0d7de}
svg.chart .lane-bg{fill:#f6f8fa} .ev-Failed,.ev-Rejected{color:#d64545;font-weight:600}
.ev-Succeeded{color:#2e9d4f} .ev-Retrying{color:#b7791f} .ev-TimedOut{color:#9b59b6}
.ev-Canceled,.ev-LateResult{color:#6e7781} .note{color:#9a6700}
#filter{padding:4px 8px;width:320px;margin-bottom:8px}
"""

SCRIPT = """
(function () {
  var drawn = 0;
  document.querySelectorAll('svg.chart g.lane').forEach(function (g) {
    var box = g.getBBox();
    if (box.width > 0 && box.height > 0) { drawn += 1; }
  });
  document.body.setAttribute('data-lanes-rendered', String(drawn));
  var input = document.getElementById('filter');
  if (!input) { return; }
  var rows = Array.prototype.slice.call(document.querySelectorAll('#events tbody tr'));
  input.addEventListener('input', function () {
    var q = input.value.toLowerCase();
    rows.forEach(function (r) {
      r.style.display = r.textContent.toLowerCase().indexOf(q) >= 0 ? '' : 'none';
    });
  });
})();
"""


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _ticks(t0: int, t1: int, n: int = 6) -> list[int]:
    step = max((t1 - t0) / n, 1)
    return [int(t0 + i * step) for i in range(n + 1)]


def _tick_label(ms: int, span_ms: int) -> str:
    text = iso(ms)  # 2026-12-03T17:00:00.250Z
    if span_ms < 60_000:
        return text[11:23]
    if span_ms < 86_400_000:
        return text[11:19]
    return text[5:16].replace("T", " ")


def chart(devices: Sequence[str], spans: Sequence[Span], t0: int, t1: int) -> str:
    """SVG with one lane per device and one bar per attempt holding it, coloured by outcome."""
    t1 = max(t1, t0 + 1)
    scale = PLOT_W / (t1 - t0)
    height = AXIS_H + len(devices) * (LANE_H + LANE_GAP)
    width = LABEL_W + PLOT_W + RIGHT_MARGIN
    by_device: dict[str, list[Span]] = {}
    for s in spans:
        by_device.setdefault(s.device_id, []).append(s)
    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="device occupancy">'
    ]
    for t in _ticks(t0, t1):
        x = LABEL_W + (t - t0) * scale
        parts.append(
            f'<line class="tick" x1="{x:.1f}" y1="{AXIS_H - 6}" x2="{x:.1f}" y2="{height}"/>'
            f'<text x="{x:.1f}" y="{AXIS_H - 10}" text-anchor="middle">'
            f"{_e(_tick_label(t, t1 - t0))}</text>"
        )
    for i, device in enumerate(devices):
        y = AXIS_H + i * (LANE_H + LANE_GAP)
        parts.append(f'<g class="lane" data-device="{_e(device)}" transform="translate(0,{y})">')
        parts.append(
            f'<rect class="lane-bg" x="{LABEL_W}" y="0" width="{PLOT_W}" height="{LANE_H}"/>'
        )
        label = device if len(device) <= 28 else device[:27] + "…"
        parts.append(
            f'<text x="{LABEL_W - 6}" y="{LANE_H - 5}" text-anchor="end">'
            f"{_e(label)}<title>{_e(device)}</title></text>"
        )
        for s in by_device.get(device, []):
            x = LABEL_W + (max(s.start_ms, t0) - t0) * scale
            w = max((min(s.end_ms, t1) - max(s.start_ms, t0)) * scale, 2)
            tip = (
                f"{s.exec_id}: {s.outcome}, {iso(s.start_ms)} → {iso(s.end_ms)} "
                f"({human_ms(s.end_ms - s.start_ms)})"
            )
            parts.append(
                f'<rect class="span" data-outcome="{_e(s.outcome)}" x="{x:.1f}" y="2" '
                f'width="{w:.1f}" height="{LANE_H - 4}" rx="2" '
                f'fill="{OUTCOME_COLOURS[s.outcome]}"><title>{_e(tip)}</title></rect>'
            )
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


def _stats_html(s: Stats) -> str:
    out = ['<div class="grid">']
    out.append(
        "<table><tr><th>events</th><th>devices</th><th>tasks</th><th>first</th><th>last</th></tr>"
    )
    out.append(
        f'<tr><td class="num">{s.events}</td><td class="num">{s.devices}</td>'
        f'<td class="num">{s.tasks}</td><td>{_e(iso(s.first_ms))}</td>'
        f"<td>{_e(iso(s.last_ms))}</td></tr></table>"
    )
    out.append('<table id="by-type"><tr><th>event</th><th>count</th></tr>')
    for name, n in s.by_type.items():
        out.append(f'<tr><td class="ev-{_e(name)}">{_e(name)}</td><td class="num">{n}</td></tr>')
    out.append("</table>")
    for title, rows in (
        ("devices that fail most", s.failing_devices),
        ("scripts that fail most", s.failing_scripts),
    ):
        out.append(
            f"<table><tr><th>{_e(title)}</th><th>failed attempts</th>"
            "<th>failed executions</th><th>timeouts</th></tr>"
        )
        for f in rows:
            out.append(
                f"<tr><td>{_e(f.name)}</td><td class='num'>{f.failed_attempts}</td>"
                f"<td class='num'>{f.failed_executions}</td>"
                f"<td class='num'>{f.timeouts}</td></tr>"
            )
        if not rows:
            out.append('<tr><td colspan="4">none</td></tr>')
        out.append("</table>")
    out.append("</div>")
    out.append(
        '<table id="latencies"><tr><th>latency</th><th>n</th><th>p50</th><th>p90</th>'
        "<th>p95</th><th>p99</th><th>max</th></tr>"
    )
    for key, label in LATENCIES:
        p = s.latencies.get(key)
        cells = (
            ["0", "", "", "", "", ""]
            if p is None
            else [str(p.n), *(human_ms(v) for v in (p.p50, p.p90, p.p95, p.p99, p.max))]
        )
        out.append(
            f"<tr><td>{_e(label)}</td>"
            + "".join(f'<td class="num">{_e(c)}</td>' for c in cells)
            + "</tr>"
        )
    out.append("</table>")
    return "".join(out)


def _events_html(rows: Sequence[Row]) -> str:
    out = [
        '<input id="filter" type="search" placeholder="filter rows (device, task, event…)">',
        '<table id="events"><thead><tr><th>time</th><th>device</th><th>task</th>'
        "<th>attempt</th><th>event</th><th>detail</th><th>gap</th></tr></thead><tbody>",
    ]
    for r in rows[:MAX_ROWS]:
        e = r.event
        gap = "" if r.gap_ms is None else f"+{human_ms(r.gap_ms)}"
        out.append(
            f"<tr><td>{_e(iso(e.occurred_at_ms))}</td><td>{_e(e.device_id or '')}</td>"
            f"<td>{_e(e.task_id or '')}</td><td>{'' if e.attempt is None else e.attempt}</td>"
            f'<td class="ev-{_e(e.type)}">{_e(e.type)}</td><td>{_e(detail(e))}</td>'
            f'<td class="num">{_e(gap)}</td></tr>'
        )
    out.append("</tbody></table>")
    if len(rows) > MAX_ROWS:
        out.append(
            f'<p class="note">{len(rows) - MAX_ROWS} more events are not shown; '
            "use --format jsonl for all of them.</p>"
        )
    return "".join(out)


def render(
    *,
    title: str,
    selection_text: str,
    generated_ms: int,
    rows: Sequence[Row],
    stats: Stats,
    spans: Sequence[Span],
    window: tuple[int, int],
    devices: Iterable[str] = (),
) -> str:
    """The report. One lane per device, sorted: the `devices` asked for (even those with
    nothing in the window, which is worth seeing too) and every device of the events."""
    devices = sorted(set(devices) | {r.event.device_id for r in rows if r.event.device_id})
    lanes_note = ""
    if len(devices) > MAX_LANES:
        lanes_note = (
            f'<p class="note">{len(devices) - MAX_LANES} more devices are not '
            "drawn; narrow the selection to see them.</p>"
        )
        devices = devices[:MAX_LANES]
    shown = set(devices)
    legend = "".join(
        f'<span><i style="background:{c}"></i>{_e(k)}</span>' for k, c in OUTCOME_COLOURS.items()
    )
    t0, t1 = window
    return "".join(
        [
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
            f"<h1>{_e(title)}</h1>",
            f'<p class="meta">{_e(selection_text)} · {len(rows)} events · {len(devices)} devices · '
            f"window {_e(iso(t0))} → {_e(iso(t1))} · generated {_e(iso(generated_ms))}</p>",
            "<h2>Device occupancy</h2>",
            f'<p class="legend">{legend}</p>',
            chart(devices, [s for s in spans if s.device_id in shown], t0, t1),
            lanes_note,
            "<h2>Statistics</h2>",
            _stats_html(stats),
            "<h2>Events</h2>",
            _events_html(rows),
            f"<script>{SCRIPT}</script></body></html>\n",
        ]
    )
