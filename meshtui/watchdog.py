"""When is a stage stalled, and when is it lost? Pure decisions for the head's step watchdog.

The head's tunnels see every RPC command sent to a stage and every answer (`RpcMeter.awaiting_since`), and
when a stage stops taking bytes (`StageTunnel.blocked_since`). A live stage answers a decode step within a few
of its own recent step times; a frozen process (SIGSTOP, swap, a hung driver) or a silent link never does, and
SSH keepalives take tens of seconds to notice a link and never notice a frozen process. So:

1. A step is *overdue* past a deadline derived from the stage's own recent step times (`factor` x p95, never
   under `floor`), times how many usual steps' work the step under way is (its bytes sent over a usual step's:
   a long prompt's chunk is hundreds of positions); during a model load the deadline is `load_deadline` (a
   large tensor takes seconds).
2. An overdue stage is *stalled*: the head asks its agent for a pong over the same SSH connection, with a timeout
   derived from the host's measured round trip. The agent answers pings from its main thread, so a stage that is
   merely slow (busy, a GC pause, a cold cache) answers at once and is left alone; the probe repeats every
   deadline while the step stays overdue.
3. No pong in time: the stage is *lost* and the mesh recovers without it. A stage that answers pings but not its
   step for `ceiling` seconds is lost too (a wedged compute thread behind a live agent).

Everything here takes `now` as a parameter and does no I/O; `meshtui/mesh.py` runs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from meshtui.stats import p95


@dataclass(frozen=True)
class StallPolicy:
    """Deadlines of the step watchdog, in seconds. See docs/architecture.md, "Noticing a stalled stage"."""

    factor: float = 4.0  # a step is overdue past factor x the stage's p95 step time...
    floor: float = 0.25  # ...and never before this (scheduling noise on a busy host is tens of ms)
    first_step: float = 2.0  # no step measured yet (the prompt's prefill runs first): wait this long
    load_deadline: float = 20.0  # an answer or a blocked upload during a model load
    probe_floor: float = 0.5  # how long a probe waits for the agent's pong, at least...
    probe_rtt_factor: float = 20.0  # ...or this many of the host's measured round trips
    ceiling: float = 300.0  # pongs but no answer to its step for this long: lost all the same
    tick: float = 0.05  # how often the watchdog looks

    def step_deadline(self, recent_step_ms: Sequence[float], scale: float = 1.0) -> float:
        """`scale`: how many usual steps' work the step under way is (`RpcMeter.step_scale`, at least 1)."""
        worst = p95(recent_step_ms)
        if worst is None:
            return max(self.floor, self.first_step) * scale
        return max(self.floor, self.factor * worst / 1000.0) * scale

    def probe_timeout(self, rtt_ms: float | None) -> float:
        return max(self.probe_floor, self.probe_rtt_factor * (rtt_ms or 0.0) / 1000.0)


class Verdict(Enum):
    FINE = "fine"  # nothing outstanding, or within its deadline
    PROBE = "probe"  # overdue and no probe under way: ask the agent for a pong now
    WAIT = "wait"  # a probe is under way, or the last one was answered less than a deadline ago
    LOST = "lost"  # stalled past the ceiling while answering pings


@dataclass(frozen=True)
class StageClock:
    """What the watchdog knows of one stage at one moment."""

    waiting_since: float | None  # oldest unanswered command, or the start of a blocked upload; None if neither
    deadline: float  # from StallPolicy.step_deadline, or its load_deadline
    probing: bool = False  # a probe is under way
    last_pong: float | None = None  # when the agent last answered a probe during this stall


def judge(policy: StallPolicy, clock: StageClock, now: float) -> Verdict:
    """What to do about one stage now. A lost verdict for a silent agent comes from its probe timing out."""
    if clock.waiting_since is None:
        return Verdict.FINE
    waited = now - clock.waiting_since
    if waited <= clock.deadline:
        return Verdict.FINE
    if waited > policy.ceiling:
        return Verdict.LOST
    if clock.probing:
        return Verdict.WAIT
    if clock.last_pong is not None and now - clock.last_pong <= clock.deadline:
        return Verdict.WAIT
    return Verdict.PROBE
