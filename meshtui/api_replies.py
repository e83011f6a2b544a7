"""One generation request answered: the mesh's reply events turned into an OpenAI response, whole or streamed.

Each of the request's `n` choices is a reply of its own, asked of the `ReplyQueue` the chat pane shares (so the
engine decodes them together, up to its sequences), with its own seed (the request's plus its index). What the
wire carries is shaped in `api_shapes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from meshtui import events as ev
from meshtui.api_http import Exchange, end_events, start_events, write_event, write_json
from meshtui.api_openai import ApiError, finish_reason
from meshtui.api_requests import GenerationRequest
from meshtui.api_shapes import Choice, chunk, completion, logprobs_of, usage_chunk
from meshtui.engine.stops import StopText
from meshtui.errors import EngineError, MeshError
from meshtui.replies import ReplyQueue

Failure = Callable[[MeshError, str], ApiError]  # a mesh error as the API reports it, given the param to blame
SEED_RANGE = 2**32 - 1  # llama.cpp's dist sampler takes a uint32; 0xFFFFFFFF there means "a random seed"


@dataclass(frozen=True)
class _Started:
    prompt_tokens: int


@dataclass(frozen=True)
class _Piece:
    text: str
    tokens: tuple[ev.TokenGenerated, ...]  # the tokens that arrived since the last piece


@dataclass(frozen=True)
class _Ended:
    reason: str


_Item = tuple[int, _Started | _Piece | _Ended | MeshError]


@dataclass
class _Progress:
    """What one choice has sent so far (the answer's own, mutable)."""

    text: list[str] = field(default_factory=list)
    tokens: list[ev.TokenGenerated] = field(default_factory=list)
    reason: str | None = None


async def answer(gen: GenerationRequest, requests: ReplyQueue, writer: asyncio.StreamWriter, x: Exchange,
                 failure: Failure) -> None:
    """Generate the `n` choices `gen` asks for and write them; leaving early (client gone) cancels them."""
    x.stream = gen.stream
    param = "messages" if gen.kind == "chat" else "prompt"
    seed = gen.seed if gen.seed is not None else secrets.randbelow(2**31)
    reply_id = ("chatcmpl-" if gen.kind == "chat" else "cmpl-") + secrets.token_hex(12)
    created = int(time.time())
    x.asked = time.perf_counter()
    queue: asyncio.Queue[_Item] = asyncio.Queue()
    tasks = [asyncio.create_task(_choice(i, gen, requests, (seed + i) % SEED_RANGE, queue)) for i in range(gen.n)]
    try:
        early: list[_Item] = []  # what came before every choice started
        started = 0
        while started < gen.n:
            index, item = await queue.get()
            if isinstance(item, MeshError):
                raise failure(item, param) from item
            if isinstance(item, _Started):
                started += 1
                x.prompt_tokens = item.prompt_tokens
            else:
                early.append((index, item))
        progress = [_Progress() for _ in range(gen.n)]
        if gen.stream:
            x.status = 200
            await start_events(writer)
            if gen.kind == "chat":
                for i in range(gen.n):
                    await write_event(writer, chunk(gen, reply_id, created, i, "", role=True))
        items = _items(early, queue, gen.n)
        async for index, item in items:
            if isinstance(item, MeshError):
                refused = failure(item, param)
                if not gen.stream:
                    raise refused from item
                x.detail = refused.message  # the status is sent already: the error goes in the stream
                await write_event(writer, refused.body())
                return
            await _take(gen, x, progress[index], index, item, writer, reply_id, created)
        reasons = [p.reason or "stop" for p in progress]
        x.finish_reason = ",".join(dict.fromkeys(reasons))
        if not gen.stream:
            choices = [Choice(i, "".join(p.text), reasons[i], tuple(p.tokens)) for i, p in enumerate(progress)]
            x.status = 200
            await write_json(writer, 200, completion(gen, reply_id, created, choices, x.usage()))
            return
        if gen.include_usage:
            await write_event(writer, usage_chunk(gen, reply_id, created, x.usage()))
        await end_events(writer)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)


async def _items(early: list[_Item], queue: asyncio.Queue[_Item], n: int) -> AsyncIterator[_Item]:
    """The choices' pieces and ends, in arrival order, until every choice ended (or one failed)."""
    ended = 0
    while ended < n:
        index, item = early.pop(0) if early else await queue.get()
        ended += isinstance(item, _Ended)
        yield index, item
        if isinstance(item, MeshError):
            return


async def _take(gen: GenerationRequest, x: Exchange, progress: _Progress, index: int,
                item: _Piece | _Ended | _Started, writer: asyncio.StreamWriter, reply_id: str, created: int) -> None:
    """Count and keep one item of choice `index`; streaming, send it."""
    if isinstance(item, _Ended):
        progress.reason = item.reason
        if gen.stream:
            await write_event(writer, chunk(gen, reply_id, created, index, "", item.reason))
        return
    if not isinstance(item, _Piece):
        return
    if item.tokens and x.first_token_seconds is None:
        x.first_token_seconds = time.perf_counter() - x.asked
    x.completion_tokens += len(item.tokens)
    offset = len(gen.prompt or "") + sum(len(t) for t in progress.text)
    progress.text.append(item.text)
    progress.tokens.extend(item.tokens)
    if gen.stream and (item.text or gen.logprobs is not None):
        await write_event(writer, chunk(gen, reply_id, created, index, item.text,
                                        logprobs=logprobs_of(gen, item.tokens, offset)))


async def _choice(index: int, gen: GenerationRequest, requests: ReplyQueue, seed: int,
                  queue: asyncio.Queue[_Item]) -> None:
    """One choice's reply, as items on `queue`; leaving (done, stopped, cancelled) ends the reply."""
    scanner = StopText(gen.stop)
    pending: list[ev.TokenGenerated] = []
    try:
        async with contextlib.aclosing(requests.stream(source="api", **gen.mesh_params(seed))) as events:
            async for event in events:
                if isinstance(event, ev.ReplyStarted):
                    queue.put_nowait((index, _Started(event.prompt_tokens)))
                elif isinstance(event, ev.TokenGenerated):
                    if event.token_id >= 0:
                        pending.append(event)
                    piece = scanner.feed(event.text)
                    if piece or (scanner.stopped and pending):
                        queue.put_nowait((index, _Piece(piece, tuple(pending))))
                        pending = []
                    if scanner.stopped:
                        queue.put_nowait((index, _Ended(finish_reason("cancelled", stopped_by_sequence=True))))
                        return
                elif isinstance(event, ev.ReplyFinished):
                    tail = scanner.flush()
                    if tail or pending:
                        queue.put_nowait((index, _Piece(tail, tuple(pending))))
                    queue.put_nowait((index, _Ended(finish_reason(event.stop_reason, stopped_by_sequence=False))))
                    return
        raise EngineError("the engine ended the reply without finishing it")
    except MeshError as err:
        queue.put_nowait((index, err))
