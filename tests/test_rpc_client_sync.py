"""The head's RPC client synchronizes an idle stage without a thread round trip.

ggml's RPC client hands every command to a worker thread per server; its `synchronize` queued an empty message and
waited for the worker to reach it, so each call put the calling thread to sleep until the worker woke and answered.
llama.cpp synchronizes every backend five times for each token it samples, which cost the engine 40% of a step of
four sequences on this machine (native/patches/ggml-rpc-worker-idle-sync.patch, docs/performance.md). With the
patch, `synchronize` with nothing in flight returns without sleeping: the calling thread's voluntary context
switches (each a sleep on the worker's answer; /proc/thread-self/status) stay where they were.

The client runs in a child process: ggml aborts the process that holds an RPC backend when its server goes away.
"""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap

from meshtui.localstage import LocalStage
from meshtui.runtime import llama_cpp_lib_dir, local_runtime_bundle

CALLS = 200

CLIENT = textwrap.dedent("""
    import ctypes, json, sys
    lib = sys.argv[1]
    base = ctypes.CDLL(lib + "/libggml-base.so.0", mode=ctypes.RTLD_GLOBAL)
    rpc = ctypes.CDLL(lib + "/libggml-rpc.so.0")
    rpc.ggml_backend_rpc_init.restype = ctypes.c_void_p
    rpc.ggml_backend_rpc_init.argtypes = [ctypes.c_char_p, ctypes.c_uint32]
    base.ggml_backend_synchronize.argtypes = [ctypes.c_void_p]
    base.ggml_backend_free.argtypes = [ctypes.c_void_p]

    def sleeps():
        for line in open("/proc/thread-self/status"):
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])

    backend = rpc.ggml_backend_rpc_init(sys.argv[2].encode(), 0)
    base.ggml_backend_synchronize(backend)  # the first call: nothing about to change under the measurement
    before = sleeps()
    for _ in range(int(sys.argv[3])):
        base.ggml_backend_synchronize(backend)
    after = sleeps()
    base.ggml_backend_free(backend)
    print(json.dumps({"sleeps": after - before}))
""")


async def test_synchronizing_an_idle_stage_never_waits_on_the_client_worker_thread() -> None:
    stage = LocalStage(local_runtime_bundle("head-build"), threads=1)
    await stage.start()
    try:
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, str(llama_cpp_lib_dir()), stage.endpoint, str(CALLS),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(client.communicate(), 60)
    finally:
        await stage.close()
    assert client.returncode == 0, err.decode()
    sleeps = json.loads(out.decode().strip().splitlines()[-1])["sleeps"]
    # Unpatched, nearly every call sleeps (about CALLS); patched, none does. A stray page-in may sleep once.
    assert sleeps <= 2, f"{sleeps} of {CALLS} synchronize calls slept on the RPC worker thread"
