"""The chat pane against a scripted mesh: streaming, stopping, refusing, clearing."""

from __future__ import annotations

from pilot_helpers import wait_until
from textual.widgets import Input

from meshtui.errors import HostError
from meshtui.tui.chat import WAITING_TEXT, ChatMessage

SIZE = (120, 36)


def transcript(app) -> list[tuple[str, str]]:
    return [(m.role, m.text) for m in app.chat.query(ChatMessage)]


async def test_a_reply_streams_in_exactly_and_shows_its_speed(build_app):
    app = build_app(reply=["Hello", " there", "!"], tokens_per_second=42.5)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.chat.ready, what="the mesh")
        assert isinstance(app.focused, Input)
        await pilot.press(*"hi", "enter")
        await wait_until(pilot, lambda: not app.chat.streaming and len(app.chat.messages) == 2, what="reply")
        assert transcript(app) == [("user", "hi"), ("assistant", "Hello there!")]
        reply = app.chat.query(ChatMessage).last()
        assert reply.border_subtitle.startswith("42.5 tok/s · 3 tokens")
        assert app.mesh.stream_calls == [[{"role": "user", "content": "hi"}]]

        await pilot.press(*"again", "enter")  # the second turn carries the whole conversation
        await wait_until(pilot, lambda: len(app.chat.messages) == 4, what="second reply")
        assert app.mesh.stream_calls[-1] == [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello there!"},
            {"role": "user", "content": "again"},
        ]


async def test_escape_stops_a_reply_mid_way_and_a_second_prompt_is_refused(build_app):
    app = build_app(reply=["one", " two", " three", " four"], hold_after=2)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.chat.ready, what="the mesh")
        await pilot.press(*"count", "enter")
        reply = lambda: app.chat.query(ChatMessage).last().text  # noqa: E731
        await wait_until(pilot, lambda: reply() == "one two", what="the first two tokens")
        assert app.chat.streaming
        assert app.chat.border_subtitle == "1 in flight: chat"  # from the core's ReplyStarted(source="chat")

        await pilot.press(*"next", "enter")  # refused while streaming: the text stays in the input
        await pilot.pause()
        assert app.query_one("#prompt", Input).value == "next"
        assert len(app.mesh.stream_calls) == 1
        assert any("still streaming" in str(n.message) for n in app._notifications)

        await pilot.press("escape")
        await wait_until(pilot, lambda: not app.chat.streaming, what="the reply to stop")
        assert app.mesh.cancelled
        assert reply() == "one two"
        assert app.chat.query(ChatMessage).last().border_subtitle.endswith("stopped")
        assert app.chat.messages[-1] == {"role": "assistant", "content": "one two"}
        await wait_until(pilot, lambda: app.chat.border_subtitle == "", what="nothing in flight")


async def test_ctrl_l_clears_the_conversation(build_app):
    app = build_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.chat.ready, what="the mesh")
        await pilot.press(*"hi", "enter")
        await wait_until(pilot, lambda: len(app.chat.messages) == 2, what="reply")
        await pilot.press("ctrl+l")
        await pilot.pause()
        assert app.chat.messages == []
        assert transcript(app) == []
        await pilot.press(*"fresh", "enter")
        await wait_until(pilot, lambda: len(app.chat.messages) == 2, what="reply after clearing")
        assert app.mesh.stream_calls[-1] == [{"role": "user", "content": "fresh"}]


async def test_quitting_mid_reply_stops_it_and_tears_the_mesh_down(build_app):
    app = build_app(reply=["one", " two", " three"], hold_after=1)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.chat.ready, what="the mesh")
        await pilot.press(*"count", "enter")
        await wait_until(pilot, lambda: app.chat.query(ChatMessage).last().text == "one", what="a token")
        await pilot.press("ctrl+c")
        await wait_until(pilot, lambda: not app.is_running, what="quit")
    assert app.mesh.cancelled and app.mesh.closed


async def test_a_stream_that_breaks_ends_the_turn_with_the_error(build_app):
    app = build_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.chat.ready, what="the mesh")

        async def broken_stream(**kwargs):
            raise RuntimeError("boom")
            yield  # an async generator that fails on first use

        app.mesh.stream = broken_stream
        await pilot.press(*"hi", "enter")
        await wait_until(pilot, lambda: not app.chat.streaming, what="the turn to end")
        roles = [m.role for m in app.chat.query(ChatMessage)]
        assert roles == ["user", "assistant", "error"]
        assert "RuntimeError: boom" in app.chat.query(ChatMessage).last().text
        del app.mesh.stream  # the scripted stream again
        await pilot.press(*"again", "enter")  # the chat is usable again; the failed prompt left the history
        await wait_until(pilot, lambda: len(app.chat.messages) == 2, what="retry")
        assert app.mesh.stream_calls == [[{"role": "user", "content": "again"}]]


async def test_a_prompt_waits_behind_an_api_reply_and_escape_withdraws_it(build_app):
    app = build_app(reply=["one", " two", " three"], hold_after=1)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.chat.ready, what="the mesh")
        api_events: list[object] = []

        async def api_reply() -> None:  # what the API does with the queue the chat pane shares
            async for event in app.requests.stream(source="api", messages=[{"role": "user", "content": "x"}]):
                api_events.append(event)

        api = app.run_worker(api_reply(), group="test-api")
        await wait_until(pilot, lambda: app.requests.active_source == "api", what="the API's reply")
        await pilot.press(*"mine", "enter")
        await wait_until(pilot, lambda: app.requests.waiting == 1, what="the chat to queue")
        assert app.chat.streaming and len(app.mesh.stream_calls) == 1  # not sent to the mesh yet

        await pilot.press("escape")
        await wait_until(pilot, lambda: not app.chat.streaming, what="the queued prompt to be withdrawn")
        assert "stopped before it started" in app.chat.query_one("#chat-status").render().plain
        assert app.requests.active_source == "api" and not app.mesh.cancelled  # the API's reply goes on

        app.mesh.cancel()  # release the held reply
        await api.wait()
        assert len(app.mesh.stream_calls) == 1  # the withdrawn prompt never reached the engine
        assert app.requests.waiting == 0


async def test_an_api_port_already_taken_is_reported_and_the_chat_still_works(build_app):
    import socket

    from meshtui.tui.app import ApiOptions

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    app = build_app(reply=["fine"])
    app.api_options = ApiOptions("127.0.0.1", port, None)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await wait_until(pilot, lambda: app.chat.ready, what="the mesh")
            await wait_until(pilot, lambda: any("API not served" in str(n.title) for n in app._notifications),
                             what="the notice")
            notice = next(n for n in app._notifications if "API not served" in str(n.title))
            assert f"cannot serve the API on 127.0.0.1:{port}" in str(notice.message)
            assert app.api_server is None
            await pilot.press(*"hi", "enter")
            await wait_until(pilot, lambda: len(app.chat.messages) == 2, what="the chat's reply")
            assert app.chat.messages[-1]["content"] == "fine"
    finally:
        taken.close()


async def test_a_prompt_typed_while_the_mesh_comes_up_is_kept_shown_waiting_and_sent_when_ready(build_app):
    app = build_app(hold_up=True, reply=["Hi", "!"])
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.mesh.head.status == "ready", what="the bring-up up to its last step")
        assert not app.chat.ready and isinstance(app.focused, Input)  # typing goes to the prompt at once
        await pilot.press(*"early", "enter")
        await wait_until(pilot, lambda: len(transcript(app)) == 2, what="the kept prompt")
        assert transcript(app) == [("user", "early"), ("assistant", WAITING_TEXT)]
        assert app.chat.query(ChatMessage).last().border_subtitle == "waiting"
        assert app.chat.waiting and app.mesh.stream_calls == []
        status = app.chat.query_one("#chat-status").render().plain
        assert status == "the mesh is coming up · the prompt is sent when it is ready · Esc withdraws it"

        await pilot.press(*"more", "enter")  # one prompt waits at a time; this one stays in the input
        await pilot.pause()
        assert app.query_one("#prompt", Input).value == "more"
        assert any("already waiting for the mesh" in str(n.message) for n in app._notifications)

        app.mesh.release_up.set()  # the core reports MeshReady: the kept prompt goes out
        await wait_until(pilot, lambda: len(app.chat.messages) == 2, what="the kept prompt's reply")
        assert app.mesh.stream_calls == [[{"role": "user", "content": "early"}]]
        assert transcript(app) == [("user", "early"), ("assistant", "Hi!")]
        assert not app.chat.query(ChatMessage).last().has_class("-waiting")


async def test_escape_withdraws_a_prompt_waiting_for_the_mesh(build_app):
    app = build_app(hold_up=True)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.mesh.head.status == "ready", what="the bring-up up to its last step")
        await pilot.press(*"early", "enter")
        await wait_until(pilot, lambda: app.chat.waiting, what="the kept prompt")
        await pilot.press("escape")
        await wait_until(pilot, lambda: not app.chat.streaming, what="the prompt to be withdrawn")
        assert transcript(app)[-1] == ("error", "withdrawn before the mesh was ready")
        assert app.chat.messages == []
        app.mesh.release_up.set()
        await wait_until(pilot, lambda: app.chat.ready, what="the mesh")
        await pilot.pause()
        assert app.mesh.stream_calls == []  # never sent


async def test_a_waiting_prompt_fails_with_the_reason_when_the_mesh_does_not_come_up(build_app):
    app = build_app(hold_up=True, until="push", fail_up=HostError("disk full while pushing the runtime", host="lab2"))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.mesh.node("lab2").status == "push", what="the push")
        await pilot.press(*"early", "enter")
        await wait_until(pilot, lambda: app.chat.waiting, what="the kept prompt")
        app.mesh.release_up.set()
        await wait_until(pilot, lambda: not app.chat.streaming, what="the waiting prompt to fail")
        assert transcript(app)[-1] == ("error", "not sent: the mesh did not come up: "
                                                "lab2: disk full while pushing the runtime")
        assert app.query_one("#prompt", Input).disabled
        assert app.chat.messages == []
