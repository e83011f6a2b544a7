#!/usr/bin/env python3
"""A plain TCP ggml RPC stage server, for benchmarks only: the baseline the SSH tunnels are measured against.

Unlike the agent (agent/meshtui_agent.py), this binds whatever address it is given, so it is reachable by
anyone on that network, unauthenticated: upstream's own warning applies. Never run it outside a lab.

Stdlib + ctypes only (the lab hosts run it with Debian's system python3):

    tcp_stage.py --runtime DIR --host ADDR --port N [--threads 1] [--cache DIR]

DIR is a meshtui runtime folder (DIR/lib/libggml*.so.0). Prints one JSON line `{"event": "ready", ...}` on
stdout once the server accepts connections; exits when stdin closes (the caller's lifeline) or on SIGTERM.
"""

import argparse
import ctypes
import json
import os
import socket
import sys
import threading
import time

# Each library's dependencies are loaded before it, by full path (same order as the agent).
RUNTIME_LIBS = ("libggml-base.so.0", "libggml-cpu.so.0", "libggml-rpc.so.0", "libggml.so.0")
GGML_BACKEND_DEVICE_TYPE_CPU = 0


def load_runtime(folder):
    libdir = os.path.join(folder, "lib") if os.path.isdir(os.path.join(folder, "lib")) else folder
    libs = {name: ctypes.CDLL(os.path.join(libdir, name), mode=ctypes.RTLD_GLOBAL) for name in RUNTIME_LIBS}
    ggml, rpc = libs["libggml.so.0"], libs["libggml-rpc.so.0"]
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    rpc.ggml_backend_rpc_start_server.restype = None
    rpc.ggml_backend_rpc_start_server.argtypes = [
        ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)]
    return ggml, rpc


def wait_listening(host, port, thread, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and thread.is_alive():
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:  # not listening yet
            time.sleep(0.05)
    return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default=None, help="RPC cache folder (default: none, like rpc-server without -c)")
    args = parser.parse_args()

    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the native server prints to stdout: keep our one JSON line clean

    ggml, rpc = load_runtime(args.runtime)
    cpu = ggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    if not cpu:
        out.write(json.dumps({"event": "error", "reason": "no CPU device in the ggml runtime"}) + "\n")
        return 3
    devices = (ctypes.c_void_p * 1)(cpu)
    endpoint = f"{args.host}:{args.port}".encode()
    cache = None
    if args.cache:
        os.makedirs(args.cache, mode=0o700, exist_ok=True)
        cache = args.cache.encode()

    def serve():
        rpc.ggml_backend_rpc_start_server(endpoint, cache, args.threads, 1, devices)

    server = threading.Thread(target=serve, name="ggml-rpc", daemon=True)
    server.start()
    if not wait_listening(args.host, args.port, server):
        out.write(json.dumps({"event": "error", "reason": f"server did not listen on {endpoint.decode()}"}) + "\n")
        return 3
    out.write(json.dumps({"event": "ready", "endpoint": endpoint.decode(), "pid": os.getpid()}) + "\n")
    for _ in sys.stdin:  # stdin is the lifeline: EOF means the caller is gone
        pass
    os._exit(0)  # the server thread cannot be stopped; skip finalizers


if __name__ == "__main__":
    sys.exit(main())
