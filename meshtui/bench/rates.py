"""The bench's rates, computed from timed replies (pure): decode speed, tokens per round trip, speculation
totals, the rates of requests served together, and each setup's speed over its baseline in the same run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from meshtui.bench.timing import ReplyTiming


def decode_rate(replies: Sequence[ReplyTiming]) -> float | None:
    """Tokens a second of decoding, prefill apart: the replies' decode tokens over their decode time."""
    tokens = sum(r.decode_tokens for r in replies)
    seconds = sum(r.decode_seconds for r in replies)
    return tokens / seconds if seconds > 0 else None


def tokens_per_round_trip(replies: Sequence[ReplyTiming]) -> float | None:
    """Tokens generated per round trip of the busiest stage, prefill's included (1 or less without speculation)."""
    trips = [r.round_trips for r in replies]
    if not trips or any(t is None or t == 0 for t in trips):
        return None
    return sum(len(r.token_ids) for r in replies) / sum(t or 0 for t in trips)


def speculation_totals(replies: Sequence[ReplyTiming]) -> dict[str, Any] | None:
    """The replies' speculation reports summed: drafted, accepted, verify steps; acceptance and tokens per step
    (the steps each reply took, from its own tokens per step)."""
    reported = [(r, r.speculative) for r in replies if r.speculative]
    if not reported:
        return None
    totals = {key: sum(int(rep.get(key) or 0) for _, rep in reported)
              for key in ("drafted", "accepted", "verify_steps")}
    counted: list[tuple[int, float]] = []
    for reply, report in reported:
        steps_taken = _steps_taken(len(reply.token_ids), report)
        if steps_taken:
            counted.append((len(reply.token_ids), steps_taken))
    steps = sum(s for _, s in counted)
    return {**totals, "acceptance": totals["accepted"] / totals["drafted"] if totals["drafted"] else None,
            "tokens_per_step": sum(tokens for tokens, _ in counted) / steps if steps else None}


def _steps_taken(tokens: int, report: dict[str, Any]) -> float | None:
    """The decode steps a reply took: as reported, else from its tokens per step."""
    if report.get("decode_steps"):
        return float(report["decode_steps"])
    rate = report.get("tokens_per_step")
    return tokens / float(rate) if rate else None


def all_decoding_rate(replies: Sequence[ReplyTiming]) -> float | None:
    """Tokens a second while every request was decoding: from the last first token to the first last token. The
    aggregate rate's span also holds the steps that read later prompts, which a scheduler that answers short
    prompts first puts between the first replies' tokens; this window holds only replies decoding together."""
    times = [r.token_times for r in replies]
    if not times or not all(times):
        return None
    start, end = max(t[0] for t in times), min(t[-1] for t in times)
    if end <= start:
        return None
    return sum(1 for t in times for x in t if start < x <= end) / (end - start)


def end_to_end_rate(replies: Sequence[ReplyTiming]) -> float | None:
    """Every token generated over the time from the first request sent to the last token: what the requests got
    together, prompts read included."""
    lasts = [r.token_times[-1] for r in replies if r.token_times]
    if not lasts:
        return None
    wall = max(lasts) - min(r.requested_at for r in replies)
    return sum(len(r.token_ids) for r in replies) / wall if wall > 0 else None


def speedups(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each speculation mode's decode speed over "off" on the same mesh, and "off" over the plain TCP stages,
    per round trip and prompt set (same run)."""
    def rate(path: str, mode: str) -> dict[tuple[float, str], float]:
        return {(r["rtt_ms"], r["prompts"]): r["decode_tokens_per_second"] for r in rows
                if r.get("path", "ssh") == path and r["speculative"] == mode and r["decode_tokens_per_second"]}

    off = rate("ssh", "off")
    result = []
    for row in rows:
        key, got = (row["rtt_ms"], row["prompts"]), row["decode_tokens_per_second"]
        if row.get("path", "ssh") == "ssh" and row["speculative"] != "off" and off.get(key) and got:
            result.append({"rtt_ms": row["rtt_ms"], "prompts": row["prompts"], "speculative": row["speculative"],
                           "over_off": got / off[key]})
        if row.get("path") == "tcp" and off.get(key) and got:
            result.append({"rtt_ms": row["rtt_ms"], "prompts": row["prompts"], "speculative": "off",
                           "ssh_over_tcp": off[key] / got})
    return result
