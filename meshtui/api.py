"""An OpenAI-compatible HTTP API over the mesh: /v1/models, /v1/chat/completions, /v1/completions.

This module is the server: connections, routing, readiness, the request log. Every reply (the API's and the
chat pane's) is asked of one `ReplyQueue` (meshtui/replies.py). The pieces it uses: `api_http` (the HTTP
exchange), `api_access` (the key, loopback-only serving), `api_openai` (the wire format's common parts), `api_requests`
(request bodies parsed), `api_shapes` (response objects) and `api_replies` (one generation request answered,
whole or streamed).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

from meshtui import events as ev
from meshtui.api_access import (
    API_KEY_ENV,
    authorize,
    binds_loopback_only,
    check_api_options,
    is_loopback,
    resolve_api_key,
)
from meshtui.api_features import route_features
from meshtui.api_http import (
    MAX_BODY_BYTES,
    MAX_HEAD_BYTES,
    ApiRequestRecord,
    ClientGone,
    Exchange,
    Request,
    linger,
    read_body,
    read_head,
    wait_for_eof,
    write_error,
    write_json,
)
from meshtui.api_openai import (
    ApiError,
    ServedModel,
    context_overflow,
    model_not_found,
    model_object,
)
from meshtui.api_replies import answer
from meshtui.api_requests import parse_chat_request, parse_completion_request
from meshtui.api_response_replies import answer_response
from meshtui.api_responses import ResponseStore, embeddings_refused, parse_responses_request
from meshtui.api_tool_replies import answer_with_tools
from meshtui.api_tools import tool_request
from meshtui.errors import MeshError
from meshtui.mesh import Mesh
from meshtui.replies import ReplyQueue
from meshtui.text import one_line

__all__ = ["API_KEY_ENV", "ApiRequestRecord", "ApiServer", "binds_loopback_only", "check_api_options",
           "is_loopback", "request_logger", "resolve_api_key", "serve_forever", "served_model"]

RETRY_AFTER_SECONDS = 5
HEADER_TIMEOUT_SECONDS = 10.0  # from the connection to the end of the headers
BODY_TIMEOUT_SECONDS = 30.0  # for the whole body, once the request is allowed
MAX_CONNECTIONS = 64  # open at once; one more is answered 503 and closed before anything is read


Handler = Callable[[Request, asyncio.StreamWriter, Exchange], Awaitable[None]]


def served_model(mesh: Mesh) -> ServedModel:
    """The id clients use is the model file's slug; the inventory's model name and the GGUF's name select it too."""
    assert mesh.model is not None and mesh.model_path is not None  # read before the mesh is ready
    return ServedModel.of(mesh.model_path.name, mesh.inventory.model.name, mesh.model.name,
                          n_vocab=mesh.model.n_vocab)


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
        self.responses = ResponseStore()  # for previous_response_id, while the server runs
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
        exchange = Exchange(client=f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?")
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
                        x: Exchange) -> None:
        try:
            try:
                request = await asyncio.wait_for(read_head(reader, self.max_body), self.header_timeout)
            except asyncio.TimeoutError as err:
                raise ApiError(408, "the request headers did not arrive in time") from err
            x.method, x.path = request.method, request.path
            handler = self._route(request)
            # The key is checked before the body is read: without it, nobody makes the server read 1 MB.
            authorize(request, self.api_key)
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
            await linger(reader, writer)
        except (ClientGone, OSError):
            raise  # the client went away: nothing to answer
        except Exception as err:  # a bug: answer 500 (if nothing was sent yet) rather than drop the client
            x.detail = f"internal error: {err!r}"
            if not x.status:
                x.status = 500
                await write_error(writer, ApiError(500, "internal server error", type="server_error"))

    async def _until_disconnected(self, reader: asyncio.StreamReader, work: Awaitable[None],
                                  x: Exchange) -> None:
        """Run the handler until it ends or the client hangs up; hanging up cancels it (and so the reply)."""
        worker = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(wait_for_eof(reader))
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

    def _record(self, x: Exchange) -> None:
        # The method, path and details are the client's words: made printable before any log shows them.
        record = ApiRequestRecord(
            client=x.client, method=one_line(x.method, 20), path=one_line(x.path, 300), status=x.status,
            seconds=time.perf_counter() - x.started, stream=x.stream, prompt_tokens=x.prompt_tokens,
            completion_tokens=x.completion_tokens if x.prompt_tokens is not None else None,
            finish_reason=x.finish_reason, detail=one_line(x.detail, 300), first_token_seconds=x.first_token_seconds,
            features=tuple(one_line(f, 40) for f in x.features))
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
            "/v1/responses": {"POST": self._responses},
            "/v1/embeddings": {"POST": self._embeddings},
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
    async def _models(self, request: Request, writer: asyncio.StreamWriter, x: Exchange) -> None:
        x.status = 200
        models = [model_object(self.model, self.created)]
        await write_json(writer, 200, {"object": "list", "data": models})

    async def _model(self, request: Request, writer: asyncio.StreamWriter, x: Exchange) -> None:
        requested = request.path.rstrip("/").removeprefix("/v1/models/")
        if not self.model.selects(requested):
            raise model_not_found(requested, self.model)
        x.status = 200
        await write_json(writer, 200, model_object(self.model, self.created))

    async def _chat(self, request: Request, writer: asyncio.StreamWriter, x: Exchange) -> None:
        asked = request.json()
        body, use = tool_request(asked)
        gen = parse_chat_request(body, self.model, self.mesh.inventory.model.context)
        x.features = route_features(asked) + gen.features
        if use is not None and use.constrained:
            await answer_with_tools(gen, use, self.requests, writer, x, self._failure)
        else:  # no tools, or tool_choice "none": a plain reply (n, logprobs and response_format apply)
            await answer(gen, self.requests, writer, x, self._failure)

    async def _completions(self, request: Request, writer: asyncio.StreamWriter, x: Exchange) -> None:
        gen = parse_completion_request(request.json(), self.model, self.mesh.inventory.model.context)
        x.features = gen.features
        await answer(gen, self.requests, writer, x, self._failure)

    async def _responses(self, request: Request, writer: asyncio.StreamWriter, x: Exchange) -> None:
        asked = request.json()
        req = parse_responses_request(asked, self.responses)
        gen = parse_chat_request(req.chat, self.model, self.mesh.inventory.model.context)
        x.features = route_features(asked) + gen.features
        await answer_response(req, gen, self.responses, self.requests, writer, x, self._failure)

    async def _embeddings(self, request: Request, writer: asyncio.StreamWriter, x: Exchange) -> None:
        raise embeddings_refused()


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
