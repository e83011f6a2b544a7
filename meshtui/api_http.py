"""Just enough HTTP/1.1 for the API, on asyncio streams: one request per connection, then `Connection: close`.

Request bodies need a Content-Length (every OpenAI client sends one) and are capped; responses are JSON with a
Content-Length, or a server-sent event stream that ends when the connection closes. What each exchange became is
kept in an `Exchange`, and logged as an `ApiRequestRecord`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote, urlsplit

from meshtui.api_openai import ApiError, ReplyUsage

MAX_BODY_BYTES = 1024 * 1024
MAX_HEAD_BYTES = 64 * 1024  # the StreamReader limit start_server is given
SERVER = "meshtui"


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes = b""

    @property
    def content_length(self) -> int:
        return int(self.headers.get("content-length", "0"))  # checked by read_head

    def json(self) -> Any:
        """The body as JSON: anything else (bad UTF-8, lone surrogates, NaN, nesting past the parser) is a 400."""
        try:
            value = json.loads(self.body, parse_constant=_no_constant)
            # Strings must be text that can be sent on: a lone surrogate ("\\ud800") cannot be encoded.
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except RecursionError as err:  # nesting deeper than the parser goes
            raise ApiError(400, "We could not parse the JSON body of your request: nested too deeply") from err
        except (UnicodeError, ValueError) as err:  # the client sent something that is not JSON
            raise ApiError(400, f"We could not parse the JSON body of your request: {err}") from err
        return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class ClientGone(Exception):
    """The client closed the connection before sending a whole request: there is no one to answer."""


async def read_head(reader: asyncio.StreamReader, max_body: int = MAX_BODY_BYTES) -> Request:
    """The request line and headers (the body is not read: see read_body)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as err:
        raise ApiError(431, "request headers too large") from err
    except asyncio.IncompleteReadError as err:
        raise ClientGone() from err
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ApiError(400, "malformed HTTP request line")
    method, target, _version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ApiError(400, "malformed HTTP header line")
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise ApiError(411, "chunked request bodies are not supported; send a Content-Length")
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit() or len(length_text) > 18:
        raise ApiError(400, "Content-Length is not a number")
    if int(length_text) > max_body:
        raise ApiError(413, f"the request body is {int(length_text)} bytes; at most {max_body} are accepted",
                       code="request_too_large")
    return Request(method.upper(), unquote(urlsplit(target).path), headers)


async def read_body(request: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Request:
    """The request with its body, read only once the request is allowed (after the key check)."""
    length = request.content_length
    if length and request.headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    try:
        body = await reader.readexactly(length) if length else b""
    except asyncio.IncompleteReadError as err:
        raise ClientGone() from err
    return Request(request.method, request.path, request.headers, body)


def _head(status: int, headers: Sequence[tuple[str, str]]) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:  # a status http.HTTPStatus does not name
        reason = "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}", f"Server: {SERVER}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def write_json(writer: asyncio.StreamWriter, status: int, obj: Any,
                     headers: Sequence[tuple[str, str]] = ()) -> None:
    body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
    writer.write(_head(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                *headers]) + body)
    await writer.drain()


async def write_error(writer: asyncio.StreamWriter, err: ApiError) -> None:
    await write_json(writer, err.status, err.body(), err.headers)


async def start_events(writer: asyncio.StreamWriter) -> None:
    writer.write(_head(200, [("Content-Type", "text/event-stream; charset=utf-8"),
                             ("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]))
    await writer.drain()


async def write_event(writer: asyncio.StreamWriter, obj: Any) -> None:
    writer.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n")
    await writer.drain()


async def end_events(writer: asyncio.StreamWriter) -> None:
    writer.write(b"data: [DONE]\n\n")
    await writer.drain()


@dataclass(frozen=True)
class ApiRequestRecord:
    """One request, for the log and for whoever shows API traffic (the TUI). Status 0: nothing was sent."""

    client: str
    method: str
    path: str
    status: int
    seconds: float
    stream: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    detail: str = ""
    first_token_seconds: float | None = None  # from asking the mesh for the reply (queueing included)
    features: tuple[str, ...] = ()  # what the request used (tools, json_schema, logprobs, n=2, ...)

    def line(self) -> str:
        parts = [self.client, self.method, self.path, str(self.status or "-")]
        if self.features:
            parts.append(f"[{', '.join(self.features)}]")
        if self.prompt_tokens is not None:
            parts.append(f"{self.prompt_tokens}+{self.completion_tokens or 0} tokens")
        if self.finish_reason:
            parts.append(self.finish_reason)
        if self.stream:
            parts.append("stream")
        if self.first_token_seconds is not None:
            parts.append(f"first token {self.first_token_seconds:.2f}s")
        parts.append(f"{self.seconds:.2f}s")
        if self.detail:
            parts.append(f"({self.detail})")
        return " ".join(parts)


@dataclass
class Exchange:
    """What one connection's request became; the record is made from it at the end."""

    client: str
    method: str = "-"
    path: str = "-"
    status: int = 0
    stream: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None
    detail: str = ""
    started: float = field(default_factory=time.perf_counter)
    asked: float = 0.0  # when the reply was asked of the mesh
    first_token_seconds: float | None = None
    features: tuple[str, ...] = ()

    def usage(self) -> ReplyUsage:
        return ReplyUsage(self.prompt_tokens or 0, self.completion_tokens, self.first_token_seconds)


async def linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seconds: float = 2.0) -> None:
    """After an error answered before the body was read: end our side, then drop what the client still sends.

    Closing with unread bytes would make the kernel reset the connection, and the client could lose the answer.
    Nothing is kept: at most MAX_BODY_BYTES are read and thrown away, for at most `seconds`.
    """
    with contextlib.suppress(OSError, RuntimeError, asyncio.TimeoutError):
        if writer.can_write_eof():
            writer.write_eof()
        left = MAX_BODY_BYTES

        async def drain() -> None:
            nonlocal left
            while left > 0 and (data := await reader.read(min(left, 65536))):
                left -= len(data)

        await asyncio.wait_for(drain(), seconds)


async def wait_for_eof(reader: asyncio.StreamReader) -> None:
    """Returns when the client closes its side (anything it sends after its request is ignored)."""
    with contextlib.suppress(ConnectionError, OSError):
        while await reader.read(65536):
            pass

