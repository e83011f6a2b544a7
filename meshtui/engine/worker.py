"""The engine process: holds the llama.cpp model with the stages as RPC devices.

Runs as `python -m meshtui.engine.worker`, never inside the TUI's process: ggml aborts whatever process
holds the model when a stage dies. Commands arrive as JSON lines on stdin; events leave as JSON lines on
the original stdout (native code's prints are moved to stderr so they cannot corrupt the protocol).
"""

from __future__ import annotations

import ctypes
import os
import queue
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

from meshtui.engine.decoder import Decoder
from meshtui.engine.drafts import DraftModel
from meshtui.engine.prompts import prompt_tokens
from meshtui.engine.protocol import (
    Bye,
    Calibrate,
    Calibrated,
    Cancel,
    Command,
    Event,
    Failed,
    Generate,
    Hello,
    Load,
    Loaded,
    Shutdown,
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
    """Loading, and the handing of requests to the step loop (`meshtui.engine.decoder`)."""

    def __init__(self, proto: Protocol) -> None:
        self.proto = proto
        self.model: Any = None
        self.metadata: dict[str, str] = {}
        self.decoder: Decoder | None = None
        self.placement: dict[int, str] = {}
        self.device_endpoints: dict[str, str] = {}  # ggml device name ("RPC0") -> endpoint
        self._keep: list[Any] = []  # ctypes objects llama.cpp points into while the model lives
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
        from llama_cpp import _internals as internals

        if self.decoder is not None:
            raise RuntimeError("a model is loaded already; start a new engine to load another")
        self._install_log_capture(llama_cpp)
        llama_cpp.llama_backend_init()
        threads = int(cmd.threads or max(1, os.cpu_count() or 1))
        parallel = max(1, int(cmd.parallel))
        draft: DraftModel | None = None
        if cmd.draft_model:
            # Checked before the weights travel: a draft with another vocabulary is refused at once.
            vocab_params = llama_cpp.llama_model_default_params()
            vocab_params.vocab_only = True
            target_vocab = internals.LlamaModel(path_model=cmd.model, params=vocab_params, verbose=False)
            try:
                draft = DraftModel(cmd.draft_model, target_vocab.vocab, context=int(cmd.context),
                                   sequences=parallel, threads=threads, batch=int(cmd.batch))
            finally:
                target_vocab.close()
        self._register_rpc(llama_cpp, list(cmd.endpoints))
        started = time.perf_counter()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = int(cmd.n_gpu_layers)
        if cmd.tensor_split:
            split = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*[float(x) for x in cmd.tensor_split])
            self._keep.append(split)
            params.tensor_split = split
        self.model = internals.LlamaModel(path_model=cmd.model, params=params, verbose=False)
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = int(cmd.context) * parallel  # `context` is each sequence's
        ctx_params.n_batch = ctx_params.n_ubatch = int(cmd.batch)
        ctx_params.n_seq_max = parallel
        # A KV cache of its own for each sequence (llama.cpp's default; its server unifies them). Measured on the
        # head: replies decoded together then agree with each alone exactly (their attention runs the kernels
        # it runs alone), where one unified cache let logprobs drift 0.1 nats (attention over several rows takes
        # ggml's tinyBLAS, in F32, one row the F16 dot product) for no throughput gained in the lab bench.
        ctx_params.kv_unified = False
        # One thread count for every step: llama.cpp takes n_threads_batch for any batch of more than one token
        # (a verify step, replies decoded together), and os.cpu_count() there oversubscribed a shared machine.
        ctx_params.n_threads = ctx_params.n_threads_batch = threads
        # Off on purpose: CUDA stages built on hosts leave out the flash-attention kernels (a quarter of the
        # build time), and a stage asked for an op it lacks aborts. The same setting everywhere keeps the
        # single-process reference comparable.
        ctx_params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = internals.LlamaContext(model=self.model, params=ctx_params, verbose=False)
        self._keep.append(ctx)
        self._install_log_capture(llama_cpp)  # loading may have replaced the callback
        self.metadata = self.model.metadata()
        self.decoder = Decoder(llama_cpp, self.model, ctx, context=int(cmd.context), parallel=parallel,
                               batch=int(cmd.batch), send=self.proto.send, draft_model=draft)
        self.decoder.price_steps(cmd.step_ms)
        by_device: dict[str, list[int]] = {}
        for layer, device in sorted(self.placement.items()):
            by_device.setdefault(device, []).append(layer)
        architecture = self.metadata.get("general.architecture")
        self.proto.send(Loaded(
            seconds=time.perf_counter() - started,
            placement=by_device,
            device_endpoints=self.device_endpoints,
            n_layer=int(self.metadata.get(f"{architecture}.block_count", 0)),
        ))

    def submit(self, cmd: Generate) -> None:
        if self.decoder is None:
            self.proto.send(Failed("no model loaded", cmd.id))
            return
        self.decoder.submit(cmd, prompt_tokens(self.model, self.metadata, cmd))


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
                if engine.decoder is not None:
                    engine.decoder.cancel(cmd.id)
            else:
                commands.put(cmd)
        # stdin closed: the orchestrator is gone, and nobody is left to read what we would say. Leave now,
        # even in the middle of a reply (the main thread may be blocked on a half-closed RPC socket).
        os._exit(0)

    threading.Thread(target=read_commands, name="commands", daemon=True).start()
    proto.send(Hello(os.getpid()))
    while True:
        busy = engine.decoder is not None and engine.decoder.busy
        try:
            # While replies are under way, commands join between steps; idle, wait for the next one.
            cmd = commands.get_nowait() if busy else commands.get()
        except queue.Empty:
            cmd = None
        else:
            if cmd is None or isinstance(cmd, Shutdown):
                break
        if cmd is not None:
            _handle(engine, proto, cmd)
        elif engine.decoder is not None:
            try:
                engine.decoder.step()
            except (ValueError, RuntimeError, OSError, UnicodeError) as err:
                # A step that cannot go on fails the replies in it, not the engine: the next request is served.
                engine.decoder.fail_all(_one_line(str(err)))
    proto.send(Bye())
    os._exit(0)  # skip ggml's finalizers: remote buffers may already be gone


def _handle(engine: Engine, proto: Protocol, cmd: Command) -> None:
    request_id = cmd.id if isinstance(cmd, Generate) else None
    try:
        if isinstance(cmd, Load):
            engine.load(cmd)
        elif isinstance(cmd, Generate):
            engine.submit(cmd)
        elif isinstance(cmd, Calibrate):
            if engine.decoder is None:
                raise RuntimeError("no model loaded")
            proto.send(Calibrated(tuple(engine.decoder.calibrate(cmd.positions))))
    except Exception as err:
        # One request's failure (a chat template that does not render, a bad value) is that request's
        # error, not the engine's end: the engine keeps serving the next one.
        expected = isinstance(err, (ValueError, RuntimeError, OSError))
        proto.send(Failed(_one_line(str(err) if expected else f"{type(err).__name__}: {err}"), request_id))


if __name__ == "__main__":
    sys.exit(main())
