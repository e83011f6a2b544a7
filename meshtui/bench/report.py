"""The bench's reports as text tables: the modes side by side, and the sweeps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from meshtui.capacity import HEAD_NAME
from meshtui.units import format_size


def num(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def _size(value: float | None) -> str:
    return "-" if value is None else format_size(int(value))


def span(layers: list[int] | None) -> str:
    return "-" if not layers else f"{layers[0]}-{layers[1] - 1}"


def render_table(report: Mapping[str, Any]) -> str:
    m, model = report["machine"], report["model"]
    settings = report["settings"]
    lines = [
        f"{model['name']} ({format_size(model['file_bytes'])}, {model['n_layer']} layers), "
        f"{len(settings['prompts'])} prompt(s) x {settings['max_tokens']} tokens, greedy",
        f"machine: {m['cores']} cores, {m['cpu']}, {m['kernel']}",
        "",
        f"{'mode':<7} {'load s':>7} {'load sent':>10} {'TTFT ms':>8} {'prefill tok/s':>14} {'decode tok/s':>13}",
    ]
    for run in report["runs"]:
        sent = run["load_bytes_sent"]
        lines.append(f"{run['mode']:<7} {run['load_seconds']:>7.2f} {_size(sent):>10} {_ms(run['ttft_seconds']):>8} "
                     f"{num(run['prefill_tokens_per_second']):>14} {num(run['decode_tokens_per_second']):>13}")
    for skipped in report["skipped"]:
        lines.append(f"{skipped['mode']:<7} skipped: {skipped['reason']}")
    lines.append("")
    if report.get("ssh_over_tcp_decode_ratio") is not None:
        lines.append(f"ssh / tcp decode: {report['ssh_over_tcp_decode_ratio']:.2f}")
    if report.get("ssh_over_single_decode_ratio") is not None:
        lines.append(f"ssh / single decode: {report['ssh_over_single_decode_ratio']:.2f}")
    first = next(r for r in report["runs"] if r["mode"] == "ssh")["load_bytes_sent"]
    lines.append(f"ssh load: {format_size(first)} sent; second load on the same hosts: "
                 f"{format_size(report['reload_bytes_sent'])} in {report['reload_seconds']:.2f}s"
                 + ("" if report.get("reload_same_plan", True) else " (the plan changed)"))
    lines += _loads_by_host(report)
    lines.append("greedy outputs identical across modes: " + ("yes" if report["outputs_identical"] else "NO"))
    for run in report["runs"]:
        if run["mode"] == "single":
            continue
        lines += ["", f"{run['mode']} per node, per decoded token:",
                  f"  {'node':<10} {'layers':>7} {'total ms':>9} {'compute':>8} {'network':>8} {'round trips':>12} "
                  f"{'up/token':>10} {'down/token':>11} {'load sent':>10}"]
        for node in run["nodes"]:
            if node["name"] == HEAD_NAME:
                lines.append(f"  {node['name']:<10} {span(node['layers']):>7} "
                             f"{num(node.get('head_ms_per_token'), '.2f'):>9}  (head's layers, sampling, pipes)")
                continue
            latency = node.get("latency_ms") or {}
            moved = node.get("reply_bytes_per_token") or {}
            lines.append(
                f"  {node['name']:<10} {span(node['layers']):>7} {num(latency.get('mean'), '.2f'):>9} "
                f"{num(node.get('compute_ms'), '.2f'):>8} {num(node.get('network_ms'), '.2f'):>8} "
                f"{num(node.get('round_trips_per_token'), '.2f'):>12} {_size(moved.get('up')):>10} "
                f"{_size(moved.get('down')):>11} {_size(node.get('load_bytes_sent')):>10}")
        lines.append("  (bytes per token: each link's bytes during the replies / tokens generated, prefill included"
                     + (f"; {run['bytes_source']})" if run.get("bytes_source") else ")"))
    return "\n".join(lines)


def _loads_by_host(report: Mapping[str, Any]) -> list[str]:
    """Per host: what the first (cold) load and the second (warm) one sent, and what the host's cache held."""
    cold = next(r for r in report["runs"] if r["mode"] == "ssh").get("load_by_host") or {}
    warm = report.get("reload_by_host") or {}
    lines = []
    for name, first in cold.items():
        second = warm.get(name) or {}
        weights = (second.get("weights_sent") or 0) + (second.get("weights_cached") or 0)
        share = f" ({100 * second['bytes_sent'] / weights:.2f}% of its weights)" if weights and second else ""
        pushed = f" ({_size(first['bytes_pushed'])} pushed before the load)" if first.get("bytes_pushed") else ""
        lines.append(f"  {name}: first load sent {_size(first.get('bytes_sent'))}{pushed}; second load sent "
                     f"{_size(second.get('bytes_sent'))}{share}, {_size(second.get('weights_cached'))} from its cache")
    return lines


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def sweep_header(report: Mapping[str, Any]) -> list[str]:
    m, model, settings = report["machine"], report["model"], report["settings"]
    load = m.get("load_average")
    return [f"{model['name']} ({format_size(model['file_bytes'])}, {model['n_layer']} layers), chat prompts x "
            f"{settings['max_tokens']} tokens, greedy",
            f"machine: {m['cores']} cores, {m['cpu']}, {m['kernel']}"
            + (f"; load average at start {load[0]:.2f}" if load else ""),
            f"link: {settings['link']}"]


def series_label(row: Mapping[str, Any]) -> str:
    """A sweep row's series: its speculation mode on the mesh, or "tcp" for the plain TCP stages."""
    return "tcp" if row.get("path") == "tcp" else str(row["speculative"])


def render_rtt_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Decode tok/s per round trip: a column per prompt set and series, each mode over "off", ssh over tcp."""
    sets = list(dict.fromkeys(r["prompts"] for r in rows))
    labels = list(dict.fromkeys(series_label(r) for r in rows))
    by_key = {(r["rtt_ms"], r["prompts"], series_label(r)): r for r in rows}
    columns = [(s, m) for s in sets for m in labels]
    ratios = [(s, m, "off", f"{s} {m}/off") for s in sets for m in labels if m not in ("off", "tcp")
              and "off" in labels]
    ratios += [(s, "off", "tcp", f"{s} ssh/tcp") for s in sets if "tcp" in labels and "off" in labels]
    head = f"{'rtt ms':>6} {'ping ms':>8} " + " ".join(f"{s + ' ' + m:>12}" for s, m in columns)
    head += "".join(f" {title:>16}" for *_, title in ratios)
    lines = ["decode tok/s against the round trip of every link (ping: the slowest stage's, through its agent)", head]
    for rtt in dict.fromkeys(r["rtt_ms"] for r in rows):
        pings = [p for r in rows if r["rtt_ms"] == rtt for p in (r.get("stage_ping_ms") or {}).values()
                 if p is not None]
        line = f"{rtt:>6g} {num(max(pings) if pings else None, '.2f'):>8} "
        line += " ".join(f"{num((by_key.get((rtt, s, m)) or {}).get('decode_tokens_per_second')):>12}"
                         for s, m in columns)
        for s, m, base, _title in ratios:
            under = (by_key.get((rtt, s, base)) or {}).get("decode_tokens_per_second")
            got = (by_key.get((rtt, s, m)) or {}).get("decode_tokens_per_second")
            line += f" {_ratio(got / under if got and under else None):>16}"
        lines.append(line)
    trips = [r for r in rows if r.get("tokens_per_round_trip") is not None]
    if trips:
        lines.append("tokens per round trip (busiest stage, prefill included): " + ", ".join(
            f"{r['prompts']} {series_label(r)} {r['tokens_per_round_trip']:.2f}"
            for r in trips if r["rtt_ms"] == trips[0]["rtt_ms"]) + f" (at {trips[0]['rtt_ms']:g} ms)")
    spec = [r for r in rows if r.get("speculation") and r.get("path", "ssh") == "ssh"]
    if spec:
        lines += ["", f"{'rtt ms':>6} {'prompts':>8} {'mode':>6} {'drafted':>8} {'accepted':>9} {'tokens/step':>12}"]
        for r in spec:
            s = r["speculation"]
            lines.append(f"{r['rtt_ms']:>6g} {r['prompts']:>8} {r['speculative']:>6} {s['drafted']:>8} "
                         f"{s['accepted']:>9} {num(s.get('tokens_per_step'), '.2f'):>12}")
    parted = [(r, a) for r in rows for a in r.get("agreement_with_off", []) if not a["identical"]]
    if any("agreement_with_off" in r for r in rows):
        total = sum(len(r.get("agreement_with_off", [])) for r in rows)
        lines.append(f"token agreement with off: {total - len(parted)} of {total} replies identical"
                     + "".join(f"; {series_label(r)} {r['prompts']} at {r['rtt_ms']:g} ms parted at token "
                               f"{a['parted_at']}" for r, a in parted[:6]))
    return lines


def render_concurrency_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["decode tok/s against requests sent at once (at once: the most streaming at the same time; all "
             "decoding: while every request decoded; end to end: every token over the time from sending to the "
             "last token; late: one more request sent while the others decode, idle: the same request alone)",
             f"{'rtt ms':>6} {'requests':>8} {'at once':>7} {'aggregate':>10} {'all decoding':>13} "
             f"{'end to end':>11} {'per request':>12} "
             f"{'TTFT ms':>8} {'TTFT max':>9} {'agree':>6} {'late TTFT ms':>13} {'idle TTFT ms':>13}"]
    for r in rows:
        ttft = r.get("ttft_seconds") or {}
        agreement = r["agreement_with_alone"]
        late = r.get("late_arrival") or {}
        agree = f"{sum(1 for a in agreement if a['identical'])}/{len(agreement)}"
        lines.append(f"{r['rtt_ms']:>6g} {r['concurrency']:>8} {r['max_in_flight']:>7} "
                     f"{num(r['aggregate_decode_tokens_per_second']):>10} "
                     f"{num(r.get('all_decoding_tokens_per_second')):>13} "
                     f"{num(r.get('end_to_end_tokens_per_second')):>11} "
                     f"{num(r['per_request_decode_tokens_per_second']):>12} {_ms(ttft.get('mean')):>8} "
                     f"{_ms(ttft.get('max')):>9} {agree:>6} {_ms(late.get('ttft_seconds')):>13} "
                     f"{_ms(late.get('idle_ttft_seconds')):>13}")
    return lines


def render_sweep_table(report: Mapping[str, Any]) -> str:
    lines = sweep_header(report)
    for skipped in report.get("skipped", []):
        lines.append(f"speculative {skipped['speculative']} skipped: {skipped['reason']}")
    lines += ["", *render_rtt_table(report["rtt_sweep"])]
    if report.get("concurrency_sweep"):
        lines += ["", *render_concurrency_table(report["concurrency_sweep"])]
    return "\n".join(lines)
