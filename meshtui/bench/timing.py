"""Measuring replies as the orchestrator sees them arrive, and the facts of the machine they ran on.

Every mode and sweep of the bench times a reply the same way: timestamps taken as events reach this process.
TTFT is first token minus request; prefill tok/s is prompt tokens / TTFT; decode tok/s is (n - 1) / (t_last -
t_first), pooled over the replies, so prefill never counts as decode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshtui import events as ev
from meshtui.stats import p95


@dataclass
class ReplyTiming:
    """One prompt's reply as the orchestrator saw it arrive."""

    prompt: str
    requested_at: float
    prompt_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    stop_reason: str = "length"
    finished_at: float | None = None
    speculative: dict[str, Any] | None = None  # the reply's speculation report, when the mesh gives one
    round_trips: int | None = None  # round trips of the busiest stage during the reply (prefill included)

    def fold(self, event: ev.Event, now: float) -> None:
        """Take one of the reply's events, arrived at `now`."""
        if isinstance(event, ev.ReplyStarted):
            self.prompt_tokens = event.prompt_tokens
        elif isinstance(event, ev.TokenGenerated):
            self.token(event.token_id, now)
        elif isinstance(event, ev.ReplyFinished):
            self.stop_reason = event.stop_reason
            self.finished_at = now
            report = getattr(event, "speculative", None)  # once the mesh reports speculation per reply
            if report is not None:
                self.speculative = report if isinstance(report, dict) else _as_dict(report)

    def token(self, token_id: int, now: float) -> None:
        if token_id >= 0:  # -1 carries only a UTF-8 tail
            self.token_ids.append(token_id)
            self.token_times.append(now)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.requested_at if self.token_times else None

    @property
    def decode_tokens(self) -> int:
        return max(0, len(self.token_times) - 1)

    @property
    def decode_seconds(self) -> float:
        return self.token_times[-1] - self.token_times[0] if self.token_times else 0.0

    @property
    def decode_tokens_per_second(self) -> float | None:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else None

    @property
    def decode_calls(self) -> int:
        """llama_decode calls: the prompt's, one per later token, and one more that produced the EOS."""
        return len(self.token_ids) + (1 if self.stop_reason == "stop" else 0)

    def to_json(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "tokens": len(self.token_ids), "ttft_seconds": self.ttft,
                "decode_seconds": self.decode_seconds, "stop_reason": self.stop_reason,
                "token_ids": list(self.token_ids),
                **({"speculative": self.speculative} if self.speculative is not None else {}),
                **({"round_trips": self.round_trips} if self.round_trips is not None else {})}


async def timed_reply(events: AsyncIterator[ev.Event], prompt: str, requested_at: float | None = None,
                      samples: dict[str, list[ev.StageLatencyMeasured]] | None = None) -> ReplyTiming:
    """Fold one reply's events (`Mesh.stream`, or the reply queue's) into its timing."""
    timing = ReplyTiming(prompt, time.perf_counter() if requested_at is None else requested_at)
    async for event in events:
        timing.fold(event, time.perf_counter())
        if isinstance(event, ev.StageLatencyMeasured) and samples is not None:
            samples.setdefault(event.host, []).append(event)
    return timing


def _as_dict(value: object) -> dict[str, Any]:
    """A reply's speculation report as JSON: a dataclass's fields with what its `to_json` adds (derived rates)."""
    result: dict[str, Any] = {}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        result.update(dataclasses.asdict(value))
    to_json = getattr(value, "to_json", None)
    extra = to_json() if callable(to_json) else None
    if isinstance(extra, dict):
        result.update(extra)
    return result or {"value": repr(value)}


def summarise_replies(replies: Sequence[ReplyTiming]) -> dict[str, Any]:
    """Prefill tok/s = prompt tokens / TTFT; decode tok/s = (n - 1) / (t_last - t_first), pooled over prompts."""
    answered = [r for r in replies if r.ttft is not None]
    ttft = sum(r.ttft or 0.0 for r in answered)
    decode_seconds = sum(r.decode_seconds for r in answered)
    decode_tokens = sum(r.decode_tokens for r in answered)
    return {
        "prompts": len(replies),
        "prompt_tokens": sum(r.prompt_tokens for r in answered),
        "generated_tokens": sum(len(r.token_ids) for r in replies),
        "ttft_seconds": ttft / len(answered) if answered else None,
        "prefill_tokens_per_second": sum(r.prompt_tokens for r in answered) / ttft if ttft > 0 else None,
        "decode_tokens_per_second": decode_tokens / decode_seconds if decode_seconds > 0 else None,
        "replies": [r.to_json() for r in replies],
    }


def stage_row(samples: Sequence[ev.StageLatencyMeasured]) -> dict[str, Any]:
    """One stage's time per decoded token, from the mesh's own latency events."""
    if not samples:
        return {"latency_ms": None, "compute_ms": None, "network_ms": None, "decode_bytes_per_token": None}
    totals = sorted(s.total_ms for s in samples)
    return {
        "latency_ms": {"mean": statistics.fmean(totals), "p50": statistics.median(totals), "p95": p95(totals)},
        "compute_ms": statistics.fmean(s.compute_ms for s in samples),
        "network_ms": statistics.fmean(s.network_ms for s in samples),
        "decode_bytes_per_token": {"up": statistics.fmean(s.bytes_up for s in samples),
                                   "down": statistics.fmean(s.bytes_down for s in samples)},
    }


def token_agreement(reference: Sequence[int], other: Sequence[int]) -> dict[str, Any]:
    """How far two greedy replies agree: the common prefix, and where they part (None when they do not)."""
    common = 0
    for a, b in zip(reference, other, strict=False):
        if a != b:
            break
        common += 1
    same = common == len(reference) == len(other)
    return {"identical": same, "common_prefix": common, "parted_at": None if same else common}


# -- the machine ------------------------------------------------------------------------------------


def mem_available() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def load_average() -> list[float] | None:
    with contextlib.suppress(OSError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def machine_facts() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_total = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    llama_version = None
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):  # metadata only: no native code loaded
        llama_version = importlib.metadata.version("llama-cpp-python")
    return {"cores": os.cpu_count(), "cpu": cpu, "kernel": f"{platform.system()} {platform.release()}",
            "memory_bytes": mem_total, "python": platform.python_version(), "llama_cpp_python": llama_version,
            "load_average": load_average()}


def warm_page_cache(path: Path) -> None:
    """Read the model once so every mode's load time measures transfer, not the disk."""
    with open(path, "rb") as f:
        while f.read(16 * 1024**2):
            pass
