"""The engine process: holds the llama.cpp model with the stages as RPC devices.

Runs as `python -m meshtui.engine.worker`, never inside the TUI's process: ggml aborts whatever process
holds the model when a stage dies. Commands arrive as JSON lines on stdin; events leave as JSON lines on
the original stdout (native code's prints are moved to stderr so they cannot corrupt the protocol).
"""

from __future__ import annotations

import codecs
import ctypes
import os
import queue
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

from meshtui.engine.protocol import (
    Bye,
    Cancel,
    Command,
    Done,
    Event,
    Failed,
    Generate,
    Hello,
    Load,
    Loaded,
    Shutdown,
    Started,
    Token,
    decode_command,
    encode,
)
from meshtui.unixsock import UNIX_SOCKET_SYMBOL

_PLACEMENT = re.compile(r"load_tensors: layer\s+(\d+) assigned to device (\S+?),")


class Protocol:
    def __init__(self) -> None:
        sys.stdout.flush()
        self._out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        self._lock = threading.Lock()

    def send(self, event: Event) -> None:
        with self._lock:
            self._out.write(encode(event))
            self._out.flush()


class Engine:
    def __init__(self, proto: Protocol) -> None:
        self.proto = proto
        self.llm: Any = None
        self.placement: dict[int, str] = {}
        self.cancel = threading.Event()  # cancel the reply under way, whichever it is
        self.cancelled_ids: set[Any] = set()  # cancel these requests, even before they start
        self.decode_calls = 0
        self.decode_ms = 0.0  # how long the last decode call took
        self.device_endpoints: dict[str, str] = {}  # ggml device name ("RPC0") -> endpoint
        self._log_cb: Any = None

    # -- loading ---------------------------------------------------------------------------------
    def _install_log_capture(self, llama_cpp: Any) -> None:
        def on_log(level: int, text: bytes, user_data: Any) -> None:
            line = text.decode("utf-8", errors="replace")
            match = _PLACEMENT.search(line)
            if match:
                self.placement[int(match.group(1))] = match.group(2)
            elif level in (2, 3):  # GGML_LOG_LEVEL_WARN, ERROR
                sys.stderr.write(line)

        self._log_cb = llama_cpp.llama_log_callback(on_log)
        llama_cpp.llama_log_set(self._log_cb, ctypes.c_void_p(0))

    def _register_rpc(self, llama_cpp: Any, endpoints: list[str]) -> None:
        if not endpoints:
            return
        if not llama_cpp.llama_supports_rpc():
            raise RuntimeError(
                "this llama-cpp-python was built without RPC; rebuild it with CMAKE_ARGS=-DGGML_RPC=on "
                "(scripts/setup does it)"
            )
        # Open the .so.0 names llama.cpp itself links: libggml.so is a separate copy with its own registry.
        libdir = Path(llama_cpp.__file__).parent / "lib"
        ggml = ctypes.CDLL(str(libdir / "libggml.so.0"))
        rpc = ctypes.CDLL(str(libdir / "libggml-rpc.so.0"))
        if not hasattr(rpc, UNIX_SOCKET_SYMBOL):
            raise RuntimeError(
                f"{libdir / 'libggml-rpc.so.0'} lacks meshtui's Unix-socket patch ({UNIX_SOCKET_SYMBOL}): "
                "this llama-cpp-python was built from an unpatched source; run scripts/setup again"
            )
        rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
        rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
        ggml.ggml_backend_register.restype = None
        ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
        ggml.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
        ggml.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        ggml.ggml_backend_dev_name.restype = ctypes.c_char_p
        ggml.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
        for endpoint in endpoints:
            reg = rpc.ggml_backend_rpc_add_server(endpoint.encode())
            if not reg:
                raise RuntimeError(f"cannot add RPC server {endpoint}")
            ggml.ggml_backend_register(reg)
            for i in range(ggml.ggml_backend_reg_dev_count(reg)):
                name = ggml.ggml_backend_dev_name(ggml.ggml_backend_reg_dev_get(reg, i)).decode()
                self.device_endpoints[name] = endpoint

    def load(self, cmd: Load) -> None:
        import llama_cpp

        self._install_log_capture(llama_cpp)
        self._register_rpc(llama_cpp, list(cmd.endpoints))
        started = time.perf_counter()
        kwargs: dict[str, Any] = {
            "model_path": cmd.model,
            "n_ctx": int(cmd.context),
            "n_batch": int(cmd.batch),
            "n_ubatch": int(cmd.batch),
            "n_threads": int(cmd.threads or max(1, os.cpu_count() or 1)),
            "n_gpu_layers": int(cmd.n_gpu_layers),
            "seed": int(cmd.seed),
            # Off on purpose: CUDA stages built on hosts leave out the flash-attention kernels (a quarter of the
            # build time), and a stage asked for an op it lacks aborts. The same setting everywhere keeps the
            # single-process reference comparable.
            "flash_attn": False,
            "verbose": False,
        }
        if cmd.tensor_split:
            kwargs["tensor_split"] = [float(x) for x in cmd.tensor_split]
        self.llm = llama_cpp.Llama(**kwargs)
        self._install_log_capture(llama_cpp)  # Llama() may have replaced the callback
        ctx = self.llm._ctx
        original_decode = ctx.decode

        def counting_decode(batch: Any) -> Any:
            self.decode_calls += 1
            started = time.perf_counter()
            try:
                return original_decode(batch)
            finally:
                self.decode_ms = (time.perf_counter() - started) * 1000.0

        ctx.decode = counting_decode
        by_device: dict[str, list[int]] = {}
        for layer, device in sorted(self.placement.items()):
            by_device.setdefault(device, []).append(layer)
        self.proto.send(Loaded(
            seconds=time.perf_counter() - started,
            placement=by_device,
            device_endpoints=self.device_endpoints,
            n_layer=int(self.llm.metadata.get(f"{self.llm.metadata.get('general.architecture')}.block_count", 0)),
        ))

    # -- generation ------------------------------------------------------------------------------
    def _prompt_tokens(self, cmd: Generate) -> list[int]:
        llm = self.llm
        if cmd.raw:
            return list(llm.tokenize((cmd.prompt or "").encode("utf-8"), add_bos=True, special=True))
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = llm.metadata.get("tokenizer.chat_template")
        turns = cmd.messages or ({"role": "user", "content": cmd.prompt or ""},)
        messages: Any = [dict(m) for m in turns]
        if not template:
            text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
            return list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))
        eos = llm._model.token_get_text(llm.token_eos()) if llm.token_eos() >= 0 else ""
        bos = llm._model.token_get_text(llm.token_bos()) if llm.token_bos() >= 0 else ""
        formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        rendered = formatter(messages=messages)
        add_bos = not (bos and rendered.prompt.startswith(bos))
        return list(llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=add_bos, special=True))

    def generate(self, cmd: Generate) -> None:
        import llama_cpp

        llm = self.llm
        request_id = cmd.id
        self.cancel.clear()
        prompt_tokens = self._prompt_tokens(cmd)
        # After a stage was lost the orchestrator resumes a reply: what was generated already is replayed
        # as part of the prompt, which rebuilds the KV cache, and generation continues after it.
        resume = [int(t) for t in cmd.resume_tokens]
        tokens = prompt_tokens + resume
        if len(tokens) >= llm.n_ctx():
            self.proto.send(Failed(f"prompt is {len(tokens)} tokens; the context holds {llm.n_ctx()}", request_id,
                                   prompt_tokens=len(tokens), context=llm.n_ctx()))
            return
        max_tokens = int(cmd.max_tokens or 256)
        max_tokens = min(max_tokens, llm.n_ctx() - len(prompt_tokens))
        temperature = float(cmd.temperature)
        llm.set_seed(int(cmd.seed))
        self.decode_calls = 0
        self.proto.send(Started(request_id, len(prompt_tokens)))
        started = time.perf_counter()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        generated: list[int] = list(resume)
        text_parts: list[str] = []
        stop_reason = "length"
        if len(generated) >= max_tokens:
            self.proto.send(Done(request_id, "length", tuple(generated), "", 0.0, len(prompt_tokens)))
            return
        vocab = llm._model.vocab
        if resume:
            # Rebuild the KV cache exactly as the first attempt built it: the prompt in one batch, then each
            # token already generated on its own, so greedy decoding continues bit for bit the same.
            llm.reset()
            llm.eval(prompt_tokens)
            for token in resume:
                llm.eval([token])
        for token in llm.generate(
            tokens,
            temp=temperature,
            top_k=int(cmd.top_k),
            top_p=float(cmd.top_p),
            min_p=float(cmd.min_p),
            repeat_penalty=float(cmd.repeat_penalty),
            reset=True,
        ):
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                stop_reason = "stop"
                break
            piece = llm.detokenize([token], prev_tokens=prompt_tokens + generated)
            generated.append(token)
            text = decoder.decode(piece)
            text_parts.append(text)
            # decode_calls - 1 is the index of the decode call whose logits produced this token.
            self.proto.send(Token(request_id, len(generated) - 1, token, text, self.decode_calls - 1,
                                  self.decode_ms))
            if len(generated) >= max_tokens:
                break
            if self.cancel.is_set() or request_id in self.cancelled_ids:
                stop_reason = "cancelled"
                break
        tail = decoder.decode(b"", final=True)
        if tail:
            text_parts.append(tail)
            self.proto.send(Token(request_id, len(generated) - 1, -1, tail, self.decode_calls - 1))
        seconds = time.perf_counter() - started
        self.proto.send(Done(request_id, stop_reason, tuple(generated), "".join(text_parts), seconds,
                             len(prompt_tokens)))


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def main() -> int:
    proto = Protocol()
    engine = Engine(proto)
    commands: queue.Queue[Command | None] = queue.Queue()

    def read_commands() -> None:
        for line in sys.stdin:
            try:
                cmd = decode_command(line)
            except ValueError as err:  # not the protocol: answer, and keep reading
                proto.send(Failed(f"bad command line: {err}"))
                continue
            if isinstance(cmd, Cancel):
                if cmd.id is None:
                    engine.cancel.set()
                else:
                    engine.cancelled_ids.add(cmd.id)
            else:
                commands.put(cmd)
        # stdin closed: the orchestrator is gone, and nobody is left to read what we would say. Leave now,
        # even in the middle of a reply (the main thread may be blocked on a half-closed RPC socket).
        os._exit(0)

    threading.Thread(target=read_commands, name="commands", daemon=True).start()
    proto.send(Hello(os.getpid()))
    while True:
        cmd = commands.get()
        if cmd is None or isinstance(cmd, Shutdown):
            break
        request_id = cmd.id if isinstance(cmd, Generate) else None
        try:
            if isinstance(cmd, Load):
                engine.load(cmd)
            elif isinstance(cmd, Generate):
                if engine.llm is None:
                    proto.send(Failed("no model loaded", request_id))
                else:
                    engine.generate(cmd)
        except Exception as err:
            # One request's failure (a chat template that does not render, a bad value) is that request's
            # error, not the engine's end: the engine keeps serving the next one.
            expected = isinstance(err, (ValueError, RuntimeError, OSError))
            proto.send(Failed(_one_line(str(err) if expected else f"{type(err).__name__}: {err}"), request_id))
    proto.send(Bye())
    os._exit(0)  # skip ggml's finalizers: remote buffers may already be gone


if __name__ == "__main__":
    sys.exit(main())
