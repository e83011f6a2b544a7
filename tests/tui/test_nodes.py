"""The mesh table and provisioning view against a scripted mesh: readiness, latencies, failures."""

from __future__ import annotations

from pilot_helpers import node_row, provisioning_row, wait_until
from textual.widgets import ContentSwitcher, Sparkline

from meshtui import events as ev
from meshtui.errors import HostError
from meshtui.mesh import RejoinPolicy
from meshtui.tui.nodes import NodesView

SIZE = (120, 36)


async def test_ready_mesh_shows_layers_and_split_latency(build_app):
    app = build_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.chat.ready, what="the mesh")
        assert app.query_one("#views", ContentSwitcher).current == "nodes"
        await pilot.press(*"hi", "enter")
        await wait_until(pilot, lambda: len(app.chat.messages) == 2, what="reply")
        # Redraws are throttled: wait for the table to show both samples of each host (tokens 1 and 2).
        await wait_until(pilot, lambda: node_row(app, "lab2")[5] == "12.6 (9.2+3.4)"
                         and node_row(app, "lab1")[6] == "7.5 (6.3+1.2)", what="latencies")
        head, lab1, lab2 = (node_row(app, n) for n in ("head", "lab1", "lab2"))
        assert head[:4] == ["head", "127.0.0.1", "ready", "0–12"]
        assert head[5:] == ["—", "—", "—", "—"]  # this scripted mesh reports no head share
        assert lab1[3] == "13–24" and lab2[3] == "25–29+out"
        # 2 latency samples per host (tokens 1 and 2); lab2's last is 12.6 ms with a 3.4 ms round trip
        assert lab2[5] == "12.6 (9.2+3.4)"
        assert lab1[6] == "7.5 (6.3+1.2)"  # mean of 6.9 and 8.1
        assert list(app.query_one("#spark-2", Sparkline).data) == [9.8, 12.6]


async def test_the_heads_own_latency_is_shown_like_a_stages(build_app):
    app = build_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.chat.ready, what="the mesh")
        for index, ms in enumerate((4.0, 6.5)):
            app.mesh.emit(ev.StageLatencyMeasured("head", index, ms, 0.0, 0, 0))
            app.post_message(NodesView.Changed())
        await wait_until(pilot, lambda: node_row(app, "head")[5] == "6.5 (6.5+0.0)", what="the head's latency")
        assert node_row(app, "head")[5:] == ["6.5 (6.5+0.0)", "5.2 (5.2+0.0)", "6.5 (6.5+0.0)", "—"]


async def test_a_stage_lost_after_ready_turns_its_row_failed_with_the_reason(build_app):
    app = build_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.chat.ready, what="the mesh")
        app.mesh.lose_stage("lab2", "agent exited: Segmentation fault")
        await wait_until(pilot, lambda: node_row(app, "lab2")[2].startswith("failed"), what="the failed row")
        assert node_row(app, "lab2")[2] == "failed: agent exited: Segmentation fault"
        assert node_row(app, "lab1")[2] == "ready"
        assert not app.chat.ready
        assert "agent exited" in app.chat.down_reason
        await wait_until(pilot, lambda: provisioning_row(app, "lab2")[6] == "✗ failed", what="provisioning")
        assert provisioning_row(app, "lab2")[-1] == "agent exited: Segmentation fault"


async def test_a_stalled_stage_shows_stalled_then_ready_or_lost(build_app):
    from meshtui import events as ev

    app = build_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.chat.ready, what="the mesh")
        app.mesh.emit(ev.StageStalled("lab1", 0.3))
        await wait_until(pilot, lambda: node_row(app, "lab1")[2] == "stalled", what="the stalled row")
        app.mesh.emit(ev.StageResponsive("lab1"))  # slow, not lost
        await wait_until(pilot, lambda: node_row(app, "lab1")[2] == "ready", what="the row back to ready")
        app.mesh.emit(ev.StageStalled("lab2", 0.3))
        await wait_until(pilot, lambda: node_row(app, "lab2")[2] == "stalled", what="the stalled row")
        reason = "lost after a 0.8s stall: no answer to its step, nor to a ping within 0.5s"
        app.mesh.lose_stage("lab2", reason)
        await wait_until(pilot, lambda: node_row(app, "lab2")[2] == f"failed: {reason}", what="the lost row")
        assert node_row(app, "lab1")[2] == "ready"


async def test_after_a_recovery_the_chat_reopens_and_r_rejoins_the_failed_host(build_app):
    app = build_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.chat.ready, what="the mesh")
        app.mesh.lose_stage("lab2", "SSH connection lost")
        await wait_until(pilot, lambda: not app.chat.ready, what="the chat to close")
        app.mesh.recover_from("lab2")
        await wait_until(pilot, lambda: app.chat.ready, what="the chat to reopen after the recovery")
        await wait_until(pilot, lambda: node_row(app, "lab2")[2] == "failed: SSH connection lost",
                         what="the failed row (redraws are throttled)")
        app.chat.query_one("Input").blur()
        await pilot.press("r")
        await wait_until(pilot, lambda: app.mesh.rejoined == ["lab2"], what="the rejoin")
        await wait_until(pilot, lambda: node_row(app, "lab2")[2] == "ready", what="the row back to ready")
        assert app.chat.ready and "lab2" not in app.lost
        assert app.mesh.auto_rejoin == RejoinPolicy()  # r or not, failed hosts are retried in the background


async def test_a_failed_bring_up_is_shown_in_place_and_q_quits_with_its_exit_code(build_app):
    app = build_app(until="push", fail_up=HostError("disk full while pushing the runtime", host="lab2"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: bool(app.up_error), what="the failure")
        await wait_until(pilot, lambda: provisioning_row(app, "lab2")[3] == "✗ failed", what="the failed row")
        assert app.up_error == "lab2: disk full while pushing the runtime"
        assert app.query_one("#views", ContentSwitcher).current == "provisioning"
        row = provisioning_row(app, "lab2")
        assert row[3] == "✗ failed" and row[-1] == "disk full while pushing the runtime"
        assert provisioning_row(app, "lab1")[3].startswith("◐")  # the other host is left as it was
        status = str(app.provisioning.query_one("#provisioning-status").render())
        assert "disk full" in status and "q to quit" in status
        await pilot.pause(0.2)
        assert app.is_running  # the app stays open so the error can be read
        await pilot.press("q")
        await wait_until(pilot, lambda: not app.is_running, what="quit")
    assert app.mesh.closed and app.mesh.auto_rejoin is None  # nothing to rejoin: the mesh never came up
    assert app.return_code == HostError.exit_code


def visible(app, selector: str) -> bool:
    """The widget is displayed and lies entirely on the screen."""
    widget = app.query_one(selector)
    region = widget.region
    screen = app.screen.region
    return widget.display and region.area > 0 and screen.contains_region(region)


async def test_a_default_size_terminal_shows_the_nodes_the_chat_and_the_prompt(build_app):
    app = build_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.chat.ready, what="the mesh")
        await pilot.press(*"hi", "enter")
        await wait_until(pilot, lambda: len(app.chat.messages) == 2, what="reply")
        await wait_until(pilot, lambda: node_row(app, "lab2")[3] == "12.6", what="the compact latencies")
        # compact columns: status, layers and per-token totals; nothing cut at the right edge
        assert [str(c.label) for c in app.nodes_view.query_one("#nodes-table").columns.values()] == [
            "node", "status", "layers", "last ms", "mean", "p95"]
        assert node_row(app, "lab2") == ["lab2", "ready", "25–29+out", "12.6", "11.2", "12.6"]  # 9.8 then 12.6
        assert node_row(app, "head")[3:] == ["—", "—", "—"]
        for selector in ("#nodes-table", "#spark-0", "#spark-2", "#transcript", "#prompt"):
            assert visible(app, selector), selector
        assert app.query_one("#transcript").region.height >= 6  # the chat keeps most of the height
        assert not app.query_one("#nodes-split").display  # the layers column says the same
        await pilot.press("escape", "f4")  # fold the mesh panel to its table
        await pilot.pause()
        assert not app.query_one("#sparks").display and visible(app, "#nodes-table")
        assert app.query_one("#transcript").region.height >= 9
