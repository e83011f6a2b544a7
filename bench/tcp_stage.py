#!/usr/bin/env python3
"""A plain TCP ggml RPC stage server, for benchmarks only: the baseline the SSH tunnels are measured against.

Unlike the agent (agent/meshtui_agent.py), this binds whatever address it is given, so it is reachable by
anyone on that network, unauthenticated: upstream's own warning applies. Never run it outside a lab.

Stdlib + ctypes only (the lab hosts run it with Debian's system python3):

    tcp_stage.py --runtime DIR --host ADDR --port N [--threads 1] [--cache DIR]

DIR is a meshtui runtime folder (DIR/meshtui_agent.py and DIR/lib/); the libraries are loaded by the agent's
own code, so the baseline runs the very runtime the stages run. Prints one JSON line `{"event": "ready", ...}` on
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


def load_runtime(folder):
    """The ggml runtime exactly as the agent loads it (head build or portable, best CPU variant)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("meshtui_agent", os.path.join(folder, "meshtui_agent.py"))
    agent = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agent)
    runtime = agent.Runtime(os.path.join(folder, "lib"))
    cpus = [d["handle"] for d in runtime.devices() if d["type"] == "cpu"]
    return (cpus[0] if cpus else None), runtime.rpc


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
    parser.add_argument("--no-repack", action="store_true", help="keep weights in ggml's plain layouts, as the agent's")
    args = parser.parse_args()

    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the native server prints to stdout: keep our one JSON line clean

    cpu, rpc = load_runtime(args.runtime)
    if not cpu:
        out.write(json.dumps({"event": "error", "reason": "no CPU device in the ggml runtime"}) + "\n")
        return 3
    devices = (ctypes.c_void_p * 1)(cpu)
    if hasattr(rpc, "ggml_backend_rpc_set_weight_repack"):  # the same layouts as the agents' stages
        rpc.ggml_backend_rpc_set_weight_repack.argtypes = [ctypes.c_int]
        rpc.ggml_backend_rpc_set_weight_repack(0 if args.no_repack else 1)
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
