"""Request bodies of /v1/chat/completions and /v1/completions as typed requests, decided purely.

Every field either takes effect or is refused with a 400 naming it: a field not in `CHAT_FIELDS` /
`COMPLETION_FIELDS` is refused, whatever its value (null counts as absent, as OpenAI treats it). A route that
reads more fields (tools) adds them to its own set and parses them after `parse_chat_request`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meshtui.api_grammar import ResponseFormat, parse_response_format
from meshtui.api_openai import ApiError, ServedModel, check_model

MAX_STOP_SEQUENCES = 4
MAX_CHOICES = 16  # n: the choices of one request are decoded together, each its own sequence
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs (OpenAI's limit)
MAX_COMPLETION_LOGPROBS = 5  # completions' logprobs (OpenAI's limit)
_ROLES = {"system", "user", "assistant", "tool", "developer"}

# The fields each route reads. top_k, min_p and repeat_penalty are llama.cpp's own (its server takes them too).
_COMMON = frozenset({
    "model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty",
    "frequency_penalty", "logit_bias", "seed", "stop", "stream", "stream_options", "n", "response_format",
})
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo", "suffix", "best_of"}


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
    messages: tuple[dict[str, Any], ...] | None = None
    prompt: str | None = None
    n: int = 1
    logprobs: int | None = None  # None: none; N: each token's logprob and its N most likely alternatives
    response_format: ResponseFormat = ResponseFormat("text")
    sampling: Mapping[str, Any] = field(default_factory=dict)  # more of the engine's Generate fields

    @property
    def features(self) -> tuple[str, ...]:
        """What the request used beyond plain text, for the request log."""
        used = [f"response_format={self.response_format.type}"] if self.response_format.grammar else []
        used += [f"n={self.n}"] if self.n > 1 else []
        used += ["logprobs"] if self.logprobs is not None else []
        used += sorted(k for k in self.sampling if k not in ("grammar", "logprobs"))
        return tuple(used)

    def mesh_params(self, seed: int) -> dict[str, Any]:
        """Keyword arguments for `Mesh.stream`: chat applies the model's template, completions go raw."""
        params: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": self.temperature,
                                  "seed": seed}
        if self.messages is not None:
            params["messages"] = [dict(m) for m in self.messages]
        else:
            params["prompt"] = self.prompt or ""
            params["raw"] = True
        sampling = dict(self.sampling)
        if self.response_format.grammar is not None:
            sampling["grammar"] = self.response_format.grammar
        if self.logprobs is not None:
            sampling["logprobs"] = self.logprobs
        if sampling:
            params["sampling"] = sampling
        return params


def present(body: Mapping[str, Any]) -> dict[str, Any]:
    """The fields given a value: OpenAI treats null as absent."""
    return {k: v for k, v in body.items() if v is not None}


def refuse_unknown(body: Mapping[str, Any], known: frozenset[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise ApiError(400, f"'{unknown[0]}' is not supported", param=unknown[0])


def parse_chat_request(body: Any, model: ServedModel, default_max_tokens: int,
                       known: frozenset[str] = CHAT_FIELDS) -> GenerationRequest:
    """A chat request; `known` is the set of fields the caller reads (a route with tools passes a larger one)."""
    body = present(_object(body))
    refuse_unknown(body, known)
    if "messages" not in body:
        raise ApiError(400, "Missing required parameter: 'messages'.", param="messages")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    parsed = tuple(_message(m, i) for i, m in enumerate(messages))
    max_tokens = _optional_int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _optional_int(body, "max_tokens", 1)
    logprobs = body.get("logprobs", False)
    if not isinstance(logprobs, bool):
        raise ApiError(400, "'logprobs' must be a boolean", param="logprobs")
    top = _optional_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return GenerationRequest(kind="chat", messages=parsed, logprobs=(top or 0) if logprobs else None,
                             **_sampling(body, model, max_tokens, default_max_tokens))


def parse_completion_request(body: Any, model: ServedModel, default_max_tokens: int) -> GenerationRequest:
    body = present(_object(body))
    refuse_unknown(body, COMPLETION_FIELDS)
    if "prompt" not in body:
        raise ApiError(400, "Missing required parameter: 'prompt'.", param="prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (one prompt per request)", param="prompt")
    if body.get("suffix") not in (None, ""):
        raise ApiError(400, "'suffix' is not supported (no fill-in-the-middle)", param="suffix")
    if body.get("echo") not in (None, False):
        raise ApiError(400, "'echo' is not supported", param="echo")
    sampling = _sampling(body, model, _optional_int(body, "max_tokens", 1) or 16,  # OpenAI's default: 16
                         default_max_tokens)
    if _optional_int(body, "best_of", 1) not in (None, sampling["n"]):
        raise ApiError(400, "'best_of' is not supported (only best_of equal to n)", param="best_of")
    return GenerationRequest(kind="completion", prompt=prompt,
                             logprobs=_optional_int(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS), **sampling)


def _sampling(body: Mapping[str, Any], served: ServedModel, max_tokens: int | None,
              default_max_tokens: int) -> dict[str, Any]:
    model = check_model(body.get("model"), served)
    temperature = _number(body, "temperature", 0, 2)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream")
    options = body.get("stream_options", {})
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    refuse_unknown({f"stream_options.{k}": v for k, v in present(options).items()},
                   frozenset({"stream_options.include_usage"}))
    if not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, "'stream_options.include_usage' must be a boolean", param="stream_options.include_usage")
    engine: dict[str, Any] = {}
    for name, low, high in (("top_p", 0, 1), ("min_p", 0, 1), ("presence_penalty", -2, 2),
                            ("frequency_penalty", -2, 2), ("repeat_penalty", 0, 10)):
        value = _number(body, name, low, high)
        if value is not None:
            engine[name] = value
    if engine.get("repeat_penalty") == 0:
        raise ApiError(400, "'repeat_penalty' must be above 0 (1 is none)", param="repeat_penalty")
    top_k = _optional_int(body, "top_k", 0)
    if top_k is not None:
        engine["top_k"] = top_k
    if "logit_bias" in body:
        engine["logit_bias"] = _logit_bias(body["logit_bias"], served.n_vocab)
    return {
        "model": model,
        "max_tokens": max_tokens if max_tokens is not None else default_max_tokens,
        "temperature": 1.0 if temperature is None else temperature,
        "seed": _optional_int(body, "seed", None),
        "stream": stream,
        "include_usage": stream and bool(options.get("include_usage")),
        "stop": _stop(body.get("stop")),
        "n": _optional_int(body, "n", 1, MAX_CHOICES) or 1,
        "response_format": parse_response_format(body.get("response_format")),
        "sampling": engine,
    }


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _optional_int(body: Mapping[str, Any], name: str, minimum: int | None,
                  maximum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum)
            or (maximum is not None and value > maximum)):
        bounds = (f" from {minimum} to {maximum}" if maximum is not None
                  else f" of at least {minimum}" if minimum else "")
        raise ApiError(400, f"'{name}' must be an integer{bounds}", param=name)
    return value


def _number(body: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"'{name}' must be a number from {low} to {high}", param=name)
    return float(value)


def _logit_bias(value: Any, n_vocab: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias from -100 to 100}; an id outside the vocabulary is refused by name."""
    if not isinstance(value, dict):
        raise ApiError(400, "'logit_bias' must be an object of token ids to numbers", param="logit_bias")
    biases = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise ApiError(400, f"'logit_bias' key {key!r} is not a token id", param="logit_bias")
        token = int(key)
        if n_vocab and token >= n_vocab:
            raise ApiError(400, f"'logit_bias' token {token} is not in the vocabulary (0 to {n_vocab - 1})",
                           param="logit_bias")
        if (isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias)
                or not -100 <= bias <= 100):
            raise ApiError(400, f"'logit_bias' of token {token} must be a number from -100 to 100",
                           param="logit_bias")
        biases.append((token, float(bias)))
    return tuple(biases)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES
            or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, f"'stop' must be a non-empty string or up to {MAX_STOP_SEQUENCES} of them",
                       param="stop")
    return tuple(stops)


def _message(message: Any, index: int) -> dict[str, Any]:
    param = f"messages.[{index}]"
    if not isinstance(message, dict):
        raise ApiError(400, f"{param} must be an object", param=param)
    role = message.get("role")
    if role not in _ROLES:
        raise ApiError(400, f"{param}.role must be one of {', '.join(sorted(_ROLES))}", param=f"{param}.role")
    unknown = sorted(set(present(message)) - {"role", "content"})
    if unknown:
        raise ApiError(400, f"{param}.{unknown[0]} is not supported", param=f"{param}.{unknown[0]}")
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
