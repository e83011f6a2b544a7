"""After the engine died: which stage took it down and why, and taking a lost stage out of the mesh.

The orchestrator decides what follows (re-plan on the survivors, reload, replay the reply); these steps find
the cause in words a user can act on (the stage's own signals: its agent's exit, its channel, the watchdog's
verdict) and mark the node failed with it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence

from meshtui import events as ev
from meshtui.node import Node, NodeSink
from meshtui.stage import Stage

FAILED_STAGE_WAIT = 10.0  # how long a dead engine's stage has to show why
FAILED_STAGE_POLL = 0.1


async def find_failed_stage(hosts: Sequence[Node], stages: Mapping[str, Stage], sink: NodeSink) -> Node | None:
    """The first serving stage that is gone, marked failed with its cause; None when every stage is fine."""
    for node in hosts:
        if node.layers is None or node.status == "failed":
            continue
        reason = node.lost_reason or await stages[node.name].cause_of_loss()
        if reason:
            sink.fail(node, "serve", reason)
            sink.emit(ev.StageFailed(node.name, reason))
            return node
    return None


async def wait_for_failed_stage(hosts: Sequence[Node], stages: Mapping[str, Stage], sink: NodeSink,
                                timeout: float = FAILED_STAGE_WAIT) -> Node | None:
    """The engine died: give the stage's own signals (channel closed, agent exited) a moment to arrive."""
    deadline = time.monotonic() + timeout
    while True:
        failed = await find_failed_stage(hosts, stages, sink)
        if failed is not None or time.monotonic() > deadline:
            return failed
        await asyncio.sleep(FAILED_STAGE_POLL)


async def drop_node(node: Node, stage: Stage) -> None:
    """Take a node's layers away and stop its stage (what a stalled one still holds is cut, not waited for)."""
    node.layers = None
    await stage.drop(stalled=bool(node.lost_reason))
    node.lost_reason = ""
    node.stalled_seconds = None
