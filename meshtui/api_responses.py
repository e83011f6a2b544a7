"""The Responses API (`/v1/responses`), decided purely: a request as the chat turns it means, and the response
objects and stream events it is answered with.

A request becomes a chat request (`instructions` as the system turn, the earlier response's turns first when
`previous_response_id` names one), so sampling is checked and applied in one place (`api_openai`). Responses are
kept in memory while the server runs (`ResponseStore`, bounded, least recently used out) for follow-ups.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshtui.api_openai import ApiError, ReplyUsage

# Fields served; any other field a client sends is refused by name.
SUPPORTED = ("model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream",
             "previous_response_id", "store", "metadata")
_INPUT_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
_TEXT_PARTS = ("input_text", "output_text", "text")
MAX_STORED = 256


@dataclass(frozen=True)
class ResponsesRequest:
    """One /v1/responses request: the chat body it amounts to, and what the response object repeats back."""

    chat: dict[str, Any]  # a /v1/chat/completions body (messages with the earlier turns and instructions)
    turns: tuple[dict[str, str], ...]  # this conversation's turns so far, without instructions (kept for follow-ups)
    instructions: str | None
    previous_response_id: str | None
    store: bool
    metadata: dict[str, str]


def parse_responses_request(body: Any, store: ResponseStore) -> ResponsesRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for key in body:
        if key not in SUPPORTED:
            raise ApiError(400, f"'{key}' is not supported on /v1/responses (served: {', '.join(SUPPORTED)})",
                           param=key)
    if "input" not in body:
        raise ApiError(400, "Missing required parameter: 'input'.", param="input")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise ApiError(400, "'instructions' must be a string", param="instructions")
    previous = body.get("previous_response_id")
    earlier: tuple[dict[str, str], ...] = ()
    if previous is not None:
        if not isinstance(previous, str):
            raise ApiError(400, "'previous_response_id' must be a string", param="previous_response_id")
        earlier = store.turns(previous)
    keep = body.get("store", True)
    if not isinstance(keep, bool):
        raise ApiError(400, "'store' must be a boolean", param="store")
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ApiError(400, "'metadata' must be an object of strings", param="metadata")
    turns = earlier + _input_turns(body["input"])
    system = ({"role": "system", "content": instructions},) if instructions else ()
    chat: dict[str, Any] = {"messages": [dict(t) for t in system + turns]}
    for name, chat_name in (("model", "model"), ("max_output_tokens", "max_completion_tokens"),
                            ("temperature", "temperature"), ("top_p", "top_p"), ("stream", "stream")):
        if body.get(name) is not None:
            chat[chat_name] = body[name]
    return ResponsesRequest(chat, turns, instructions, previous, keep, dict(metadata))


def _input_turns(value: Any) -> tuple[dict[str, str], ...]:
    if isinstance(value, str):
        return ({"role": "user", "content": value},)
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'input' must be a string or a non-empty array of messages", param="input")
    turns = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"{where} must be a message object", param=where)
        kind = item.get("type", "message")
        if kind != "message":
            raise ApiError(400, f"{where}.type '{kind}' is not supported (only messages are served)",
                           param=f"{where}.type")
        role = _INPUT_ROLES.get(item.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise ApiError(400, f"{where}.role must be one of {', '.join(_INPUT_ROLES)}", param=f"{where}.role")
        for key in item:
            if key not in ("type", "role", "content", "id", "status"):
                raise ApiError(400, f"{where}.{key} is not supported", param=f"{where}.{key}")
        turns.append({"role": role, "content": _input_text(item.get("content"), where)})
    return tuple(turns)


def _input_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or an array of text parts", param=f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        text = part.get("text") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(text, str):
            raise ApiError(400, f"{where}.content[{j}]: only text parts ({', '.join(_TEXT_PARTS[:2])}) are "
                                f"supported", param=f"{where}.content[{j}]")
        texts.append(text)
    return "".join(texts)


class ResponseStore:
    """Responses kept for `previous_response_id` while the server runs: at most `limit`, least recently used out."""

    def __init__(self, limit: int = MAX_STORED) -> None:
        self.limit = limit
        self._turns: OrderedDict[str, tuple[dict[str, str], ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._turns)

    def keep(self, response_id: str, turns: tuple[dict[str, str], ...]) -> None:
        self._turns[response_id] = turns
        self._turns.move_to_end(response_id)
        while len(self._turns) > self.limit:
            self._turns.popitem(last=False)

    def turns(self, response_id: str) -> tuple[dict[str, str], ...]:
        """The conversation up to and including that response; an id not kept (never, or no longer) is a 404."""
        found = self._turns.get(response_id)
        if found is None:
            raise ApiError(404, f"Previous response with id '{response_id}' not found.",
                           code="previous_response_not_found", param="previous_response_id")
        self._turns.move_to_end(response_id)
        return found


# -- what is sent back ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResponseIds:
    response: str
    message: str
    created: int

    @classmethod
    def new(cls, created: int) -> ResponseIds:
        return cls("resp_" + secrets.token_hex(16), "msg_" + secrets.token_hex(16), created)


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(ids: ResponseIds, text: str | None, status: str) -> dict[str, Any]:
    """The one output item: the assistant's message (no content part yet while it is only announced)."""
    return {"type": "message", "id": ids.message, "status": status, "role": "assistant",
            "content": [] if text is None else [text_part(text)]}


def response_object(req: ResponsesRequest, ids: ResponseIds, model: str, chat: Mapping[str, Any], *,
                    status: str, text: str | None = None, usage: ReplyUsage | None = None) -> dict[str, Any]:
    """The response object: `in_progress` (no output yet), `completed`, or `incomplete` (max_output_tokens)."""
    incomplete = status == "incomplete"
    output = [] if text is None else [message_item(ids, text, "incomplete" if incomplete else "completed")]
    return {
        "id": ids.response, "object": "response", "created_at": ids.created, "status": status,
        "model": model, "output": output, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": req.instructions, "max_output_tokens": chat.get("max_completion_tokens"),
        "temperature": chat.get("temperature", 1.0), "top_p": chat.get("top_p", 1.0),
        "previous_response_id": req.previous_response_id, "store": req.store, "metadata": req.metadata,
        "parallel_tool_calls": False, "tool_choice": "none", "tools": [], "text": {"format": {"type": "text"}},
        "truncation": "disabled", "usage": None if usage is None else usage_object(usage),
    }


def usage_object(usage: ReplyUsage) -> dict[str, Any]:
    return {"input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def status_of(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def embeddings_refused() -> ApiError:
    """Why /v1/embeddings is not served: the engine's one context generates, with the mesh's stages in it."""
    return ApiError(400, "Embeddings are not served: the engine holds one llama.cpp context, made for generation "
                         "(embeddings off, no pooling) across the mesh's stages; pooled embeddings would need a "
                         "second context over the same remote layers, which the engine does not run.",
                    code="embeddings_not_supported", param="model")
