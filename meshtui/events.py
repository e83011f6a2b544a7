"""Events the core emits, in the past tense. The TUI and the headless CLI only render these."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Provisioning phases of a host, in order.
PHASES = ("connect", "probe", "push", "launch", "load", "ready")


@dataclass(frozen=True)
class Event:
    pass


@dataclass(frozen=True)
class HostPhaseChanged(Event):
    """A host moved to a provisioning phase; `detail` says what happens in it."""

    host: str
    phase: str
    detail: str = ""
    building: bool = False  # the push is a runtime build on the host; `detail` says its step


@dataclass(frozen=True)
class HostProbed(Event):
    host: str
    facts: dict[str, Any]


@dataclass(frozen=True)
class TransferProgressed(Event):
    """Bytes moved to a host: the runtime push (phase "push") or the model weights (phase "load").

    For a load, `done_bytes` counts weights in place on the host, sent or found in its cache by content hash,
    and `sent_bytes` what crossed the tunnel; `rate` is bytes per second sent, `eta_seconds` the time left.
    """

    host: str
    phase: str
    done_bytes: int
    total_bytes: int | None = None
    sent_bytes: int | None = None
    rate: float | None = None
    eta_seconds: float | None = None


@dataclass(frozen=True)
class AgentLaunched(Event):
    host: str
    socket: str  # the stage's Unix socket on the host
    pid: int
    devices: tuple[str, ...] = ()


@dataclass(frozen=True)
class HostFailed(Event):
    host: str
    phase: str
    reason: str


@dataclass(frozen=True)
class PlanComputed(Event):
    plan: Any  # meshtui.planner.Plan (kept loose to avoid an import cycle)


@dataclass(frozen=True)
class ModelLoaded(Event):
    seconds: float
    bytes_sent: int
    placement: dict[str, list[int]] = field(default_factory=dict)
    by_host: dict[str, dict[str, Any]] = field(default_factory=dict)  # each host's load as reported (bytes, cache)
    step_ms: tuple[float, ...] = ()  # a step of 1, 2, ... positions as timed after the load (the drafts' prices)


@dataclass(frozen=True)
class MeshReady(Event):
    pass


@dataclass(frozen=True)
class ReplyStarted(Event):
    """The engine started a reply (several may be in flight at once, each with its own request id)."""

    request_id: int
    prompt_tokens: int
    source: str = ""  # who asked for it: "chat", "api", ... (ReplyQueue's source)


@dataclass(frozen=True)
class TokenGenerated(Event):
    request_id: int
    index: int
    token_id: int
    text: str
    logprob: float | None = None  # when the request asked for logprobs (the engine's Token carries them)
    top_logprobs: tuple[tuple[str, float], ...] = ()
    step: int = -1  # the engine's decode step that produced it: tokens of one step were decoded together


@dataclass(frozen=True)
class StageLatencyMeasured(Event):
    """One stage's share of one decoded token, measured in the head's tunnel from the RPC framing."""

    host: str
    token_index: int
    total_ms: float
    network_ms: float
    bytes_up: int
    bytes_down: int

    @property
    def compute_ms(self) -> float:
        return max(0.0, self.total_ms - self.network_ms)


@dataclass(frozen=True)
class Speculation:
    """A reply's speculative decoding: tokens drafted on the head, the ones the mesh kept, the steps it took."""

    mode: str  # "auto" | "ngram" | "draft" | "off"
    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0  # steps that verified drafts
    decode_steps: int = 0  # steps that produced the reply's tokens: one round trip per stage each
    tokens: int = 0

    @property
    def tokens_per_step(self) -> float | None:
        """Tokens per round trip: 1.0 without drafts, more when drafts held."""
        return self.tokens / self.decode_steps if self.decode_steps else None

    def to_json(self) -> dict[str, Any]:
        per_step = self.tokens_per_step
        return {"mode": self.mode, "drafted": self.drafted, "accepted": self.accepted,
                "verify_steps": self.verify_steps, "tokens_per_step": round(per_step, 3) if per_step else None}


@dataclass(frozen=True)
class DraftsVerified(Event):
    """A reply finished decoding; this is how many of its tokens came from verified drafts."""

    request_id: int
    speculation: Speculation


@dataclass(frozen=True)
class ReplyFinished(Event):
    request_id: int
    text: str
    token_ids: tuple[int, ...]
    seconds: float
    tokens_per_second: float
    stop_reason: str  # "stop" | "length" | "cancelled"
    source: str = ""
    prompt_tokens: int = 0
    first_token_seconds: float | None = None  # from asking the mesh to the reply's first token; None: no token
    speculative: Speculation | None = None


@dataclass(frozen=True)
class ReplyFailed(Event):
    """A reply ended without finishing (the engine refused it, or the mesh could not recover): it is no longer in
    flight. `request_id` is 0 when it failed before the engine gave it one."""

    request_id: int
    reason: str
    source: str = ""


@dataclass(frozen=True)
class StageFailed(Event):
    host: str
    reason: str


@dataclass(frozen=True)
class StageStalled(Event):
    """A stage's answer is overdue (see meshtui/watchdog.py); its agent is being asked whether it is alive."""

    host: str
    waited_seconds: float


@dataclass(frozen=True)
class StageResponsive(Event):
    """A stalled stage answered after all: it was slow, not lost."""

    host: str


@dataclass(frozen=True)
class MeshRecovering(Event):
    """A stage was lost; the mesh is being re-planned on the survivors."""

    host: str
    reason: str


@dataclass(frozen=True)
class MeshRecovered(Event):
    host: str
    token_index: int
    seconds: float
    stalled_seconds: float | None = None  # the stall before the watchdog declared the stage lost, if it did


@dataclass(frozen=True)
class HostRejoined(Event):
    """A failed host is back in the mesh (a new plan and engine include it)."""

    host: str


@dataclass(frozen=True)
class RoundTripMeasured(Event):
    """A host's SSH round trip (the minimum of its recent pings) changed."""

    host: str
    rtt_ms: float


@dataclass(frozen=True)
class RecoveryFailed(Event):
    """A stage was lost and the mesh could not be rebuilt without it (see the error the reply raised)."""

    host: str
    reason: str


@dataclass(frozen=True)
class EngineStopped(Event):
    """The engine process holding the model is gone (closed for a reload, or died): no reply can start."""

    reason: str


@dataclass(frozen=True)
class MeshClosed(Event):
    """The mesh was torn down: engine, tunnels, agents and connections stopped."""


@dataclass(frozen=True)
class LogRecorded(Event):
    source: str
    message: str
    level: str = "info"


Listener = Callable[[Event], None]
