"""The OpenAI wire format, decided purely: request bodies in, generation requests and response objects out.

No I/O here; `meshtui.api` reads the sockets and drives the mesh. Every rejection is an `ApiError` that
already knows its HTTP status and its OpenAI error body.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshtui.engine.client import ContextOverflow
from meshtui.errors import MeshError

MODEL_ALIAS = "meshtui"
OWNER = "meshtui"
MAX_STOP_SEQUENCES = 4
_ROLES = {"system", "user", "assistant", "tool", "developer"}


class ApiError(MeshError):
    """A request the API answers with an error: the HTTP status and the OpenAI error body it becomes."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = tuple(headers)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def context_overflow(err: MeshError, param: str) -> ApiError | None:
    """The engine's typed context overflow as OpenAI's context_length_exceeded."""
    if not isinstance(err, ContextOverflow):
        return None
    return ApiError(400, f"This model's maximum context length is {err.context} tokens. However, your request has "
                         f"{err.prompt_tokens} prompt tokens. Please reduce the length of the {param}.",
                    code="context_length_exceeded", param=param)


@dataclass(frozen=True)
class GenerationRequest:
    """One validated /v1/chat/completions or /v1/completions request."""

    kind: str  # "chat" | "completion"
    model: str
    max_tokens: int
    temperature: float
    seed: int | None
    stream: bool
    include_usage: bool
    stop: tuple[str, ...] = ()
    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None

    def mesh_params(self, seed: int) -> dict[str, Any]:
        """Keyword arguments for `Mesh.stream`: chat applies the model's template, completions go raw."""
        params: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": self.temperature,
                                  "seed": seed}
        if self.messages is not None:
            params["messages"] = [dict(m) for m in self.messages]
        else:
            params["prompt"] = self.prompt or ""
            params["raw"] = True
        return params


# A quantisation or shard tag at the end of a GGUF file's name: not part of what a client calls the model.
_FILE_TAGS = re.compile(r"([.-](i?q\d\w*|f16|f32|bf16|fp16|\d{5}-of-\d{5}))+$", re.IGNORECASE)


def model_slug(file_name: str) -> str:
    """The id a client configured by hand types: the GGUF file's name, lower-case, without quantisation tag or
    extension, runs of anything but letters, digits and dots as one "-" (`SmolLM2-135M-Instruct.Q4_1.gguf` is
    `smollm2-135m-instruct`)."""
    stem = file_name[:-5] if file_name.lower().endswith(".gguf") else file_name
    stem = _FILE_TAGS.sub("", stem) or stem
    slug = re.sub(r"[^a-z0-9.]+", "-", stem.lower()).strip("-.")
    return slug or MODEL_ALIAS


@dataclass(frozen=True)
class ServedModel:
    """The one model served: its id (the file's slug) and every other name that selects it."""

    id: str
    aliases: tuple[str, ...] = ()

    @classmethod
    def of(cls, file_name: str, *names: str | None) -> ServedModel:
        """The slug of `file_name`; `names` (the inventory's model name, the GGUF's own name) and `meshtui`
        select it too."""
        slug = model_slug(file_name)
        aliases = tuple(dict.fromkeys(n for n in (*names, MODEL_ALIAS) if n and n != slug))
        return cls(slug, aliases)

    def selects(self, requested: str) -> bool:
        return requested == self.id or requested in self.aliases

    def described(self) -> str:
        others = ", ".join(f"`{a}`" for a in self.aliases)
        return f"`{self.id}`" + (f" (also {others})" if others else "")


def model_object(model: ServedModel, created: int) -> dict[str, Any]:
    return {"id": model.id, "object": "model", "created": created, "owned_by": OWNER}


def model_not_found(requested: str, model: ServedModel) -> ApiError:
    return ApiError(404, f"The model `{requested}` does not exist; this mesh serves {model.described()}.",
                    code="model_not_found", param="model")


def check_model(requested: Any, model: ServedModel) -> str:
    """The model the request names must be the one loaded (by its id or an alias); none named means that one.
    Replies name the model by its id, whichever name selected it."""
    if requested is None:
        return model.id
    if not isinstance(requested, str):
        raise ApiError(400, "'model' must be a string", param="model")
    if not model.selects(requested):
        raise model_not_found(requested, model)
    return model.id


def parse_chat_request(body: Any, model: ServedModel, default_max_tokens: int) -> GenerationRequest:
    body = _object(body)
    if "messages" not in body:
        raise ApiError(400, "Missing required parameter: 'messages'.", param="messages")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    parsed = tuple(_message(m, i) for i, m in enumerate(messages))
    max_tokens = _optional_int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _optional_int(body, "max_tokens", 1)
    return GenerationRequest(kind="chat", messages=parsed, **_sampling(body, model, max_tokens,
                                                                       default_max_tokens))


def parse_completion_request(body: Any, model: ServedModel, default_max_tokens: int) -> GenerationRequest:
    body = _object(body)
    if "prompt" not in body:
        raise ApiError(400, "Missing required parameter: 'prompt'.", param="prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (one prompt per request)", param="prompt")
    for name in ("suffix", "logprobs"):
        if body.get(name) is not None:
            raise ApiError(400, f"'{name}' is not supported", param=name)
    if body.get("echo"):
        raise ApiError(400, "'echo' is not supported", param="echo")
    max_tokens = _optional_int(body, "max_tokens", 1)
    if max_tokens is None:
        max_tokens = 16  # OpenAI's default for completions
    return GenerationRequest(kind="completion", prompt=prompt, **_sampling(body, model, max_tokens,
                                                                           default_max_tokens))


def _sampling(body: Mapping[str, Any], served: ServedModel, max_tokens: int | None,
              default_max_tokens: int) -> dict[str, Any]:
    model = check_model(body.get("model"), served)
    temperature = body.get("temperature")
    if temperature is None:
        temperature = 1.0
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not 0 <= temperature <= 2):
        raise ApiError(400, "'temperature' must be a number from 0 to 2", param="temperature")
    n = _optional_int(body, "n", 1)
    if n not in (None, 1):
        raise ApiError(400, "only n=1 is supported: send the request n times (they are generated together)", param="n")
    if body.get("tools"):
        raise ApiError(400, "'tools' are not supported", param="tools")
    if body.get("logprobs"):
        raise ApiError(400, "'logprobs' is not supported", param="logprobs")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    return {
        "model": model,
        "max_tokens": max_tokens if max_tokens is not None else default_max_tokens,
        "temperature": float(temperature),
        "seed": _optional_int(body, "seed", None),
        "stream": stream,
        "include_usage": stream and bool(options.get("include_usage")),
        "stop": _stop(body.get("stop")),
    }


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _optional_int(body: Mapping[str, Any], name: str, minimum: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise ApiError(400, f"'{name}' must be an integer" + (f" of at least {minimum}" if minimum else ""),
                       param=name)
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES
            or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, f"'stop' must be a non-empty string or up to {MAX_STOP_SEQUENCES} of them",
                       param="stop")
    return tuple(stops)


def _message(message: Any, index: int) -> dict[str, str]:
    param = f"messages.[{index}]"
    if not isinstance(message, dict):
        raise ApiError(400, f"{param} must be an object", param=param)
    role = message.get("role")
    if role not in _ROLES:
        raise ApiError(400, f"{param}.role must be one of {', '.join(sorted(_ROLES))}", param=f"{param}.role")
    content = _content(message.get("content"), param)
    return {"role": "system" if role == "developer" else role, "content": content}


def _content(content: Any, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
            if not isinstance(text, str):
                raise ApiError(400, f"{param}.content: only text parts are supported",
                               param=f"{param}.content")
            texts.append(text)
        return "".join(texts)
    raise ApiError(400, f"{param}.content must be a string or an array of text parts",
                   param=f"{param}.content")


class StopScanner:
    """Cuts generated text at the first stop sequence; holds back only what could still begin one."""

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = tuple(stops)
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The text that is safe to send now; sets `stopped` when a stop sequence has appeared."""
        if self.stopped:
            return ""
        buffer = self.held + text
        cuts = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped = True
            self.held = ""
            return buffer[:min(cuts)]
        keep = next((k for k in range(min(len(buffer), max((len(s) for s in self.stops), default=0)), 0, -1)
                     if any(s.startswith(buffer[-k:]) for s in self.stops)), 0)
        self.held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


def finish_reason(stop_reason: str, stopped_by_sequence: bool) -> str:
    """The engine's stop reason as OpenAI's: "stop" or "length" (a cancelled reply ended early: "stop")."""
    if stopped_by_sequence:
        return "stop"
    return "length" if stop_reason == "length" else "stop"


@dataclass(frozen=True)
class ReplyUsage:
    """One request's own counts: its tokens, and how long its client waited for the first one (queue included)."""

    prompt_tokens: int
    completion_tokens: int
    first_token_seconds: float | None = None  # None: no token came

    def to_json(self) -> dict[str, Any]:
        """OpenAI's usage object, and `time_to_first_token_seconds` (clients ignore fields they do not know)."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "time_to_first_token_seconds": (round(self.first_token_seconds, 4)
                                                if self.first_token_seconds is not None else None)}


def chat_completion(reply_id: str, created: int, model: str, text: str, reason: str,
                    usage: ReplyUsage) -> dict[str, Any]:
    return {
        "id": reply_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": reason}],
        "usage": usage.to_json(),
    }


def chat_chunk(reply_id: str, created: int, model: str, delta: dict[str, Any],
               reason: str | None = None) -> dict[str, Any]:
    return {
        "id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
    }


def text_completion(reply_id: str, created: int, model: str, text: str, reason: str | None,
                    usage: ReplyUsage | None = None) -> dict[str, Any]:
    """A text_completion object; without usage it is one streamed chunk."""
    obj: dict[str, Any] = {
        "id": reply_id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
    }
    if usage is not None:
        obj["usage"] = usage.to_json()
    return obj


def usage_chunk(request: GenerationRequest, reply_id: str, created: int, usage: ReplyUsage) -> dict[str, Any]:
    """The last chunk of a stream with stream_options.include_usage: no choices, only usage."""
    kind = "chat.completion.chunk" if request.kind == "chat" else "text_completion"
    return {"id": reply_id, "object": kind, "created": created, "model": request.model, "choices": [],
            "usage": usage.to_json()}
