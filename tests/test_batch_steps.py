"""Replies decoded together cost one graph a step on each stage, whatever order their sequences come and go in.

With a KV cache per sequence llama.cpp splits a batch into one graph per run of consecutive ascending sequence ids
and per equal token count, and each graph is a round trip to every stage: the engine puts its batch in ascending
ids, takes the lowest free one, and gives a step runs of one length (a joining prompt reads in a step of its own).
Counted on the embedded lab's stage, in its tunnel's RPC meter, against the engine steps the tokens report.
"""

from __future__ import annotations

import asyncio

import pytest

from meshtui import events as ev
from meshtui.inventory import ModelSpec
from meshtui.lab import EmbeddedLab
from meshtui.mesh import Mesh
from meshtui.replies import ReplyQueue

pytestmark = [pytest.mark.slow]

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"  # a raw prompt the model goes on counting from: no early end


async def test_sequences_freed_out_of_order_still_decode_in_one_graph_a_step() -> None:
    lab = EmbeddedLab(n_hosts=1)
    await lab.start()
    events: list[ev.Event] = []
    mesh = Mesh(lab.inventory(ModelSpec(path=None, name="smollm2", context=256)), listener=events.append,
                parallel=3, speculative="off")
    try:
        await mesh.up()
        queue = ReplyQueue(mesh)
        finished: dict[str, ev.ReplyFinished] = {}
        steps: dict[str, set[int]] = {}
        b_done, c_done = asyncio.Event(), asyncio.Event()

        async def reply(name: str, max_tokens: int, after: asyncio.Event | None = None,
                        done: asyncio.Event | None = None) -> None:
            if after is not None:
                await after.wait()
            async for event in queue.stream(source="api", prompt=COUNTING, raw=True, max_tokens=max_tokens,
                                            temperature=0.0):
                if isinstance(event, ev.TokenGenerated) and event.token_id >= 0:
                    steps.setdefault(name, set()).add(event.step)
                if isinstance(event, ev.ReplyFinished):
                    finished[name] = event
            if done is not None:
                done.set()

        # A holds sequence 0 throughout; C (sequence 2) ends before B (sequence 1), so the ids come free as 2, 1;
        # D and E then join A while it decodes.
        await asyncio.gather(reply("A", 60), reply("B", 14, done=b_done), reply("C", 5, done=c_done),
                             reply("D", 20, after=b_done), reply("E", 20, after=b_done))
        assert c_done.is_set() and {n: f.stop_reason for n, f in finished.items()} == dict.fromkeys("ABCDE", "length")
        assert min(steps["D"] | steps["E"]) > max(steps["B"] | steps["C"])  # they came after both were freed
        assert len(steps["A"] & steps["D"] & steps["E"]) >= 10  # and were decoded together with A
        every_step = set().union(*steps.values())
        assert every_step == set(range(min(every_step), max(every_step) + 1))  # each step made a token
        (tunnel,) = [s.tunnel for s in mesh.stages.values() if s.tunnel is not None]
        assert tunnel.meter.rounds_since_reset == len(every_step)  # one graph a step on the stage
        # D's and E's prompts were read in steps of their own (one run length a step), between A's.
        assert min(steps["D"]) not in steps["A"] and min(steps["E"]) not in steps["A"]
    finally:
        await mesh.close()
        await lab.close()
