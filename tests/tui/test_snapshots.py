"""Screens as SVG snapshots (pytest-textual-snapshot). Update with: pytest tests/tui --snapshot-update"""

from __future__ import annotations

from fake_mesh import STAGE_MS
from pilot_helpers import node_row, provisioning_row, wait_until

SIZE = (120, 36)
REPLY = ["The", " mesh", " splits", " the", " model", " by", " layers", ":", " each", " host", " runs",
         " its", " share", " and", " passes", " the", " activations", " on", "."]


def test_provisioning_in_progress(build_app, snap_compare):
    app = build_app(until="push")

    async def run_before(pilot):
        await wait_until(pilot, lambda: provisioning_row(app, "lab2")[3].startswith("◐ 900"), what="push")

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_mesh_ready_with_a_reply(build_app, snap_compare):
    app = build_app(reply=REPLY, tokens_per_second=41.7)

    async def run_before(pilot):
        await wait_until(pilot, lambda: app.chat.ready, what="the mesh")
        await pilot.press(*"How does this work?", "enter")
        await wait_until(pilot, lambda: len(app.chat.messages) == 2, what="the reply")
        last = STAGE_MS["lab2"][(len(REPLY) - 1) % len(STAGE_MS["lab2"])]
        await wait_until(pilot, lambda: node_row(app, "lab2")[5].startswith(f"{last:.1f} ("), what="latencies")

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
