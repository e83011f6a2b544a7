"""The TUI retries failed hosts in the background, as headless `up` and `serve` do: a real mesh (embedded lab)
loses a host's agent, recovers on the survivors, and takes the host back before a later reply, with no `r`."""

from __future__ import annotations

import os
import signal

import pytest
from pilot_helpers import node_row, wait_until
from textual.widgets import RichLog

from meshtui.inventory import ModelSpec
from meshtui.lab import EmbeddedLab
from meshtui.tui.app import make_app

pytestmark = [pytest.mark.slow]


def log_lines(app: object) -> list[str]:
    return [strip.text for strip in app.log_panel.query_one(RichLog).lines]  # type: ignore[attr-defined]


async def test_a_lost_host_rejoins_by_itself_before_a_later_reply() -> None:
    lab = EmbeddedLab(n_hosts=2)
    await lab.start()
    inventory = lab.inventory(ModelSpec(path=None, name="smollm2", context=512))
    app = make_app(inventory, max_tokens=6, temperature=0.0)
    try:
        async with app.run_test(size=(160, 50)) as pilot:
            await wait_until(pilot, lambda: app.chat.ready, timeout=240, what="the mesh")
            await pilot.press("f2")  # the log panel (its lines are drawn only while it is shown)
            agent = app.mesh.stages["lab1"].running_agent()  # type: ignore[attr-defined]
            os.kill(agent.pid, signal.SIGKILL)

            await pilot.press(*"hi", "enter")  # this reply meets the dead stage and recovers on the survivors
            await wait_until(pilot, lambda: len(app.chat.messages) == 2 and not app.chat.streaming,
                             timeout=120, what="the reply through the recovery")
            assert node_row(app, "lab1")[2].startswith("failed: ")
            await wait_until(pilot, lambda: any("lab1" in line and "reachable again" in line
                                                for line in log_lines(app)),
                             timeout=60, what="the background retry to reach lab1")

            await pilot.press(*"again", "enter")  # lab1 rejoins before this reply, without `r`
            await wait_until(pilot, lambda: len(app.chat.messages) == 4 and not app.chat.streaming,
                             timeout=120, what="the reply after the rejoin")
            await wait_until(pilot, lambda: node_row(app, "lab1")[2] == "ready", what="lab1's row back to ready")
            assert "lab1" not in app.lost
            assert any("lab1 is back in the mesh" in str(n.message) for n in app._notifications)
            assert app.chat.ready
            await app.action_quit()
    finally:
        await app.shutdown_mesh()
        await lab.close()
