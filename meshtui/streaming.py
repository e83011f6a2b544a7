"""A reply's result, and the attribution of each decoded token's time to the stages that computed it."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from meshtui import events as ev
from meshtui.capacity import HEAD_NAME
from meshtui.engine.protocol import Done, ReplyEvent, Started, Token
from meshtui.node import Node
from meshtui.planner import Plan
from meshtui.tunnels import StageTunnel


@dataclass(frozen=True)
class Reply:
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    seconds: float
    tokens_per_second: float
    stop_reason: str
    speculative: ev.Speculation | None = None


class ReplyFold:
    """One reply's engine events, over every attempt (a recovery replays it), folded into the core's events.

    Pure: the caller passes the clock. `resume_tokens` is what a new attempt replays after a recovery.
    """

    def __init__(self, request_id: int, started: float, speculative: str = "off", source: str = "") -> None:
        self.request_id = request_id
        self.speculation = ev.Speculation(speculative)
        self._steps: set[int] = set()  # this attempt's steps that produced tokens
        self.started = started
        self.source = source  # whose reply it is ("chat", "api", ...)
        self.prompt_tokens = 0
        self.generated: list[int] = []
        self.text_parts: list[str] = []
        self.stop_reason = "length"
        self._announced = False
        self._first_token_at: float | None = None
        self._last_token_at = started
        self._first_of_attempt = True
        self._measured_call = -1

    @property
    def resume_tokens(self) -> tuple[int, ...]:
        return tuple(self.generated)

    def new_attempt(self) -> None:
        self._first_of_attempt = True
        self._count_steps()

    def _count_steps(self) -> None:
        self.speculation = replace(self.speculation, decode_steps=self.speculation.decode_steps + len(self._steps))
        self._steps = set()

    def token(self, event: Token, now: float) -> tuple[ev.TokenGenerated, Token | None]:
        """The event to tell, and the decode step to attribute to the stages (the token: its `decode_call` is
        the step; `StepMeasures` says where the meters' count of it is), or None: the first token of an attempt
        comes out of the prompt's prefill, and tokens accepted from one step's drafts share that step."""
        if event.token_id >= 0:
            self._first_token_at = self._first_token_at or now
            self._last_token_at = now
            self.generated.append(event.token_id)
            self._steps.add(event.decode_call)
        self.text_parts.append(event.text)
        step = None
        if event.token_id >= 0 and not self._first_of_attempt and event.decode_call != self._measured_call:
            self._measured_call = event.decode_call
            step = event
        self._first_of_attempt = self._first_of_attempt and event.token_id < 0
        return ev.TokenGenerated(self.request_id, event.index, event.token_id, event.text, event.logprob,
                                 event.top_logprobs, event.decode_call), step

    def other(self, event: ReplyEvent) -> ev.Event | None:
        """A non-token engine event: the reply's start (told once, not again after a recovery), its end."""
        if isinstance(event, Started) and not self._announced:
            self._announced = True
            self.prompt_tokens = event.prompt_tokens
            return ev.ReplyStarted(self.request_id, event.prompt_tokens, self.source)
        if isinstance(event, Done):
            self.stop_reason = event.stop_reason
            spec = self.speculation
            self.speculation = replace(spec, drafted=spec.drafted + event.drafted,
                                       accepted=spec.accepted + event.accepted,
                                       verify_steps=spec.verify_steps + event.verify_steps)
        return None

    def finished(self, now: float) -> ev.ReplyFinished:
        span = self._last_token_at - (self._first_token_at or self._last_token_at)
        count = len(self.generated)
        tps = (count - 1) / span if count > 1 and span > 0 else 0.0
        self._count_steps()
        self.speculation = replace(self.speculation, tokens=count)
        first = self._first_token_at - self.started if self._first_token_at is not None else None
        return ev.ReplyFinished(self.request_id, "".join(self.text_parts), tuple(self.generated),
                                now - self.started, tps, self.stop_reason, speculative=self.speculation,
                                source=self.source, prompt_tokens=self.prompt_tokens, first_token_seconds=first)


class StepMeasures:
    """Each engine step's stage round trips told once, whichever reply's token saw the step, alone or with others.

    The stages' meters count rounds from their last reset, made while the engine was idle, just before a reply
    was sent (`meters_reset`); that reply's `Started.decode_call` is the engine step the count begins at. Every
    reply's tokens on that engine map to the meters from there, until the engine changes. Pure: the caller
    resets the meters and passes what the engine said; an engine is any object that stands for one.
    """

    def __init__(self, remember: int = 256) -> None:
        self._engine: object | None = None
        self._resetter: int | None = None  # the request whose Started anchors the count
        self._anchor: int | None = None
        self._told: deque[int] = deque(maxlen=remember)

    def meters_reset(self, request_id: int, engine: object) -> None:
        self._engine, self._resetter, self._anchor = engine, request_id, None
        self._told.clear()

    def started(self, request_id: int, engine: object, decode_call: int) -> None:
        if engine is self._engine and request_id == self._resetter and self._anchor is None:
            self._anchor = decode_call

    def step_of(self, token: Token, engine: object) -> Token | None:
        """`token` with its `decode_call` counted as the meters count, the first time its step is seen; None
        when told already, or when the meters' count does not cover it (another engine, before the anchor)."""
        anchor = self._anchor
        if engine is not self._engine or anchor is None or token.decode_call < anchor \
                or token.decode_call in self._told:
            return None
        self._told.append(token.decode_call)
        return replace(token, decode_call=token.decode_call - anchor)


def head_holds_layers(plan: Plan | None) -> bool:
    """The head computes some of each token: its own layers, or the output layer on its local stage."""
    return plan is not None and (plan.head.n_layers > 0 or plan.output_on_head)


def stage_latencies(remote: Sequence[Node], tunnels: Mapping[str, StageTunnel], plan: Plan | None,
                    token: Token) -> list[ev.StageLatencyMeasured]:
    """Each stage's round trip for the decode call that produced `token`, from its tunnel's meter; then the
    head's share: the decode call's time less every stage's round trip (its layers, the output layer on its
    local stage), when every stage's round trip is known."""
    measured = []
    for node in remote:
        meter = tunnels[node.name].meter
        rounds = meter.rounds
        if token.decode_call >= len(rounds) or meter.rounds_since_reset != len(rounds):
            continue
        r = rounds[token.decode_call]
        measured.append(ev.StageLatencyMeasured(
            node.name, token.index, r.ms, min(node.rtt_ms or 0.0, r.ms), r.bytes_up, r.bytes_down))
    if head_holds_layers(plan) and token.decode_ms > 0 and len(measured) == len(remote):
        head_ms = max(0.0, token.decode_ms - sum(s.total_ms for s in measured))
        measured.append(ev.StageLatencyMeasured(HEAD_NAME, token.index, head_ms, 0.0, 0, 0))
    return measured
