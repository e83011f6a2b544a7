"""Help, log, view switching and quitting, against a scripted mesh."""

from __future__ import annotations

from pilot_helpers import wait_until
from textual.widgets import ContentSwitcher, DataTable, RichLog

from meshtui.tui.help import HelpScreen

SIZE = (120, 36)


async def test_help_log_views_and_quitting_tears_the_mesh_down(build_app):
    app = build_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.chat.ready, what="the mesh")
        await pilot.press("f1")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen), what="help")
        await pilot.press("escape")
        await wait_until(pilot, lambda: not isinstance(app.screen, HelpScreen), what="help to close")

        await pilot.press("f2")
        await pilot.pause()
        assert app.log_panel.display
        log = app.log_panel.query_one(RichLog)
        await wait_until(pilot, lambda: any("model loaded" in line.text for line in log.lines), what="log")
        await pilot.press("f2")
        await pilot.pause()
        assert not app.log_panel.display

        switcher = app.query_one("#views", ContentSwitcher)
        await pilot.press("f3")
        assert switcher.current == "provisioning"
        await pilot.press("f3")
        assert switcher.current == "nodes"

        await pilot.press("q")  # typed into the prompt: it has the focus
        assert app.chat.query_one("#prompt").value == "q"
        await pilot.press("escape")  # no reply streaming: leave the prompt
        assert isinstance(app.focused, DataTable)
        await pilot.press("q")
        await wait_until(pilot, lambda: not app.is_running, what="quit")
    assert app.mesh.closed
    assert app.return_code == 0
