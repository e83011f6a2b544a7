"""OpenAI's response objects, shaped purely: completions and their chunks, choices, logprobs, usage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meshtui import events as ev
from meshtui.api_openai import ReplyUsage
from meshtui.api_requests import GenerationRequest


@dataclass(frozen=True)
class Choice:
    """One finished choice of a reply: its text, why it ended, and its tokens (for logprobs)."""

    index: int
    text: str
    finish_reason: str
    tokens: tuple[ev.TokenGenerated, ...] = ()


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(tokens: Sequence[ev.TokenGenerated]) -> dict[str, Any]:
    """Chat's choices[].logprobs: one entry per token, with its top alternatives."""
    return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": _bytes(t.text),
                         "top_logprobs": [{"token": text, "logprob": logprob, "bytes": _bytes(text)}
                                          for text, logprob in t.top_logprobs]}
                        for t in tokens],
            "refusal": None}


def completion_logprobs(tokens: Sequence[ev.TokenGenerated], offset: int) -> dict[str, Any]:
    """Completions' choices[].logprobs; `offset` is where the first token's text starts (the prompt's length,
    in characters, as OpenAI and llama-cpp-python count it)."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.text)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top_logprobs) for t in tokens], "text_offset": offsets}


def logprobs_of(request: GenerationRequest, tokens: Sequence[ev.TokenGenerated],
                offset: int) -> dict[str, Any] | None:
    """The logprobs object of a choice (or of a chunk's tokens), in the request's shape; None when not asked."""
    if request.logprobs is None:
        return None
    if request.kind == "chat":
        return chat_logprobs(tokens)
    return completion_logprobs(tokens, offset)


def chat_completion(request: GenerationRequest, reply_id: str, created: int, choices: Sequence[Choice],
                    usage: ReplyUsage) -> dict[str, Any]:
    return {
        "id": reply_id, "object": "chat.completion", "created": created, "model": request.model,
        "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text, "refusal": None},
                     "logprobs": logprobs_of(request, c.tokens, 0), "finish_reason": c.finish_reason}
                    for c in choices],
        "usage": usage.to_json(),
    }


def text_completion(request: GenerationRequest, reply_id: str, created: int, choices: Sequence[Choice],
                    usage: ReplyUsage) -> dict[str, Any]:
    offset = len(request.prompt or "")
    return {
        "id": reply_id, "object": "text_completion", "created": created, "model": request.model,
        "choices": [{"index": c.index, "text": c.text, "logprobs": logprobs_of(request, c.tokens, offset),
                     "finish_reason": c.finish_reason} for c in choices],
        "usage": usage.to_json(),
    }


def completion(request: GenerationRequest, reply_id: str, created: int, choices: Sequence[Choice],
               usage: ReplyUsage) -> dict[str, Any]:
    """The whole reply: a chat.completion or a text_completion."""
    shape = chat_completion if request.kind == "chat" else text_completion
    return shape(request, reply_id, created, sorted(choices, key=lambda c: c.index), usage)


def chunk(request: GenerationRequest, reply_id: str, created: int, index: int, text: str,
          reason: str | None = None, logprobs: dict[str, Any] | None = None,
          role: bool = False) -> dict[str, Any]:
    """One streamed chunk of choice `index`: its new text (chat: a delta; `role` opens the choice)."""
    if request.kind == "completion":
        return {"id": reply_id, "object": "text_completion", "created": created, "model": request.model,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}]}
    delta: dict[str, Any] = {"role": "assistant", "content": text} if role else {"content": text} if text else {}
    return {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": request.model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}


def usage_chunk(request: GenerationRequest, reply_id: str, created: int, usage: ReplyUsage) -> dict[str, Any]:
    """The last chunk of a stream with stream_options.include_usage: no choices, only usage."""
    kind = "chat.completion.chunk" if request.kind == "chat" else "text_completion"
    return {"id": reply_id, "object": kind, "created": created, "model": request.model, "choices": [],
            "usage": usage.to_json()}
