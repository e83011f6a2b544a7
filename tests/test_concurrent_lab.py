"""Several replies in flight on real OpenSSH hosts: a stage lost mid-way, and every reply continues where it stopped."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from helpers import agent_processes, parting, wait_nothing_left

from meshtui import events as ev
from meshtui.inventory import load_inventory
from meshtui.mesh import Mesh
from meshtui.replies import ReplyQueue

pytestmark = [pytest.mark.lab, pytest.mark.slow]

PROMPTS = ("The three primary colors are", "Once upon a time", "The capital of France is")
MAX_TOKENS = 32


async def _margins(mesh: Mesh, prompt: str) -> list[float]:
    """At each token of the greedy reply alone: its two likeliest tokens' logprobs apart."""
    events = mesh.stream(prompt=prompt, raw=True, max_tokens=MAX_TOKENS, temperature=0.0, sampling={"logprobs": 2})
    scored = [e async for e in events if isinstance(e, ev.TokenGenerated) and e.top_logprobs]
    return [e.top_logprobs[0][1] - e.top_logprobs[1][1] for e in scored]


async def test_a_stage_killed_with_three_replies_in_flight_every_reply_completes_identically(
        lab, tmp_path: Path) -> None:
    inventory_file = tmp_path / "inventory.toml"
    inventory_file.write_text(lab.inventory_toml('name = "smollm2"'))
    events: list[ev.Event] = []
    mesh = Mesh(load_inventory(inventory_file), listener=events.append, parallel=3)
    killed = asyncio.Event()

    def kill_h1_agent() -> None:
        ((pid, _),) = agent_processes(lab)["h1"]
        os.kill(pid, 9)
        killed.set()

    async def reply(queue: ReplyQueue, prompt: str, kill_at: int | None) -> ev.ReplyFinished:
        async for event in queue.stream(source="api", prompt=prompt, raw=True, max_tokens=MAX_TOKENS,
                                        temperature=0.0):
            if isinstance(event, ev.TokenGenerated) and event.index == kill_at and not killed.is_set():
                await asyncio.get_running_loop().run_in_executor(None, kill_h1_agent)
            if isinstance(event, ev.ReplyFinished):
                return event
        raise AssertionError(f"{prompt!r}: no ReplyFinished")

    try:
        await mesh.up()
        alone = [await mesh.generate(prompt=p, raw=True, max_tokens=MAX_TOKENS, temperature=0.0) for p in PROMPTS]
        margins = [await _margins(mesh, p) for p in PROMPTS]
        queue = ReplyQueue(mesh)
        assert queue.slots == 3
        finished = await asyncio.gather(*(reply(queue, p, 8 if i == 0 else None) for i, p in enumerate(PROMPTS)))
        assert killed.is_set()
        for f, a, m in zip(finished, alone, margins, strict=True):
            assert parting(f.token_ids, a.token_ids, m) is None, (f.text, a.text)
            if f.token_ids == a.token_ids:
                assert (f.text, f.stop_reason) == (a.text, a.stop_reason)
        assert [r.node for r in mesh.recoveries] == ["h1"]  # one recovery, however many replies saw it
        assert queue.in_flight == () and not [e for e in events if isinstance(e, ev.ReplyFailed)]
        assert [a.name for a in mesh.plan.assignments] == ["head", "h2"]  # type: ignore[union-attr]
        # The mesh goes on serving: the next reply is the same as before the loss.
        again = await mesh.generate(prompt=PROMPTS[1], raw=True, max_tokens=MAX_TOKENS, temperature=0.0)
        assert again.token_ids == alone[1].token_ids
    finally:
        await mesh.close()
    assert wait_nothing_left(lab) == {}
