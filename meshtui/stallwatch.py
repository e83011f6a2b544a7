"""The step watchdog's loop: feed `meshtui.watchdog.judge` each stage's clock, probe, and declare stages lost.

The decisions are `judge`'s (pure); this loop reads each stage's clock from its tunnel, asks the agent for a
pong when a step is overdue, and declares the stage lost when none comes: the stage is aborted and `on_lost`
stops the engine blocked on it inside ggml, so the orchestrator's ordinary recovery takes over.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence

import asyncssh

from meshtui import events as ev
from meshtui.agentproc import Agent
from meshtui.node import Node, NodeSink
from meshtui.stage import Stage
from meshtui.watchdog import StageClock, StallPolicy, Verdict, judge

STEP_HISTORY = 64  # the recent steps a stage's deadline is derived from


class StallWatch:
    def __init__(self, hosts: Sequence[Node], stages: Mapping[str, Stage], policy: StallPolicy, sink: NodeSink, *,
                 loading: Callable[[], bool], on_lost: Callable[[], None],
                 step_times: Callable[[str], Sequence[float]]) -> None:
        self.hosts = hosts
        self.stages = stages
        self.policy = policy
        self.sink = sink
        self.loading = loading  # a model load is under way: its deadline is the load's, not a step's
        self.on_lost = on_lost
        self.step_times = step_times  # a stage's recent per-token times (ms), newest last
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._last_pong: dict[str, float] = {}

    async def run(self) -> None:
        """Notice a stage that stopped answering (frozen process, silent link) in about a second."""
        policy = self.policy
        while True:
            await asyncio.sleep(policy.tick)
            now = time.perf_counter()
            for node in self.hosts:
                stage = self.stages[node.name]
                agent = stage.agent
                if stage.tunnel is None or agent is None or node.lost_reason or node.status == "failed":
                    continue
                waiting_since = stage.waiting_since()
                if waiting_since is None:
                    self._last_pong.pop(node.name, None)  # each stall starts with no pong
                    if node.status == "stalled":
                        self._stall_ended(node)
                    continue
                deadline = (policy.load_deadline if self.loading()
                            else policy.step_deadline(list(self.step_times(node.name))[-STEP_HISTORY:],
                                                      stage.tunnel.meter.step_scale()))
                probe = self._probes.get(node.name)
                clock = StageClock(waiting_since, deadline, probing=probe is not None and not probe.done(),
                                   last_pong=self._last_pong.get(node.name))
                verdict = judge(policy, clock, now)
                if verdict is Verdict.PROBE:
                    if node.status != "stalled":
                        node.status = "stalled"
                        self.sink.emit(ev.StageStalled(node.name, now - waiting_since))
                        self.sink.log(node.name, f"no answer to {self._awaited()} for {now - waiting_since:.2f}s "
                                                 f"(deadline {deadline:.2f}s); asking its agent", "warning")
                    self._probes[node.name] = asyncio.create_task(self._probe_stalled(node, agent, waiting_since))
                elif verdict is Verdict.LOST:
                    self._declare_lost(node, waiting_since,
                                       f"answers pings but not its step for {now - waiting_since:.0f}s")

    async def _probe_stalled(self, node: Node, agent: Agent, waiting_since: float) -> None:
        timeout = self.policy.probe_timeout(node.rtt_ms)
        try:
            await agent.ping(timeout=timeout)
        except asyncio.CancelledError:
            if agent.alive:
                raise  # the watchdog itself is stopping
            return  # the agent exited: the ordinary failure path names why
        except (asyncio.TimeoutError, OSError, asyncssh.Error):
            if self.stages[node.name].agent is agent and not node.lost_reason:
                stalled = time.perf_counter() - waiting_since
                self._declare_lost(node, waiting_since,
                                   f"lost after a {stalled:.1f}s stall: no answer to {self._awaited()}, "
                                   f"nor to a ping within {timeout:.1f}s")
            return
        self._last_pong[node.name] = time.perf_counter()
        self.sink.log(node.name, "its agent answers: the stage is slow, not lost", "debug")

    def _awaited(self) -> str:
        """What a stalled stage owes the engine, in the words of its log lines and its reason."""
        return "the model load" if self.loading() else "its step"

    def _stall_ended(self, node: Node) -> None:
        node.status = "load" if self.loading() else "ready"
        self.sink.emit(ev.StageResponsive(node.name))
        self.sink.log(node.name, "answered its step again", "info")

    def _declare_lost(self, node: Node, waiting_since: float, reason: str) -> None:
        """Take the stalled stage out: the engine (blocked on it inside ggml) is stopped and the mesh recovers."""
        node.lost_reason = reason
        node.stalled_seconds = time.perf_counter() - waiting_since
        self.sink.log(node.name, reason, "error")
        self.stages[node.name].abort()
        self.on_lost()
