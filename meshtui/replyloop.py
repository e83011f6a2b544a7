"""One reply's life on the engine: its attempts (the first, one more after each recovery), folded into events.

The orchestrator decides what a reply goes through (`Route`: the engine now, the stages that hold layers) and
what happens when the engine dies (`on_engine_died`: start a recovery, or join the one under way); this module
runs the loop between those decisions and tells each step as a core event through `emit`. It holds no `Mesh`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from meshtui import events as ev
from meshtui.engine.client import EngineDied, EngineProcess
from meshtui.engine.protocol import SPECULATIVE_MODES, Generate, Started, Token
from meshtui.errors import EngineError, MeshError
from meshtui.inflight import InFlight
from meshtui.node import Node
from meshtui.planner import Plan
from meshtui.streaming import Reply, ReplyFold, StepMeasures, stage_latencies
from meshtui.tunnels import StageTunnel


def check_speculative(mode: str, name: str, error: type[MeshError]) -> None:
    """A speculation mode (`--speculative`, or a reply's own) is one the engine knows."""
    if mode not in SPECULATIVE_MODES:
        raise error(f"{name}: expected one of {', '.join(SPECULATIVE_MODES)}, not {mode!r}")


@dataclass(frozen=True)
class Route:
    """What one attempt of a reply goes through: the engine now, the stages holding layers and their tunnels."""

    engine: EngineProcess | None
    remote: Sequence[Node]
    tunnels: Mapping[str, StageTunnel]
    plan: Plan | None


@dataclass(frozen=True)
class ReplyLoop:
    """The orchestrator's side of a reply, as plain callables: no import of `Mesh`, no cycle."""

    flights: InFlight
    route: Callable[[], Route]  # read at each attempt: a recovery changes the engine and the stages
    on_engine_died: Callable[[EngineProcess, EngineDied, int], None]  # (the engine, why, tokens generated so far)
    emit: ev.Listener
    steps: StepMeasures = field(default_factory=StepMeasures)  # where the stages' meters count from: once a step

    async def stream(self, command: Generate, source: str) -> AsyncGenerator[ev.Event, None]:
        """The reply's events, the reply counted in flight from its first to its last; when it cannot finish it
        raises after telling ReplyFailed (or "interrupted" when its consumer leaves before the end)."""
        check_speculative(command.speculative, "speculative", EngineError)
        request_id = command.id
        self.flights.begin(request_id, source)
        ended = False
        try:
            async for event in self._attempts(command, source):
                if isinstance(event, ev.ReplyFinished):  # no longer in flight, even if its consumer stops here
                    ended = True
                    self.flights.end(request_id)
                yield event
        except MeshError as err:
            ended = True
            self.emit(ev.ReplyFailed(request_id, str(err), source))
            raise
        finally:
            self.flights.end(request_id)
            if not ended:  # its consumer left before the end (a cancelled task): it is no longer in flight
                self.emit(ev.ReplyFailed(request_id, "interrupted", source))

    def _emitted(self, event: ev.Event) -> ev.Event:
        self.emit(event)
        return event

    async def _attempts(self, command: Generate, source: str) -> AsyncIterator[ev.Event]:
        """One reply's attempts: the first, and one more after each recovery, until the engine says Done."""
        fold = ReplyFold(command.id, time.perf_counter(), command.speculative, source)
        while True:
            route = self.route()
            fold.new_attempt()
            engine = route.engine
            if engine is None:
                raise EngineError("the mesh is not up")
            if self.flights.alone(self.flights.started):  # the engine is idle: the meters count from this reply
                for tunnel in route.tunnels.values():
                    tunnel.meter.reset_rounds()
                self.steps.meters_reset(command.id, engine)
            try:
                async for event in engine.generate(replace(command, resume_tokens=fold.resume_tokens)):
                    if not isinstance(event, Token):
                        if isinstance(event, Started):
                            self.steps.started(command.id, engine, event.decode_call)
                        folded = fold.other(event)
                        if folded is not None:
                            yield self._emitted(folded)
                        continue
                    told, step = fold.token(event, time.perf_counter())
                    yield self._emitted(told)
                    step = self.steps.step_of(step, engine) if step else None  # with others too, once a step
                    for measured in stage_latencies(route.remote, route.tunnels, route.plan, step) if step else ():
                        yield self._emitted(measured)
                break
            except EngineDied as err:
                # The first reply to see this engine die recovers the mesh; the others wait for that recovery.
                self.on_engine_died(engine, err, len(fold.generated))
                await self.flights.settled()
        finished = fold.finished(time.perf_counter())
        if finished.speculative is not None:
            yield self._emitted(ev.DraftsVerified(command.id, finished.speculative))
        yield self._emitted(finished)


async def collect_reply(events: AsyncGenerator[ev.Event, None]) -> Reply:
    """A reply's events folded into the whole reply; the stream is closed once it has finished."""
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, ev.ReplyFinished):
                return Reply(event.text, event.token_ids, event.prompt_tokens, event.seconds,
                             event.tokens_per_second, event.stop_reason, event.speculative)
    raise EngineError("the engine ended the reply without finishing it")
