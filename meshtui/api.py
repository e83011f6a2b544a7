"""An OpenAI-compatible HTTP API over the mesh: /v1/models, /v1/chat/completions, /v1/completions.

The engine serves one reply at a time, so every reply (the API's and the chat pane's) takes its turn on
one `ReplyQueue` (meshtui/replies.py). The wire format is decided purely in `api_openai`; this module reads
sockets and drives the mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import os
import secrets
import socket
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from meshtui import events as ev
from meshtui.api_http import (
    MAX_BODY_BYTES,
    MAX_HEAD_BYTES,
    ClientGone,
    Request,
    end_events,
    read_body,
    read_head,
    start_events,
    write_error,
    write_event,
    write_json,
)
from meshtui.api_openai import (
    ApiError,
    GenerationRequest,
    ServedModel,
    StopScanner,
    chat_chunk,
    chat_completion,
    context_overflow,
    finish_reason,
    model_not_found,
    model_object,
    parse_chat_request,
    parse_completion_request,
    text_completion,
    usage_chunk,
)
from meshtui.errors import EngineError, InventoryError, MeshError
from meshtui.mesh import Mesh
from meshtui.replies import ReplyQueue
from meshtui.text import one_line

API_KEY_ENV = "MESHTUI_API_KEY"
RETRY_AFTER_SECONDS = 5
HEADER_TIMEOUT_SECONDS = 10.0  # from the connection to the end of the headers
BODY_TIMEOUT_SECONDS = 30.0  # for the whole body, once the request is allowed
MAX_CONNECTIONS = 64  # open at once; one more is answered 503 and closed before anything is read


# -- the server ------------------------------------------------------------------------------------
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

    def line(self) -> str:
        parts = [self.client, self.method, self.path, str(self.status or "-")]
        if self.prompt_tokens is not None:
            parts.append(f"{self.prompt_tokens}+{self.completion_tokens or 0} tokens")
        if self.finish_reason:
            parts.append(self.finish_reason)
        if self.stream:
            parts.append("stream")
        parts.append(f"{self.seconds:.2f}s")
        if self.detail:
            parts.append(f"({self.detail})")
        return " ".join(parts)


@dataclass
class _Exchange:
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


Handler = Callable[[Request, asyncio.StreamWriter, _Exchange], Awaitable[None]]


def served_model(mesh: Mesh) -> ServedModel:
    """The id clients use is the model file's slug; the inventory's model name and the GGUF's name select it too."""
    assert mesh.model is not None and mesh.model_path is not None  # read before the mesh is ready
    return ServedModel.of(mesh.model_path.name, mesh.inventory.model.name, mesh.model.name)


def is_loopback(host: str) -> bool:
    """Whether a Host or Origin header names this machine (browsers resolve *.localhost to loopback)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost, or empty ("all interfaces")
        return False


def binds_loopback_only(host: str) -> bool:
    """Whether listening on `host` listens on loopback addresses alone: a name is resolved, and every address
    it resolves to must be loopback (a `*.localhost` or `localhost` that /etc/hosts maps elsewhere is not)."""
    name = host.strip("[]")
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:  # a name: what it resolves to decides
        pass
    if not name:
        return False  # all interfaces
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):  # does not resolve: start() will say so
        return False
    addresses = {str(info[4][0]) for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def resolve_api_key(api_key: str | None, api_key_file: Path | None = None) -> str | None:
    """--api-key, else --api-key-file's first line, else $MESHTUI_API_KEY; empty means none.

    A file or the environment keeps the key out of `ps`.
    """
    if api_key:
        return api_key
    if api_key_file is not None:
        try:
            text = api_key_file.expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else err
            raise InventoryError(f"--api-key-file {api_key_file}: cannot read it: {reason}") from err
        lines = text.strip().splitlines()
        key = lines[0].strip() if lines else ""
        if not key:
            raise InventoryError(f"--api-key-file {api_key_file}: the file holds no key")
        return key
    return os.environ.get(API_KEY_ENV) or None


def check_api_options(host: str, api_key: str | None) -> None:
    if not binds_loopback_only(host) and not api_key:
        raise InventoryError(f"--api-host {host} would serve the model beyond this machine without a key; "
                             f"pass --api-key KEY (or set {API_KEY_ENV})")


class ApiServer:
    def __init__(self, mesh: Mesh, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, *,
                 requests: ReplyQueue | None = None, ready: Callable[[], bool] | None = None,
                 on_request: Callable[[ApiRequestRecord], None] | None = None,
                 max_body: int = MAX_BODY_BYTES, max_connections: int = MAX_CONNECTIONS,
                 header_timeout: float = HEADER_TIMEOUT_SECONDS,
                 body_timeout: float = BODY_TIMEOUT_SECONDS) -> None:
        check_api_options(host, api_key)
        self.mesh = mesh
        self.host = host
        self.port = port
        self.api_key = api_key
        self.requests = requests or ReplyQueue(mesh)
        self._owns_requests = requests is None
        self.ready: Callable[[], bool] = ready or (lambda: self.requests.ready)  # the core's one definition
        self.on_request = on_request
        self.max_body = max_body
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.created = int(time.time())
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._on_connection, self.host, self.port,
                                                      limit=MAX_HEAD_BYTES)
        except OSError as err:
            reason = err.strerror or err
            raise MeshError(f"cannot serve the API on {self.host}:{self.port}: {reason}") from err
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening, cut open requests (their replies are cancelled) and let the engine settle."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(set(self._connections))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 5)
        self._server = None
        if self._owns_requests:
            await self.requests.settle()

    async def __aenter__(self) -> ApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- connections -------------------------------------------------------------------------------
    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer = writer.get_extra_info("peername")
        exchange = _Exchange(client=f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?")
        try:
            if len(self._connections) > self.max_connections:
                exchange.status = 503
                exchange.detail = f"more than {self.max_connections} connections at once"
                await write_error(writer, ApiError(
                    503, f"Too many connections at once (at most {self.max_connections}); retry soon.",
                    type="server_error", code="too_many_connections",
                    headers=[("Retry-After", str(RETRY_AFTER_SECONDS))]))
                return
            await self._exchange(reader, writer, exchange)
        except ClientGone:
            exchange.detail = exchange.detail or "client gone"
        except (ConnectionError, OSError) as err:  # the client went away while we answered
            exchange.detail = f"client gone: {err.__class__.__name__}"
        except asyncio.CancelledError:  # close() cut it; ending cancelled would be logged as an error
            exchange.detail = "server closing"
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(OSError, asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), 1)
            if exchange.method != "-" or exchange.status:
                self._record(exchange)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        x: _Exchange) -> None:
        try:
            try:
                request = await asyncio.wait_for(read_head(reader, self.max_body), self.header_timeout)
            except asyncio.TimeoutError as err:
                raise ApiError(408, "the request headers did not arrive in time") from err
            x.method, x.path = request.method, request.path
            handler = self._route(request)
            # The key is checked before the body is read: without it, nobody makes the server read 1 MB.
            self._authorize(request)
            try:
                request = await asyncio.wait_for(read_body(request, reader, writer), self.body_timeout)
            except asyncio.TimeoutError as err:
                raise ApiError(408, "the request body did not arrive in time") from err
            if not self.ready():
                raise self._not_ready()
            await self._until_disconnected(reader, handler(request, writer, x), x)
        except ApiError as err:
            x.status = err.status
            x.detail = x.detail or err.message
            await write_error(writer, err)
            await _linger(reader, writer)
        except (ClientGone, OSError):
            raise  # the client went away: nothing to answer
        except Exception as err:  # a bug: answer 500 (if nothing was sent yet) rather than drop the client
            x.detail = f"internal error: {err!r}"
            if not x.status:
                x.status = 500
                await write_error(writer, ApiError(500, "internal server error", type="server_error"))

    async def _until_disconnected(self, reader: asyncio.StreamReader, work: Awaitable[None],
                                  x: _Exchange) -> None:
        """Run the handler until it ends or the client hangs up; hanging up cancels it (and so the reply)."""
        worker = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_wait_for_eof(reader))
        try:
            await asyncio.wait({worker, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not worker.done():
                x.detail = "client gone; reply cancelled"
                worker.cancel()
                await asyncio.wait({worker})
                raise ClientGone()
            worker.result()
        finally:
            watcher.cancel()
            worker.cancel()
            await asyncio.wait({watcher, worker})

    def _record(self, x: _Exchange) -> None:
        # The method, path and details are the client's words: made printable before any log shows them.
        record = ApiRequestRecord(
            client=x.client, method=one_line(x.method, 20), path=one_line(x.path, 300), status=x.status,
            seconds=time.perf_counter() - x.started, stream=x.stream, prompt_tokens=x.prompt_tokens,
            completion_tokens=x.completion_tokens if x.prompt_tokens is not None else None,
            finish_reason=x.finish_reason, detail=one_line(x.detail, 300))
        level = "warning" if record.status >= 500 else "info"
        self.mesh.listener(ev.LogRecorded(source="api", message=record.line(), level=level))
        if self.on_request is not None:
            self.on_request(record)

    # -- routing and checks ------------------------------------------------------------------------
    def _route(self, request: Request) -> Handler:
        routes: dict[str, dict[str, Handler]] = {
            "/v1/models": {"GET": self._models},
            "/v1/chat/completions": {"POST": self._chat},
            "/v1/completions": {"POST": self._completions},
        }
        path = request.path.rstrip("/") or "/"
        methods = routes.get(path)
        if methods is None and path.startswith("/v1/models/"):
            methods = {"GET": self._model}
        if methods is None:
            raise ApiError(404, f"Invalid URL ({request.method} {request.path})", code="unknown_url")
        handler = methods.get(request.method)
        if handler is None:
            raise ApiError(405, f"{request.method} is not allowed on {path}; use {', '.join(methods)}",
                           code="method_not_allowed", headers=[("Allow", ", ".join(methods))])
        return handler

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            # No key means loopback only. Refuse what a web page could send from a browser on this machine:
            # a foreign Origin (cross-site requests) or Host (DNS rebinding).
            for header in ("host", "origin"):
                value = request.headers.get(header)
                name = urlsplit(value if header == "origin" else f"//{value}").hostname if value else None
                if value and not is_loopback(name or ""):
                    raise ApiError(403, f"{header.title()} {value} is refused: without an API key only local "
                                        f"clients are served", type="permission_error", code="forbidden")
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        challenge = [("WWW-Authenticate", "Bearer")]
        if not given:
            raise ApiError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key", headers=challenge)
        matches = hmac.compare_digest(token.strip().encode(), self.api_key.encode())
        if scheme.lower() != "bearer" or not matches:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key", headers=challenge)

    @staticmethod
    def _not_ready() -> ApiError:
        return ApiError(503, "The mesh is not ready (starting, or recovering from a lost node); retry soon.",
                        type="server_error", code="mesh_not_ready",
                        headers=[("Retry-After", str(RETRY_AFTER_SECONDS))])

    def _failure(self, err: MeshError, param: str) -> ApiError:
        """A mesh error as the API reports it: the prompt too long, the mesh gone, or a server error."""
        overflow = context_overflow(err, param)
        if overflow is not None:
            return overflow
        if isinstance(err, ApiError):
            return err
        if not self.ready():
            failure = self._not_ready()
            failure.message = f"{failure.message} ({err})"
            return failure
        return ApiError(500, str(err), type="server_error", code="engine_error")

    @property
    def model(self) -> ServedModel:
        """The model served and the names that select it (the mesh has read its model: ready() says so)."""
        return served_model(self.mesh)

    # -- handlers ----------------------------------------------------------------------------------
    async def _models(self, request: Request, writer: asyncio.StreamWriter, x: _Exchange) -> None:
        x.status = 200
        models = [model_object(self.model, self.created)]
        await write_json(writer, 200, {"object": "list", "data": models})

    async def _model(self, request: Request, writer: asyncio.StreamWriter, x: _Exchange) -> None:
        requested = request.path.rstrip("/").removeprefix("/v1/models/")
        if not self.model.selects(requested):
            raise model_not_found(requested, self.model)
        x.status = 200
        await write_json(writer, 200, model_object(self.model, self.created))

    async def _chat(self, request: Request, writer: asyncio.StreamWriter, x: _Exchange) -> None:
        gen = parse_chat_request(request.json(), self.model, self.mesh.inventory.model.context)
        await self._generate(gen, writer, x)

    async def _completions(self, request: Request, writer: asyncio.StreamWriter, x: _Exchange) -> None:
        gen = parse_completion_request(request.json(), self.model, self.mesh.inventory.model.context)
        await self._generate(gen, writer, x)

    async def _generate(self, gen: GenerationRequest, writer: asyncio.StreamWriter, x: _Exchange) -> None:
        x.stream = gen.stream
        param = "messages" if gen.kind == "chat" else "prompt"
        seed = gen.seed if gen.seed is not None else secrets.randbelow(2**31)
        reply_id = ("chatcmpl-" if gen.kind == "chat" else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        scanner = StopScanner(gen.stop)
        async with contextlib.aclosing(self.requests.stream(source="api", **gen.mesh_params(seed))) as events:
            try:
                started = await _reply_started(events)
            except MeshError as err:
                raise self._failure(err, param) from err
            x.prompt_tokens = started.prompt_tokens
            async with contextlib.aclosing(_texts(events, scanner, x)) as texts:
                if not gen.stream:
                    try:
                        text = "".join([piece async for piece in texts])
                    except MeshError as err:
                        raise self._failure(err, param) from err
                    assert x.finish_reason is not None
                    body = (chat_completion if gen.kind == "chat" else text_completion)(
                        reply_id, created, gen.model, text, x.finish_reason, started.prompt_tokens,
                        x.completion_tokens)
                    x.status = 200
                    await write_json(writer, 200, body)
                    return
                x.status = 200
                await start_events(writer)

                def chunk(text: str, reason: str | None = None) -> dict[str, Any]:
                    if gen.kind == "completion":
                        return text_completion(reply_id, created, gen.model, text, reason)
                    return chat_chunk(reply_id, created, gen.model, {"content": text} if text else {}, reason)

                if gen.kind == "chat":
                    await write_event(writer, chat_chunk(reply_id, created, gen.model,
                                                         {"role": "assistant", "content": ""}))
                try:
                    async for piece in texts:
                        await write_event(writer, chunk(piece))
                except MeshError as err:  # the status is sent already: the error goes in the stream
                    failure = self._failure(err, param)
                    x.detail = failure.message
                    await write_event(writer, failure.body())
                    return
        await write_event(writer, chunk("", x.finish_reason))
        if gen.include_usage:
            await write_event(writer, usage_chunk(gen, reply_id, created, started.prompt_tokens,
                                                  x.completion_tokens))
        await end_events(writer)


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seconds: float = 2.0) -> None:
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


async def _wait_for_eof(reader: asyncio.StreamReader) -> None:
    """Returns when the client closes its side (anything it sends after its request is ignored)."""
    with contextlib.suppress(ConnectionError, OSError):
        while await reader.read(65536):
            pass


async def _reply_started(events: AsyncIterator[ev.Event]) -> ev.ReplyStarted:
    async for event in events:
        if isinstance(event, ev.ReplyStarted):
            return event
    raise EngineError("the engine ended the reply before starting it")


async def _texts(events: AsyncIterator[ev.Event], scanner: StopScanner,
                 x: _Exchange) -> AsyncGenerator[str, None]:
    """The reply's text as it can be sent, cut at a stop sequence; counts tokens, sets the finish reason."""
    async for event in events:
        if isinstance(event, ev.TokenGenerated):
            x.completion_tokens += int(event.token_id >= 0)
            piece = scanner.feed(event.text)
            if piece:
                yield piece
            if scanner.stopped:
                x.finish_reason = finish_reason("cancelled", stopped_by_sequence=True)
                return
        elif isinstance(event, ev.ReplyFinished):
            x.finish_reason = finish_reason(event.stop_reason, stopped_by_sequence=False)
            tail = scanner.flush()
            if tail:
                yield tail
            return
    raise EngineError("the engine ended the reply without finishing it")


# -- the `meshtui serve` command's core ------------------------------------------------------------
def request_logger(listener: ev.Listener, out: TextIO = sys.stderr) -> ev.Listener:
    """A listener that prints the API's one line per request and passes everything else on."""

    def listen(event: ev.Event) -> None:
        if isinstance(event, ev.LogRecorded) and event.source == "api":
            print(f"  api: {event.message}", file=out, flush=True)
        else:
            listener(event)

    return listen


async def serve_forever(mesh: Mesh, *, host: str, port: int, api_key: str | None,
                        out: TextIO = sys.stderr) -> None:
    """Serve the mesh (already up) until cancelled: Ctrl-C or SIGTERM."""
    async with ApiServer(mesh, host, port, api_key) as server:
        print(f"meshtui: serving {server.model.id} on {server.url}", file=out, flush=True)
        await asyncio.get_running_loop().create_future()
