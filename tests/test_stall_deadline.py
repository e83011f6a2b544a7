"""A long prompt is not a stall: the step watchdog gives a step as many deadlines as usual steps' work it is.

A prompt's chunk of hundreds of positions takes a stage hundreds of decode steps' time; before, a deadline of a
few decode steps flagged every stage `stalled` (and pinged its agent) on any long prompt.
"""

from __future__ import annotations

import pytest

from meshtui import events as ev
from meshtui.inventory import ModelSpec
from meshtui.lab import EmbeddedLab
from meshtui.mesh import Mesh
from meshtui.watchdog import StallPolicy

pytestmark = [pytest.mark.slow]

# Tight on purpose: 8 x a decode step's p95 (a few ms here) at least 50 ms, where a 512-position chunk takes a
# stage hundreds of ms.
POLICY = StallPolicy(factor=8.0, floor=0.05)


async def test_a_long_prompt_on_a_tight_deadline_stalls_no_stage() -> None:
    lab = EmbeddedLab(n_hosts=2)
    await lab.start()
    events: list[ev.Event] = []
    mesh = Mesh(lab.inventory(ModelSpec(path=None, name="smollm2", context=2048)), listener=events.append,
                stall_policy=POLICY, speculative="off")
    try:
        await mesh.up()
        await mesh.generate(prompt="Once upon a time", raw=True, max_tokens=24, temperature=0.0)  # usual steps
        long = " ".join(f"Item {i}: the quick brown fox jumps over the lazy dog." for i in range(90))
        reply = await mesh.generate(prompt=long, raw=True, max_tokens=4, temperature=0.0)
        assert reply.prompt_tokens > 1200  # read in chunks of several hundred positions
        assert reply.token_ids and reply.stop_reason in ("stop", "length")
        assert [e for e in events if isinstance(e, ev.StageStalled)] == []
        assert [n.status for n in mesh.hosts if n.status in ("stalled", "failed")] == []
    finally:
        await mesh.close()
        await lab.close()
