"""The OpenAI-compatible API on a real mesh (the embedded lab), called with the official `openai` client."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
import pytest_asyncio
from helpers import REPO, parting

from meshtui import events as ev
from meshtui.api import ApiRequestRecord, ApiServer
from meshtui.api_openai import ServedModel, model_slug
from meshtui.engine.stops import StopText
from meshtui.inventory import ModelSpec
from meshtui.lab import EmbeddedLab
from meshtui.mesh import Mesh

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

KEY = "sk-test-meshtui"
CHAT = [{"role": "user", "content": "What is 2+2?"}]
CONTEXT = 512


@dataclass
class Served:
    mesh: Mesh
    server: ApiServer
    events: list[ev.Event] = field(default_factory=list)
    records: list[ApiRequestRecord] = field(default_factory=list)

    def client(self, api_key: str = KEY, port: int | None = None) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port or self.server.port}/v1", api_key=api_key,
                                  max_retries=0, timeout=60)

    async def direct(self, **params: Any) -> Any:
        """What the chat pane gets: Mesh.generate, alone (the API's requests wait)."""
        async with self.server.requests.exclusive("direct"):
            return await self.mesh.generate(**params)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served() -> AsyncIterator[Served]:
    lab = EmbeddedLab(n_hosts=1)
    await lab.start()
    events: list[ev.Event] = []
    mesh = Mesh(lab.inventory(ModelSpec(path=None, name="smollm2", context=CONTEXT)), listener=events.append)
    try:
        await mesh.up()
        records: list[ApiRequestRecord] = []
        server = ApiServer(mesh, port=0, api_key=KEY, on_request=records.append)
        await server.start()
        try:
            yield Served(mesh, server, events, records)
        finally:
            await server.close()
    finally:
        await mesh.close()
        await lab.close()


async def http(port: int, method: str, path: str, body: bytes = b"",
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    """One raw HTTP/1.1 exchange; the JSON body parsed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = {"Host": f"127.0.0.1:{port}", "Content-Length": str(len(body)), "Authorization": f"Bearer {KEY}",
            **(headers or {})}
    writer.write(f"{method} {path} HTTP/1.1\r\n".encode() + "".join(f"{k}: {v}\r\n" for k, v in head.items())
                 .encode() + b"\r\n" + body)
    data = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    status_head, _, payload = data.partition(b"\r\n\r\n")
    lines = status_head.decode().split("\r\n")
    response_headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in response_headers.items()}, json.loads(payload)


def assert_error_shape(body: Any, code: str | None = None) -> None:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code


SLUG = "smollm2-135m-instruct"  # SmolLM2-135M-Instruct.Q4_1.gguf


async def test_models_lists_the_loaded_model_by_its_slug(served: Served) -> None:
    async with served.client() as client:
        models = await client.models.list()
        assert [m.id for m in models.data] == [SLUG]
        assert models.data[0].owned_by == "meshtui"
        for name in (SLUG, "smollm2", "meshtui", served.mesh.model.name):  # slug, inventory, alias, GGUF name
            assert (await client.models.retrieve(name)).id == SLUG
            reply = await client.chat.completions.create(model=name, messages=CHAT, max_tokens=2, temperature=0)
            assert reply.model == SLUG and reply.choices[0].message.content
        with pytest.raises(openai.NotFoundError) as missing:
            await client.models.retrieve("smollm3")
        assert missing.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError) as missing:
            await client.completions.create(model="SmolLM2", prompt="Hi", max_tokens=2)
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    assert str(missing.value.body["message"]).startswith(  # type: ignore[index]
        f"The model `SmolLM2` does not exist; this mesh serves `{SLUG}` (also `smollm2`, ")


async def test_model_ids_over_raw_http(served: Served) -> None:
    port = served.server.port
    status, _, body = await http(port, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == [SLUG]
    status, _, body = await http(port, "GET", "/v1/models/smollm2")
    assert status == 200 and body["id"] == SLUG and body["object"] == "model"
    status, _, body = await http(port, "POST", "/v1/completions",
                                 json.dumps({"model": SLUG, "prompt": "Hi", "max_tokens": 2}).encode())
    assert status == 200 and body["model"] == SLUG
    status, _, body = await http(port, "GET", "/v1/models/gpt-4o")
    assert status == 404
    assert_error_shape(body, "model_not_found")
    assert body["error"]["message"] == (f"The model `gpt-4o` does not exist; this mesh serves `{SLUG}` (also "
                                        f"`smollm2`, `{served.mesh.model.name}`, `meshtui`).")


@pytest.mark.parametrize(("file_name", "slug"), [
    ("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
    ("gemma-3-270m-it-Q4_K_M.gguf", "gemma-3-270m-it"),
    ("Qwen2.5-0.5B-Instruct-f16.gguf", "qwen2.5-0.5b-instruct"),
    ("Llama-3.1-8B-Instruct-Q8_0-00001-of-00002.gguf", "llama-3.1-8b-instruct"),
    ("my model (v2).gguf", "my-model-v2"),
    ("Q4_0.gguf", "q4-0"),
    ("--.gguf", "meshtui"),
])
async def test_model_slug_is_the_file_name_without_tags(file_name: str, slug: str) -> None:
    assert model_slug(file_name) == slug


async def test_served_model_names_each_alias_once() -> None:
    model = ServedModel.of("smollm2.gguf", "smollm2", "SmolLM2 135M", None)
    assert model == ServedModel("smollm2", ("SmolLM2 135M", "meshtui"))
    assert model.selects("smollm2") and model.selects("meshtui") and not model.selects("SMOLLM2")


async def test_chat_answers_like_the_chat_pane(served: Served) -> None:
    async with served.client() as client:
        reply = await client.chat.completions.create(model="meshtui", messages=CHAT, max_tokens=12,
                                                      temperature=0)
    direct = await served.direct(messages=CHAT, max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == direct.text and direct.text
    assert choice.finish_reason == ("length" if direct.stop_reason == "length" else "stop")
    assert reply.model == SLUG and reply.object == "chat.completion"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == direct.prompt_tokens
    assert reply.usage.completion_tokens == len(direct.token_ids)
    assert reply.usage.total_tokens == direct.prompt_tokens + len(direct.token_ids)
    first_token = (reply.usage.model_extra or {})["time_to_first_token_seconds"]
    assert 0 < first_token < served.records[-1].seconds
    record = served.records[-1]
    assert (record.method, record.path, record.status) == ("POST", "/v1/chat/completions", 200)
    assert record.first_token_seconds == pytest.approx(first_token, abs=1e-4)
    logged = [e for e in served.events if isinstance(e, ev.LogRecorded) and e.source == "api"]
    assert "POST /v1/chat/completions 200" in logged[-1].message


async def test_streamed_chat_is_the_same_text(served: Served) -> None:
    async with served.client() as client:
        whole = await client.chat.completions.create(model=SLUG, messages=CHAT,
                                                      max_completion_tokens=12, temperature=0)
        stream = await client.chat.completions.create(model="meshtui", messages=CHAT, max_tokens=12,
                                                       temperature=0, stream=True,
                                                       stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == whole.choices[0].message.content
    assert with_choices[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert (chunks[-1].usage.model_extra or {})["time_to_first_token_seconds"] > 0
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"


async def test_completions_are_raw_streamed_or_not_and_stop(served: Served) -> None:
    prompt = "Once upon a time"
    direct = await served.direct(prompt=prompt, raw=True, max_tokens=10, temperature=0)
    async with served.client() as client:
        whole = await client.completions.create(model="meshtui", prompt=prompt, max_tokens=10, temperature=0)
        stream = await client.completions.create(model="meshtui", prompt=prompt, max_tokens=10, temperature=0,
                                                 stream=True)
        chunks = [chunk async for chunk in stream]
        stop = direct.text.split()[2]
        stopped = await client.completions.create(model="meshtui", prompt=prompt, max_tokens=10,
                                                  temperature=0, stop=[stop])
    assert whole.object == "text_completion"
    assert whole.choices[0].text == direct.text
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (direct.prompt_tokens,
                                                                          len(direct.token_ids))
    assert "".join(c.choices[0].text for c in chunks) == direct.text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert stopped.choices[0].text == direct.text[:direct.text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


# Eight requests, each its own sampling: greedy ones are compared with the same request decoded alone.
CONCURRENT = [
    {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 12, "temperature": 0},
    {"messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 10, "temperature": 0},
    {"messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 16, "temperature": 0.8, "seed": 7},
    {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0,
     "stop": ["!"]},
    {"messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 14, "temperature": 1.3, "seed": 3},
    {"messages": [{"role": "user", "content": "Name a city."}], "max_tokens": 6, "temperature": 0},
    {"messages": [{"role": "user", "content": "Write a word."}], "max_tokens": 9, "temperature": 0.5, "seed": 11},
    {"messages": [{"role": "user", "content": "Name an animal."}], "max_tokens": 12, "temperature": 0},
]


@dataclass
class Streamed:
    """A streamed chat reply; tokens and margins (its two likeliest tokens' logprobs apart) when greedy."""

    text: str
    reason: str | None
    usage: Any
    tokens: list[str]
    margins: list[float]


async def _streamed(client: openai.AsyncOpenAI, request: dict[str, Any]) -> Streamed:
    greedy = request["temperature"] == 0
    stream = await client.chat.completions.create(model="meshtui", stream=True,
                                                  stream_options={"include_usage": True},
                                                  **({"logprobs": True, "top_logprobs": 2} if greedy else {}),
                                                  **request)
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    scored = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    margins = [e.top_logprobs[0].logprob - e.top_logprobs[1].logprob for e in scored]
    return Streamed(text, reasons[-1] if reasons else None, chunks[-1].usage, [e.token for e in scored], margins)


async def _alone(served: Served, request: dict[str, Any]) -> Streamed:
    async with served.client() as client:
        return await _streamed(client, request)


def _as_if_alone(together: Streamed, alone: Streamed) -> None:
    """The same reply, or one that parts from it only at a near tie (helpers.parting)."""
    assert alone.tokens and len(alone.margins) == len(alone.tokens)
    why = parting(together.tokens, alone.tokens, alone.margins)
    assert why is None, f"{together.text!r} vs alone {alone.text!r}: {why}"
    if together.tokens == alone.tokens:
        assert together.text == alone.text


async def test_eight_streaming_requests_at_once_all_complete_as_if_alone(served: Served) -> None:
    assert served.server.requests.slots == served.mesh.parallel == 4
    alone = [await _alone(served, r) if r["temperature"] == 0 else None for r in CONCURRENT]
    started = len([e for e in served.events if isinstance(e, ev.ReplyStarted)])
    async with served.client() as client:
        replies = await asyncio.gather(*(_streamed(client, r) for r in CONCURRENT))
    for request, solo, reply in zip(CONCURRENT, alone, replies, strict=True):
        assert reply.text and reply.reason in ("stop", "length")
        assert reply.usage.completion_tokens <= request["max_tokens"] and reply.usage.prompt_tokens > 0
        assert (reply.usage.model_extra or {})["time_to_first_token_seconds"] > 0
        if solo is not None:
            _as_if_alone(reply, solo)
    mesh_replies = [e for e in served.events if isinstance(e, ev.ReplyStarted)][started:]
    assert len(mesh_replies) == 8 and {e.source for e in mesh_replies} == {"api"}
    assert served.server.requests.in_flight == () and served.server.requests.waiting == 0


async def test_a_request_cancelled_mid_way_leaves_the_others_unchanged(served: Served) -> None:
    greedy = [r for r in CONCURRENT if r["temperature"] == 0][:3]
    alone = [await _alone(served, r) for r in greedy]
    long = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 300,
            "temperature": 0}
    cancelled_at = 0

    async def hang_up_after_three_pieces() -> None:
        nonlocal cancelled_at
        async with served.client() as client:
            stream = await client.chat.completions.create(model="meshtui", stream=True, **long)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    cancelled_at += 1
                    if cancelled_at == 3:
                        await stream.close()  # the client hangs up mid-reply
                        return

    async with served.client() as client:
        quitter = asyncio.create_task(hang_up_after_three_pieces())
        replies = await asyncio.gather(*(_streamed(client, r) for r in greedy))
        await quitter
    for reply, solo in zip(replies, alone, strict=True):
        _as_if_alone(reply, solo)
    deadline = time.monotonic() + 20
    while served.server.requests.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert served.server.requests.in_flight == ()  # its sequence was freed: nothing is left in flight
    cancelled = [e for e in served.events if isinstance(e, ev.ReplyFinished) and e.stop_reason == "cancelled"]
    assert cancelled and len(cancelled[-1].token_ids) < 300
    again = await _alone(served, greedy[0])  # and the mesh serves the next one as before: alone, exactly
    assert (again.text, again.tokens) == (alone[0].text, alone[0].tokens)


async def test_auth_model_and_context_errors(served: Served) -> None:
    async with served.client(api_key="wrong") as client:
        with pytest.raises(openai.AuthenticationError) as denied:
            await client.models.list()
    assert denied.value.code == "invalid_api_key"
    async with served.client() as client:
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=4)
        assert missing.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as overflow:
            await client.completions.create(model="meshtui", prompt="word " * 600, max_tokens=4)
        assert overflow.value.code == "context_length_exceeded"
        # The mesh still answers after refusing.
        assert (await client.completions.create(model="meshtui", prompt="Hi", max_tokens=2)).choices[0].text


async def test_http_errors_have_the_openai_shape(served: Served) -> None:
    port = served.server.port
    status, _, body = await http(port, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400
    assert_error_shape(body)
    status, _, body = await http(port, "POST", "/v1/chat/completions", b'{"model": "meshtui"}')
    assert status == 400 and body["error"]["param"] == "messages"
    status, _, body = await http(port, "GET", "/v1/nothing")
    assert status == 404
    assert_error_shape(body)
    status, headers, body = await http(port, "GET", "/v1/chat/completions")
    assert status == 405 and headers["allow"] == "POST"
    assert_error_shape(body)
    too_long = {"Content-Length": str(2 * 1024**2)}
    status, _, body = await http(port, "POST", "/v1/completions", headers=too_long)
    assert status == 413
    status, _, body = await http(port, "GET", "/v1/models", headers={"Authorization": ""})
    assert status == 401
    assert_error_shape(body, "invalid_api_key")


async def test_not_ready_is_503_with_retry_after_and_no_key_means_local_only(served: Served) -> None:
    ready = True
    local = ApiServer(served.mesh, port=0, requests=served.server.requests, ready=lambda: ready)
    await local.start()
    try:
        status, _, _ = await http(local.port, "GET", "/v1/models")
        assert status == 200
        status, _, body = await http(local.port, "GET", "/v1/models", headers={"Host": "evil.example:80"})
        assert status == 403
        status, _, body = await http(local.port, "POST", "/v1/completions", b'{"prompt": "x"}',
                                     headers={"Origin": "https://evil.example"})
        assert status == 403
        ready = False
        async with served.client(port=local.port) as client:
            with pytest.raises(openai.InternalServerError) as unavailable:
                await client.chat.completions.create(model="meshtui", messages=CHAT, max_tokens=4)
        assert unavailable.value.status_code == 503
        assert unavailable.value.response.headers["retry-after"] == "5"
        assert unavailable.value.code == "mesh_not_ready"
    finally:
        await local.close()


async def test_client_hanging_up_cancels_the_reply(served: Served) -> None:
    body = json.dumps({"messages": CHAT, "max_tokens": 400, "temperature": 0, "stream": True}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", served.server.port)
    writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    seen = b""
    while seen.count(b"data: ") < 3:  # the role chunk and two tokens
        seen += await asyncio.wait_for(reader.read(4096), 30)
    assert seen.startswith(b"HTTP/1.1 200")
    writer.close()
    deadline = time.monotonic() + 20
    finished: list[ev.ReplyFinished] = []
    while not finished and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        finished = [e for e in served.events[-1000:] if isinstance(e, ev.ReplyFinished)
                    and e.stop_reason == "cancelled"]
    assert finished and len(finished[-1].token_ids) < 400
    # The next reply starts on a clean engine.
    direct = await served.direct(messages=CHAT, max_tokens=6, temperature=0)
    async with served.client() as client:
        reply = await client.chat.completions.create(model="meshtui", messages=CHAT, max_tokens=6,
                                                      temperature=0)
    assert reply.choices[0].message.content == direct.text


async def test_stop_scanner_holds_back_only_a_possible_stop() -> None:
    scanner = StopText(["\n\n", "END"])
    assert scanner.feed("Hello E") == "Hello "
    assert scanner.feed("ND of it") == ""
    assert scanner.stopped
    plain = StopText([])
    assert plain.feed("abc") == "abc" and plain.flush() == ""


async def test_serve_command_serves_until_sigterm(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_CURRENT_TEST", "MESHTUI_API_KEY")}
    log = tmp_path / "serve.log"
    key_file = tmp_path / "api-key"
    key_file.write_text(f"{KEY}\n")  # from a file, the key is not on the command line for `ps` to show
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshtui", "serve", "--api-port", str(port), "--lab-hosts", "1",
            "--context", str(CONTEXT), "--api-key-file", str(key_file), cwd=REPO, env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=stderr)
    try:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        async with client:
            deadline = time.monotonic() + 120
            while True:
                assert proc.returncode is None, log.read_text()
                try:
                    models = await client.models.list()
                    break
                except openai.APIConnectionError:
                    assert time.monotonic() < deadline, log.read_text()
                    await asyncio.sleep(0.5)
            reply = await client.chat.completions.create(model=models.data[0].id, messages=CHAT, max_tokens=4)
            assert reply.choices[0].message.content
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong",
                                      max_retries=0) as stranger:
            with pytest.raises(openai.AuthenticationError):
                await stranger.models.list()
        status, _, _ = await http(port, "GET", "/%1b]0;owned%07")  # an escape sequence for the terminal
        assert status == 404
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) in (0, 130)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = log.read_text()
    assert f"meshtui: serving {models.data[0].id} on http://127.0.0.1:{port}/v1" in text
    assert "POST /v1/chat/completions 200" in text
    assert "GET /v1/models 401" in text
    assert "  api: 127.0.0.1:" in text and " GET /\\x1b]0;owned\\x07 404 " in text
    assert "\x1b" not in text and "\x07" not in text


async def test_serve_refuses_the_network_without_a_key() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MESHTUI_API_KEY"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshtui", "serve", "--api-host", "0.0.0.0", cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert len(err.decode().strip().splitlines()) == 1 and "--api-key" in err.decode()


# ---------------------------------------------------------------- hostile clients


async def _raw(port: int, data: bytes, *, then_wait: bool = True) -> bytes:
    """Send `data` (perhaps an incomplete request) and return everything the server answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()


async def test_the_key_is_checked_before_the_body_is_read(served: Served) -> None:
    # A megabyte announced but never sent: the wrong key is answered at once, nothing waits for the body.
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer wrong\r\n"
            b"Content-Length: 1000000\r\n\r\n")
    answer = await _raw(served.server.port, head)
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert b'"code": "invalid_api_key"' in answer


async def test_malformed_deep_or_invalid_unicode_json_is_a_400(served: Served) -> None:
    port = served.server.port
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"messages": ' + b"[" * 50_000,
                 b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
                 b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
                 b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
                 b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e999}'):
        status, _, answer = await http(port, "POST", "/v1/chat/completions", body)
        assert status == 400, (body[:60], answer)
        assert_error_shape(answer)
    status, _, _ = await http(port, "POST", "/v1/completions", b'{"prompt": "Hi", "max_tokens": 2}')
    assert status == 200


async def test_slow_clients_and_too_many_connections_are_cut(served: Served) -> None:
    strict = ApiServer(served.mesh, port=0, api_key=KEY, requests=served.server.requests, max_connections=2,
                       header_timeout=0.5, body_timeout=0.5)
    await strict.start()
    try:
        # Headers that never end, and a body that never comes: 408, not a connection held forever.
        answer = await _raw(strict.port, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert answer.startswith(b"HTTP/1.1 408 ") and b"headers did not arrive" in answer
        answer = await _raw(strict.port, (f"POST /v1/completions HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\n"
                                          "Content-Length: 100\r\n\r\n{").encode())
        assert answer.startswith(b"HTTP/1.1 408 ") and b"body did not arrive" in answer
        # Two idle connections take the two places; a third is answered 503 without being read.
        idle = [await asyncio.open_connection("127.0.0.1", strict.port) for _ in range(2)]
        await asyncio.sleep(0.1)
        answer = await _raw(strict.port, b"")
        assert answer.startswith(b"HTTP/1.1 503 ") and b'"code": "too_many_connections"' in answer
        for _reader, writer in idle:
            writer.close()
    finally:
        await strict.close()
    status, _, _ = await http(served.server.port, "GET", "/v1/models")
    assert status == 200


async def test_a_request_that_fails_in_the_engine_leaves_it_serving() -> None:
    from synth import synthetic_model

    # A chat template that raises while it renders (ZeroDivisionError: no ValueError a handler would expect).
    broken = "{% for m in messages %}{{ m.content }}{% endfor %}{{ 1 // (messages|length - messages|length) }}"
    model = synthetic_model(n_layer=2, name="broken-template", chat_template=broken)
    lab = EmbeddedLab(n_hosts=1)
    await lab.start()
    mesh = Mesh(lab.inventory(ModelSpec(path=model, name=None, context=CONTEXT)))
    try:
        await mesh.up()
        async with ApiServer(mesh, port=0, api_key=KEY) as server, openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{server.port}/v1", api_key=KEY, max_retries=0, timeout=60) as client:
            for _ in range(2):
                with pytest.raises(openai.InternalServerError) as failed:
                    await client.chat.completions.create(model="meshtui", messages=CHAT, max_tokens=2)
                assert failed.value.status_code == 500 and failed.value.code == "engine_error"
                assert "ZeroDivisionError" in failed.value.message
                # The engine is still there: a raw completion (no template) is answered.
                reply = await client.completions.create(model="meshtui", prompt="Hi", max_tokens=2, temperature=0)
                assert reply.usage is not None and reply.usage.completion_tokens == 2
            assert mesh.engine is not None and mesh.engine.alive
    finally:
        await mesh.close()
        await lab.close()
