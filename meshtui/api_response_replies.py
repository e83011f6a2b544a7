"""One /v1/responses request answered: the mesh's reply as a response object, whole or as the Responses events.

The stream is OpenAI's sequence: response.created, response.in_progress, response.output_item.added,
response.content_part.added, response.output_text.delta..., response.output_text.done,
response.content_part.done, response.output_item.done, then response.completed (or response.incomplete when
max_output_tokens cut it).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

from meshtui.api_http import Exchange, start_events, write_json
from meshtui.api_replies import Failure
from meshtui.api_reply_texts import reply_texts
from meshtui.api_requests import GenerationRequest
from meshtui.api_responses import (
    ResponseIds,
    ResponsesRequest,
    ResponseStore,
    message_item,
    response_object,
    status_of,
    text_part,
)
from meshtui.errors import MeshError
from meshtui.replies import ReplyQueue


class EventWriter:
    """Server-sent events named by their type, numbered in order (the Responses stream's `sequence_number`)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.sequence = 0

    async def send(self, kind: str, **fields: Any) -> None:
        data = json.dumps({"type": kind, "sequence_number": self.sequence, **fields}, ensure_ascii=False)
        self.sequence += 1
        self.writer.write(f"event: {kind}\ndata: {data}\n\n".encode())
        await self.writer.drain()


async def answer_response(req: ResponsesRequest, gen: GenerationRequest, store: ResponseStore,
                          requests: ReplyQueue, writer: asyncio.StreamWriter, x: Exchange,
                          failure: Failure) -> None:
    """Generate the reply and write it as a response; a stored response's turns are kept for follow-ups."""
    x.stream = gen.stream
    seed = gen.seed if gen.seed is not None else secrets.randbelow(2**31)
    ids = ResponseIds.new(int(time.time()))

    def response(status: str, text: str | None = None) -> dict[str, Any]:
        usage = x.usage() if status != "in_progress" else None
        return response_object(req, ids, gen.model, req.chat, status=status, text=text,
                               usage=usage)

    pieces: list[str] = []
    async with reply_texts(requests, gen.mesh_params(seed), gen.stop, x, failure, "input") as texts:
        if not gen.stream:
            try:
                pieces += [piece async for piece in texts]
            except MeshError as err:
                raise failure(err, "input") from err
            text = "".join(pieces)
            _keep(store, req, ids, text)
            x.status = 200
            await write_json(writer, 200, response(status_of(x.finish_reason), text))
            return
        x.status = 200
        await start_events(writer)
        out = EventWriter(writer)
        where = {"item_id": ids.message, "output_index": 0, "content_index": 0}
        await out.send("response.created", response=response("in_progress"))
        await out.send("response.in_progress", response=response("in_progress"))
        await out.send("response.output_item.added", output_index=0,
                       item=message_item(ids, None, "in_progress"))
        await out.send("response.content_part.added", **where, part=text_part(""))
        try:
            async for piece in texts:
                pieces.append(piece)
                await out.send("response.output_text.delta", **where, delta=piece, logprobs=[])
        except MeshError as err:  # the status is sent already: the error goes in the stream
            refused = failure(err, "input")
            x.detail = refused.message
            await out.send("error", code=refused.code, message=refused.message, param=refused.param)
            return
    text = "".join(pieces)
    status = status_of(x.finish_reason)
    _keep(store, req, ids, text)
    await out.send("response.output_text.done", **where, text=text, logprobs=[])
    await out.send("response.content_part.done", **where, part=text_part(text))
    await out.send("response.output_item.done", output_index=0,
                   item=message_item(ids, text, "incomplete" if status == "incomplete" else "completed"))
    await out.send(f"response.{status}", response=response(status, text))


def _keep(store: ResponseStore, req: ResponsesRequest, ids: ResponseIds, text: str) -> None:
    if req.store:
        store.keep(ids.response, (*req.turns, {"role": "assistant", "content": text}))
