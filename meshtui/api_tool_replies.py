"""A chat request with tools answered: the constrained reply read back as text or tool calls, whole or streamed.

Streamed, a `response` reply's text goes out as it decodes, and each tool call as OpenAI's deltas while the model
writes it: its id and name once the name is whole, then its arguments' text piece by piece.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from meshtui.api_http import Exchange, end_events, start_events, write_event, write_json
from meshtui.api_replies import Failure
from meshtui.api_reply_texts import reply_texts
from meshtui.api_requests import GenerationRequest
from meshtui.api_shapes import Choice, chat_completion, chunk, usage_chunk
from meshtui.api_tool_calls import CallScanner, partial_response
from meshtui.api_tools import ToolReply, ToolUse, new_call_id, read_reply
from meshtui.errors import MeshError
from meshtui.replies import ReplyQueue


class ToolStreamReader:
    """Reads a constrained reply as it arrives: the deltas that can be sent now, and the whole reply at the end."""

    def __init__(self, use: ToolUse) -> None:
        self.use = use
        self.text = ""
        self.sent = ""  # the response text sent so far
        self.calls = CallScanner()
        self.ids: list[str] = []  # of the calls announced so far

    def feed(self, piece: str) -> list[dict[str, Any]]:
        """The deltas `piece` makes sendable: text of a `response`, or a call's head and then its arguments."""
        self.text += piece
        if not self.use.constrained:
            self.sent += piece
            return [{"content": piece}] if piece else []
        partial = partial_response(self.text)
        if partial is not None:
            new = partial[0][len(self.sent):]
            self.sent = partial[0]
            return [{"content": new}] if new else []
        deltas = []
        for call in self.calls.pieces(self.text):
            if call.name is not None:
                self.ids.append(new_call_id())
                deltas.append({"tool_calls": [{"index": call.index, "id": self.ids[-1], "type": "function",
                                               "function": {"name": call.name, "arguments": ""}}]})
            else:
                deltas.append({"tool_calls": [{"index": call.index, "function": {"arguments": call.arguments}}]})
        return deltas

    def finish(self) -> tuple[ToolReply, list[dict[str, Any]]]:
        """The whole reply, and the deltas still to send (a cut reply's text that `feed` did not send)."""
        reply = read_reply(self.text, self.use, self.ids)
        if reply.content is None or self.ids:
            return reply, []
        rest = reply.content[len(self.sent):] if reply.content.startswith(self.sent) else ""
        return reply, [{"content": rest}] if rest else []


def tool_message(reply: ToolReply) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None}
    if reply.calls:
        message["tool_calls"] = [call.to_json() for call in reply.calls]
    return message


def tool_finish(reply: ToolReply, reason: str) -> str:
    """OpenAI's finish reason: "tool_calls" when the reply is calls (they parse only when the reply is whole)."""
    return "tool_calls" if reply.calls else reason


async def answer_with_tools(gen: GenerationRequest, use: ToolUse, requests: ReplyQueue,
                            writer: asyncio.StreamWriter, x: Exchange, failure: Failure) -> None:
    """Generate the constrained reply `gen` asks for and write it as text or tool calls."""
    x.stream = gen.stream
    seed = gen.seed if gen.seed is not None else secrets.randbelow(2**31)
    reply_id = "chatcmpl-" + secrets.token_hex(12)
    created = int(time.time())
    reader = ToolStreamReader(use)
    params = gen.mesh_params(seed)
    if use.constrained:
        params["sampling"] = {**params.get("sampling", {}), "grammar": use.grammar()}
    async with reply_texts(requests, params, gen.stop, x, failure, "messages") as texts:
        if not gen.stream:
            try:
                async for piece in texts:
                    reader.text += piece
            except MeshError as err:
                raise failure(err, "messages") from err
            reply, _ = reader.finish()
            assert x.finish_reason is not None
            x.finish_reason = tool_finish(reply, x.finish_reason)
            body = chat_completion(gen, reply_id, created, [Choice(0, "", x.finish_reason)], x.usage())
            body["choices"][0]["message"] = tool_message(reply)
            x.status = 200
            await write_json(writer, 200, body)
            return
        x.status = 200
        await start_events(writer)
        await write_event(writer, chunk(gen, reply_id, created, 0, "", role=True))
        try:
            async for piece in texts:
                for delta in reader.feed(piece):
                    await write_event(writer, _delta_chunk(gen, reply_id, created, delta))
        except MeshError as err:  # the status is sent already: the error goes in the stream
            refused = failure(err, "messages")
            x.detail = refused.message
            await write_event(writer, refused.body())
            return
    reply, rest = reader.finish()
    for delta in rest:
        await write_event(writer, _delta_chunk(gen, reply_id, created, delta))
    assert x.finish_reason is not None
    x.finish_reason = tool_finish(reply, x.finish_reason)
    await write_event(writer, chunk(gen, reply_id, created, 0, "", x.finish_reason))
    if gen.include_usage:
        await write_event(writer, usage_chunk(gen, reply_id, created, x.usage()))
    await end_events(writer)


def _delta_chunk(gen: GenerationRequest, reply_id: str, created: int, delta: dict[str, Any]) -> dict[str, Any]:
    sent = chunk(gen, reply_id, created, 0, "")
    sent["choices"][0]["delta"] = delta
    return sent
