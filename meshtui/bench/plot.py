"""The bench's plots as plain SVG (no plotting library): bars for the modes, lines for the sweeps."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from meshtui.bench.report import series_label, span
from meshtui.capacity import HEAD_NAME
from meshtui.units import format_size

_COLORS = {"single": "#4c78a8", "ssh": "#f58518", "tcp": "#54a24b", "compute": "#e45756", "network": "#72b7b2",
           "head": "#b279a2"}


def render_svg(report: Mapping[str, Any]) -> str:
    """Decode tok/s per mode, then each ssh stage's time per token split into compute and network."""
    width, left, bar_h, gap = 760, 150, 22, 8
    plot_w = width - left - 90
    parts: list[str] = []
    y = 30
    title = (f"meshtui bench: {report['model']['name']} on {report['machine']['cores']} cores "
             f"({report['machine']['cpu']})")
    parts.append(f'<text x="10" y="{y}" font-size="15" font-weight="bold">{escape(title)}</text>')
    y += 30
    parts.append(f'<text x="10" y="{y}" font-size="13">decode tokens per second (greedy, higher is better)</text>')
    y += 12
    runs = [r for r in report["runs"] if r.get("decode_tokens_per_second")]
    top = max((r["decode_tokens_per_second"] for r in runs), default=1.0)
    for run in runs:
        value = run["decode_tokens_per_second"]
        w = max(1.0, plot_w * value / top)
        parts.append(f'<text x="{left - 8}" y="{y + 16}" font-size="12" text-anchor="end">{escape(run["mode"])}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" '
                     f'fill="{_COLORS.get(run["mode"], "#888")}"/>')
        parts.append(f'<text x="{left + w + 6:.1f}" y="{y + 16}" font-size="12">{value:.1f}</text>')
        y += bar_h + gap
    ssh = next((r for r in report["runs"] if r["mode"] == "ssh"), None)
    rows: list[tuple[str, float, float, str]] = []  # label, first segment, second segment, kind
    if ssh is not None:
        for node in ssh["nodes"]:
            if node["name"] == HEAD_NAME:
                if node.get("head_ms_per_token") is not None:
                    rows.append((f"head {span(node['layers'])}", max(0.0, node["head_ms_per_token"]), 0.0, "head"))
            elif node.get("latency_ms"):
                rows.append((f"{node['name']} {span(node['layers'])}", node["compute_ms"], node["network_ms"],
                             "stage"))
    if rows:
        y += 22
        parts.append(f'<text x="10" y="{y}" font-size="13">ssh: milliseconds per decoded token, by node '
                     f'(<tspan fill="{_COLORS["compute"]}">compute</tspan>, '
                     f'<tspan fill="{_COLORS["network"]}">network</tspan>, '
                     f'<tspan fill="{_COLORS["head"]}">head and pipes</tspan>)</text>')
        y += 12
        top_ms = max(a + b for _, a, b, _ in rows) or 1.0
        for label, first, second, kind in rows:
            w1 = plot_w * first / top_ms
            w2 = plot_w * second / top_ms
            color = _COLORS["head"] if kind == "head" else _COLORS["compute"]
            parts.append(f'<text x="{left - 8}" y="{y + 16}" font-size="12" text-anchor="end">{escape(label)}</text>')
            parts.append(f'<rect x="{left}" y="{y}" width="{w1:.1f}" height="{bar_h}" fill="{color}"/>')
            if w2 > 0:
                parts.append(f'<rect x="{left + w1:.1f}" y="{y}" width="{w2:.1f}" height="{bar_h}" '
                             f'fill="{_COLORS["network"]}"/>')
            parts.append(f'<text x="{left + w1 + w2 + 6:.1f}" y="{y + 16}" font-size="12">{first + second:.2f}</text>')
            y += bar_h + gap
    y += 20
    notes = []
    if report.get("ssh_over_tcp_decode_ratio") is not None:
        notes.append(f"ssh/tcp decode {report['ssh_over_tcp_decode_ratio']:.2f}")
    notes.append(f"reload over ssh sent {format_size(report['reload_bytes_sent'])}")
    parts.append(f'<text x="10" y="{y}" font-size="12">{escape("; ".join(notes))}</text>')
    height = y + 16
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif">\n'
            f'<rect width="{width}" height="{height}" fill="white"/>\n' + "\n".join(parts) + "\n</svg>\n")


_MODE_COLORS = {"off": "#4c78a8", "auto": "#f58518", "ngram": "#54a24b", "draft": "#e45756", "tcp": "#999999"}
_SERIES_COLORS = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2")
Series = tuple[str, str, str, list[tuple[float, float]]]  # label, color, dash pattern ("" solid), points


def _nice_top(value: float) -> float:
    """A round axis top at or above `value`."""
    if value <= 0:
        return 1.0
    step = 10 ** (len(str(int(value))) - 1)
    return float(((int(value) // step) + 1) * step)


def line_chart(top_y: int, title: str, x_label: str, y_label: str, series: Sequence[Series],
               x_values: Sequence[float]) -> tuple[list[str], int]:
    """One chart: x at the given values (evenly spaced, labelled), y from 0; its SVG parts and its bottom."""
    left, width, height = 70, 520, 240
    top = top_y + 30
    parts = [f'<text x="10" y="{top_y + 14}" font-size="13" font-weight="bold">{escape(title)}</text>']
    y_max = _nice_top(max((y for *_, pts in series for _, y in pts), default=1.0))
    xs = {x: left + (width * i / max(1, len(x_values) - 1)) for i, x in enumerate(x_values)}

    def y_of(value: float) -> float:
        return top + height - height * value / y_max

    parts.append(f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#ccc"/>')
    for k in range(5):
        value = y_max * k / 4
        parts.append(f'<line x1="{left}" x2="{left + width}" y1="{y_of(value):.1f}" y2="{y_of(value):.1f}" '
                     f'stroke="#eee"/>')
        parts.append(f'<text x="{left - 6}" y="{y_of(value) + 4:.1f}" font-size="11" text-anchor="end">'
                     f'{value:g}</text>')
    for x, px in xs.items():
        parts.append(f'<text x="{px:.1f}" y="{top + height + 16}" font-size="11" text-anchor="middle">{x:g}</text>')
    parts.append(f'<text x="{left + width / 2}" y="{top + height + 34}" font-size="12" '
                 f'text-anchor="middle">{escape(x_label)}</text>')
    parts.append(f'<text x="16" y="{top + height / 2}" font-size="12" text-anchor="middle" '
                 f'transform="rotate(-90 16 {top + height / 2})">{escape(y_label)}</text>')
    for i, (label, color, dash, points) in enumerate(series):
        pts = [(xs[x], y_of(y)) for x, y in points if x in xs]
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        if len(pts) > 1:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dashed}/>')
        for px, py in pts:
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{color}"/>')
        ly = top + 8 + 16 * i
        parts.append(f'<line x1="{left + width + 12}" x2="{left + width + 36}" y1="{ly}" y2="{ly}" stroke="{color}" '
                     f'stroke-width="2"{dashed}/>')
        parts.append(f'<text x="{left + width + 40}" y="{ly + 4}" font-size="11">{escape(label)}</text>')
    return parts, top + height + 50


def render_sweep_svg(report: Mapping[str, Any]) -> str:
    """Decode tok/s against round trip per speculation mode and prompt set; then against concurrency."""
    width = 800
    m = report["machine"]
    title = f"meshtui bench: {report['model']['name']} on {m['cores']} cores ({m['cpu']})"
    parts = [f'<text x="10" y="24" font-size="15" font-weight="bold">{escape(title)}</text>']
    rows = report["rtt_sweep"]
    rtts = list(dict.fromkeys(r["rtt_ms"] for r in rows))
    series: list[Series] = []
    for prompts, dash in (("copy", ""), ("free", "6 4")):
        for mode in dict.fromkeys(series_label(r) for r in rows):
            points = [(r["rtt_ms"], r["decode_tokens_per_second"]) for r in rows
                      if r["prompts"] == prompts and series_label(r) == mode and r["decode_tokens_per_second"]]
            if points:
                series.append((f"{prompts}, {mode}", _MODE_COLORS.get(mode, "#888"), dash, points))
    chart, y = line_chart(40, "decode tokens per second against round trip per link (higher is better)",
                          "round trip per link (ms)", "decode tok/s", series, rtts)
    parts += chart
    conc = report.get("concurrency_sweep") or []
    if conc:
        counts = list(dict.fromkeys(r["concurrency"] for r in conc))
        series = []
        for i, rtt in enumerate(dict.fromkeys(r["rtt_ms"] for r in conc)):
            color = _SERIES_COLORS[i % len(_SERIES_COLORS)]
            for key, label, dash in (("aggregate_decode_tokens_per_second", "aggregate", ""),
                                     ("per_request_decode_tokens_per_second", "per request", "6 4")):
                points = [(r["concurrency"], r[key]) for r in conc if r["rtt_ms"] == rtt and r[key]]
                if points:
                    series.append((f"{rtt:g} ms, {label}", color, dash, points))
        chart, y = line_chart(y + 10, "decode tokens per second against requests at once",
                              "requests sent at once", "decode tok/s", series, counts)
        parts += chart
    height = y + 10
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif">\n'
            f'<rect width="{width}" height="{height}" fill="white"/>\n' + "\n".join(parts) + "\n</svg>\n")


_NUMBER_LIST = re.compile(r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]")


def compact_json(report: Mapping[str, Any]) -> str:
    """Indented JSON with every list of numbers (a reply's token ids) on one line."""
    text = json.dumps(report, indent=2)
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)


def write_outputs(report: Mapping[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, svg_path = out / "bench.json", out / "bench.svg"
    json_path.write_text(compact_json(report) + "\n")
    svg_path.write_text(render_sweep_svg(report) if report.get("kind") == "sweep" else render_svg(report))
    return json_path, svg_path
