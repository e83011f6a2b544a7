"""The OpenAI wire format's common parts, decided purely: errors, the model served, usage.

No I/O here; `meshtui.api` reads the sockets and drives the mesh. Every rejection is an `ApiError` that
already knows its HTTP status and its OpenAI error body. Requests are parsed in `api_requests`, responses
shaped in `api_shapes`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meshtui.engine.client import ContextOverflow
from meshtui.errors import MeshError

MODEL_ALIAS = "meshtui"
OWNER = "meshtui"


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
    n_vocab: int = 0  # tokens in its vocabulary (0: unknown): a logit_bias may name only these

    @classmethod
    def of(cls, file_name: str, *names: str | None, n_vocab: int = 0) -> ServedModel:
        """The slug of `file_name`; `names` (the inventory's model name, the GGUF's own name) and `meshtui`
        select it too."""
        slug = model_slug(file_name)
        aliases = tuple(dict.fromkeys(n for n in (*names, MODEL_ALIAS) if n and n != slug))
        return cls(slug, aliases, n_vocab)

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
