"""How a model load is going on each host: weights placed (sent, or found in the host's cache), rate, ETA.

Pure: counts in, numbers out. The tunnel's RpcMeter counts the bytes; the mesh samples them.
Weights a host already holds (its cache, keyed by content hash) are offered by hash and cost a round trip, not
their bytes; so "placed" runs ahead of "sent" on a warm load, and a load interrupted and started again sends
only what did not arrive the first time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meshtui import events as ev
from meshtui.agentproc import Agent
from meshtui.errors import MeshError
from meshtui.gguf_facts import ModelFacts, tensor_regions
from meshtui.rpcwire import RpcMeter
from meshtui.text import one_line
from meshtui.units import format_size


@dataclass(frozen=True)
class MeterCounts:
    """A sample of one tunnel's counters."""

    bytes_up: int = 0  # everything sent to the stage (frames, weights, activations)
    weights_sent: int = 0  # tensor data sent (SET_TENSOR payloads)
    weights_cached: int = 0  # tensors the stage found in its cache (SET_TENSOR_HASH hits)
    hash_offers: int = 0
    hash_hits: int = 0

    @classmethod
    def of(cls, meter: RpcMeter) -> MeterCounts:
        return cls(meter.bytes_up, meter.weights_sent, meter.weights_cached, meter.hash_offers, meter.hash_hits)

    def since(self, start: MeterCounts) -> MeterCounts:
        return MeterCounts(self.bytes_up - start.bytes_up, self.weights_sent - start.weights_sent,
                           self.weights_cached - start.weights_cached, self.hash_offers - start.hash_offers,
                           self.hash_hits - start.hash_hits)


@dataclass(frozen=True)
class PushCounts:
    """What the push before the engine's load did on one host (meshtui/pushweights.py)."""

    bytes_sent: int = 0  # everything written into the push's channel
    weights_pushed: int = 0
    tensors_pushed: int = 0
    weights_present: int = 0  # weights of this host's share its cache held already
    tensors_present: int = 0
    rejected: int = 0  # pushed entries whose bytes did not have their hash (never written)
    seconds: float = 0.0


@dataclass(frozen=True)
class HostLoad:
    """One host's load so far (or in all, once it is done): the push of what its cache lacked, then the engine's
    load through the tunnel."""

    host: str
    seconds: float
    counts: MeterCounts  # the tunnel's, since the load began
    planned_bytes: int | None = None  # the plan's bytes for this host's layers, when known
    push: PushCounts = PushCounts()
    repacked: int | None = None  # weight tensors its stage holds in the CPU's repacked layouts (None: unknown)

    @property
    def placed_bytes(self) -> int:
        """Weights in place: while the push runs, what it found or sent; once the engine loads, what it placed."""
        engine = self.counts.weights_sent + self.counts.weights_cached
        return max(engine, self.push.weights_present + self.push.weights_pushed)

    @property
    def sent_bytes(self) -> int:
        return self.counts.bytes_up + self.push.bytes_sent

    @property
    def rate(self) -> float | None:
        """Bytes per second on the wire (None before any time passed)."""
        return self.sent_bytes / self.seconds if self.seconds > 0 else None

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left at the rate weights were placed so far; None while unknown (nothing placed, no total)."""
        if self.planned_bytes is None or self.seconds <= 0 or self.placed_bytes <= 0:
            return None
        left = max(self.planned_bytes - self.placed_bytes, 0)
        return left / (self.placed_bytes / self.seconds)

    def to_json(self) -> dict[str, object]:
        """The per-host numbers `--json` and the bench report."""
        return {
            "seconds": round(self.seconds, 3),
            "bytes_sent": self.sent_bytes,
            "weights_sent": self.counts.weights_sent + self.push.weights_pushed,
            "bytes_pushed": self.push.bytes_sent,
            "weights_pushed": self.push.weights_pushed,
            "tensors_pushed": self.push.tensors_pushed,
            "push_seconds": round(self.push.seconds, 3),
            "weights_cached": self.counts.weights_cached,
            "tensors_offered": self.counts.hash_offers,
            "tensors_cached": self.counts.hash_hits,
            "weights_repacked": self.repacked,
        }


def load_progressed(load: HostLoad) -> ev.TransferProgressed:
    """The event the TUI's provisioning view and `--headless` show: placed of planned, sent, rate, ETA."""
    return ev.TransferProgressed(load.host, "load", load.placed_bytes, load.planned_bytes,
                                 sent_bytes=load.sent_bytes, rate=load.rate, eta_seconds=load.eta_seconds)


@dataclass(frozen=True)
class HostFile:
    """A host's own copy of the model (inventory `model_path`), with the stage to seed from it."""

    host: str
    agent: Agent
    path: str
    layers: list[int]


async def seed_from_host_files(files: Sequence[HostFile], model: ModelFacts,
                               log: Callable[[str, str, str], None]) -> None:
    """Have each host put the tensors of its layers from its own copy of the model into its cache.

    The agent names each entry by the hash of the bytes its file holds; the load then offers every tensor by the
    hash of the head's bytes, so a host whose file differs (another quantization, a damaged copy) is simply sent
    what differs. Nothing is trusted by the file's name. A host that cannot read its file is sent everything.
    """

    async def seed(item: HostFile) -> None:
        regions = tensor_regions(model, item.layers)
        try:
            answer = await item.agent.seed(item.path, regions)
        except (asyncio.TimeoutError, asyncio.CancelledError, OSError, MeshError) as err:
            log(item.host, f"could not read its own model file {item.path}: {one_line(err) or 'no answer'}",
                "warning")
            return
        if answer.get("error"):
            log(item.host, f"cannot use its own model file {item.path}: {one_line(answer['error'])}", "warning")
            return
        found = int(answer.get("seeded_bytes", 0)) + int(answer.get("present_bytes", 0))
        log(item.host, f"{format_size(found)} of its layers' tensors read from its own model file {item.path} "
                       f"({answer.get('seeded', 0)} new in its cache, {answer.get('present', 0)} there already)",
            "info")

    await asyncio.gather(*(seed(item) for item in files))
