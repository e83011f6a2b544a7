"""`meshtui up --api-port`: the TUI serves the OpenAI-compatible API beside its chat, on a real mesh (embedded lab).

The chat pane and the API take turns at the one engine, and every API request shows in the TUI's log panel.
"""

from __future__ import annotations

import asyncio

import openai
import pytest
from pilot_helpers import wait_until
from textual.widgets import RichLog

from meshtui.inventory import ModelSpec
from meshtui.lab import EmbeddedLab
from meshtui.tui.app import ApiOptions, make_app
from meshtui.tui.chat import ChatMessage

pytestmark = [pytest.mark.slow]

KEY = "sk-test-tui"
QUESTION = "What is 2+2?"


def log_lines(app: object) -> list[str]:
    return [strip.text for strip in app.log_panel.query_one(RichLog).lines]  # type: ignore[attr-defined]


async def test_up_serves_the_api_beside_the_chat_taking_turns_and_logs_requests() -> None:
    lab = EmbeddedLab(n_hosts=1)
    await lab.start()
    inventory = lab.inventory(ModelSpec(path=None, name="smollm2", context=512))
    app = make_app(inventory, max_tokens=12, temperature=0.0, api=ApiOptions("127.0.0.1", 0, KEY))
    try:
        async with app.run_test(size=(160, 50)) as pilot:
            await wait_until(pilot, lambda: app.api_server is not None, timeout=240, what="the API to be served")
            assert app.api_server is not None
            url = app.api_server.url
            await pilot.press("f2")  # the log panel (its lines are drawn only while it is shown)
            await wait_until(pilot, lambda: any(f"serving the OpenAI-compatible API on {url}" in line
                                                for line in log_lines(app)), what="the API's log line")
            assert url in app.sub_title

            # A chat reply and an API reply asked at the same moment: one engine, they take turns.
            client = openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=120)
            await pilot.press(*QUESTION, "enter")
            api_call = asyncio.ensure_future(client.chat.completions.create(
                model="meshtui", messages=[{"role": "user", "content": QUESTION}], max_tokens=12, temperature=0))
            await wait_until(pilot, lambda: api_call.done() and len(app.chat.messages) == 2 and not app.chat.streaming,
                             timeout=120, what="both replies")
            chat_text = app.chat.messages[-1]["content"]
            assert chat_text  # the same conversation, greedy: the API answers exactly as the chat pane did
            assert api_call.result().choices[0].message.content == chat_text
            assert "tok/s" in app.chat.query(ChatMessage).last().border_subtitle

            with pytest.raises(openai.AuthenticationError):
                await openai.AsyncOpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
            await wait_until(pilot, lambda: sum("POST /v1/chat/completions 200" in line
                                                for line in log_lines(app)) == 1, what="the request in the log")
            await wait_until(pilot, lambda: any("GET /v1/models 401" in line for line in log_lines(app)),
                             what=f"the refused request in the log: {log_lines(app)[-3:]}")
            await client.close()
            await app.action_quit()
        assert app.requests.active_source is None
        assert app.api_server is not None
        with pytest.raises(OSError):  # the API stopped with the app
            await asyncio.open_connection("127.0.0.1", app.api_server.port)
    finally:
        await app.shutdown_mesh()  # what run_tui does however the app ends
        await lab.close()
