"""The background rejoin's loop: retry failed hosts as `RejoinPolicy` says, and mark the reachable ones.

It only finds out; the orchestrator rejoins a marked host before its next reply (a re-plan and a reload cannot
happen under a reply in flight).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence

from meshtui.node import Node, NodeSink
from meshtui.rejoin import RejoinPolicy
from meshtui.stage import Stage


class RejoinWatch:
    def __init__(self, hosts: Sequence[Node], stages: Mapping[str, Stage], policy: RejoinPolicy, sink: NodeSink,
                 *, losses: Mapping[str, list[float]], rejoinable: set[str]) -> None:
        self.hosts = hosts
        self.stages = stages
        self.policy = policy
        self.sink = sink
        self.losses = losses  # monotonic times each host was lost, for the flap hold-out
        self.rejoinable = rejoinable  # filled here, emptied by the orchestrator as it rejoins them
        self._attempts: dict[str, int] = {}
        self._next_try: dict[str, float] = {}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.policy.poll_seconds)
            for node in self.hosts:
                await self._consider(node)

    async def _consider(self, node: Node) -> None:
        policy, attempts, next_try = self.policy, self._attempts, self._next_try
        if node.status != "failed" or node.name in self.rejoinable:
            attempts.pop(node.name, None)
            next_try.pop(node.name, None)
            return
        now = time.monotonic()
        if node.name not in next_try:
            losses = self.losses.get(node.name, [])
            hold = policy.hold_out(losses, now)
            next_try[node.name] = (losses[-1] if losses else now) + hold
            if hold > policy.first_delay:
                recent = policy.recent_losses(losses, now)
                self.sink.log(node.name, f"lost {recent} times lately: held out for {hold:.0f}s", "warning")
            return
        if now < next_try[node.name]:
            return
        count = attempts[node.name] = attempts.get(node.name, 0) + 1
        if policy.max_attempts is not None and count > policy.max_attempts:
            return
        err = await self.stages[node.name].unreachable()
        if err is not None:
            delay = policy.retry_delay(count)
            next_try[node.name] = time.monotonic() + delay
            self.sink.log(node.name, f"rejoin attempt {count} failed: {err}; next in {delay:.0f}s", "debug")
            return
        self.rejoinable.add(node.name)
        self.sink.log(node.name, "reachable again; it rejoins before the next reply", "warning")
