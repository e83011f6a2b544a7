"""The engine process's wire contract: its commands and events as types, with the one encoder and decoder.

The worker (`meshtui.engine.worker`) reads commands and writes events as JSON lines; the client
(`meshtui.engine.client`) writes commands and reads events. Both go through `encode` and `decode_*` here,
so a field is named once and nobody matches on `event["ev"]`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# -- commands (client -> worker) ------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    model: str
    context: int
    endpoints: tuple[str, ...] = ()
    tensor_split: tuple[float, ...] = ()
    n_gpu_layers: int = 0
    threads: int | None = None
    batch: int = 512
    seed: int = 0
    parallel: int = 1  # sequences the engine decodes together; `context` is each one's (n_ctx = context x parallel)
    draft_model: str | None = None  # a GGUF with the model's vocabulary, run on the head's CPU to draft tokens
    step_ms: tuple[float, ...] = ()  # steps of 1, 2, ... positions as an earlier load timed them (drafting's prices)


@dataclass(frozen=True)
class Generate:
    id: int
    prompt: str | None = None  # raw text, or one user turn when `messages` is None and `raw` is false
    messages: tuple[Mapping[str, str], ...] | None = None
    raw: bool = False
    max_tokens: int = 256
    temperature: float = 0.7
    seed: int = 0
    resume_tokens: tuple[int, ...] = ()  # tokens of this reply generated before a stage was lost
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    speculative: str = "auto"  # "auto" | "ngram" | "draft" | "off": which drafts the mesh verifies in one step
    draft_length: int = 0  # 0: the draft length adapts; N: always draft up to N tokens (references, benches)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    grammar: str | None = None  # GBNF text, root rule `root`: the reply must match it
    logprobs: int | None = None  # None: none; N: the sampled token's logprob and the N most likely alternatives
    stop: tuple[str, ...] = ()  # stop strings: the reply ends before the first one it contains


SPECULATIVE_MODES = ("auto", "ngram", "draft", "off")


@dataclass(frozen=True)
class Calibrate:
    """Time steps of 1 to `positions` positions, for the drafting policy (`Calibrated`); with no request in flight."""

    positions: int


@dataclass(frozen=True)
class Cancel:
    id: int | None = None  # None: the reply under way, whichever it is


@dataclass(frozen=True)
class Shutdown:
    pass


Command = Load | Generate | Calibrate | Cancel | Shutdown

# -- events (worker -> client) --------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    pid: int


@dataclass(frozen=True)
class Loaded:
    seconds: float
    placement: dict[str, list[int]] = field(default_factory=dict)  # ggml device ("CPU", "RPC0") -> layers
    device_endpoints: dict[str, str] = field(default_factory=dict)  # ggml device name -> RPC endpoint
    n_layer: int = 0


@dataclass(frozen=True)
class Calibrated:
    step_ms: tuple[float, ...]  # a step of 1, 2, ... positions of one sequence, every logit asked for (empty: failed)


@dataclass(frozen=True)
class Started:
    id: int
    prompt_tokens: int
    decode_call: int = 0  # the engine-wide index of the first decode step that can carry this request


@dataclass(frozen=True)
class Token:
    id: int
    index: int
    token_id: int  # -1: no token, only the UTF-8 tail of the text so far
    text: str
    decode_call: int  # the engine-wide decode step whose logits produced it (shared by accepted drafts)
    decode_ms: float = 0.0  # how long that call took: the head's layers plus every stage's round trip
    logprob: float | None = None  # log-softmax of the raw logits at the sampled token (when Generate.logprobs)
    top_logprobs: tuple[tuple[str, float], ...] = ()  # (token text, logprob): the N most likely, best first


@dataclass(frozen=True)
class Done:
    id: int
    stop_reason: str  # "stop", "length" or "cancelled"
    tokens: tuple[int, ...]
    text: str
    seconds: float
    prompt_tokens: int
    drafted: int = 0  # draft tokens sent to verification
    accepted: int = 0  # of those, the ones the model agreed with
    verify_steps: int = 0  # decode steps that verified at least one drafted token


@dataclass(frozen=True)
class Failed:
    """A command failed. `context` is set when the prompt does not fit the context (then `prompt_tokens` is)."""

    message: str
    id: int | None = None
    prompt_tokens: int | None = None
    context: int | None = None


@dataclass(frozen=True)
class Bye:
    pass


Event = Hello | Loaded | Calibrated | Started | Token | Done | Failed | Bye
ReplyEvent = Started | Token | Done

_COMMANDS: dict[str, type[Command]] = {"load": Load, "generate": Generate, "calibrate": Calibrate, "cancel": Cancel,
                                       "shutdown": Shutdown}
_EVENTS: dict[str, type[Event]] = {"hello": Hello, "loaded": Loaded, "calibrated": Calibrated, "started": Started,
                                   "token": Token, "done": Done, "error": Failed, "bye": Bye}
EVENT_TYPES = frozenset(_EVENTS.values())
_COMMAND_TAGS = {cls: tag for tag, cls in _COMMANDS.items()}
_EVENT_TAGS = {cls: tag for tag, cls in _EVENTS.items()}
_TUPLES = {"endpoints", "tensor_split", "messages", "resume_tokens", "tokens", "stop", "step_ms"}
_PAIRS = {"logit_bias", "top_logprobs"}  # tuples of 2-tuples: JSON writes them as lists of lists


def encode(message: Command | Event) -> str:
    """One JSON line: {"op": ...} for a command, {"ev": ...} for an event."""
    if type(message) in _COMMAND_TAGS:
        tagged = {"op": _COMMAND_TAGS[type(message)]}  # type: ignore[index]
    else:
        tagged = {"ev": _EVENT_TAGS[type(message)]}  # type: ignore[index]
    return json.dumps({**tagged, **asdict(message)}) + "\n"


def _build(registry: Mapping[str, type[Any]], tag_key: str, line: str | bytes) -> Any:
    try:
        data = json.loads(line)
    except ValueError as err:
        raise ValueError(f"not JSON: {line[:80]!r}") from err
    if not isinstance(data, dict):
        raise ValueError(f"not a JSON object: {line[:80]!r}")
    tag = data.pop(tag_key, None)
    cls = registry.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ValueError(f"unknown {tag_key} {tag!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{tag}: unknown field {unknown[0]!r}")
    values = {k: _tupled(k, v) for k, v in data.items()}
    try:
        return cls(**values)
    except TypeError as err:  # a required field is missing
        raise ValueError(f"{tag}: {err}") from err


def _tupled(key: str, value: Any) -> Any:
    if key in _TUPLES and isinstance(value, list):
        return tuple(value)
    if key in _PAIRS and isinstance(value, list):
        return tuple(tuple(pair) if isinstance(pair, list) else pair for pair in value)
    return value


def decode_command(line: str | bytes) -> Command:
    """A command line as its type; ValueError names what is wrong with it."""
    command: Command = _build(_COMMANDS, "op", line)
    return command


def decode_event(line: str | bytes) -> Event:
    """An event line as its type; ValueError names what is wrong with it."""
    event: Event = _build(_EVENTS, "ev", line)
    return event
