"""The stage agent on its own: probe, serve on a private Unix socket only, speak the head's protocol, exit on EOF."""

from __future__ import annotations

import asyncio
import json
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from meshtui.hosts import AGENT_CANNOT_LOAD, AGENT_ERROR_CODES
from meshtui.rpcwire import rpc_hello
from meshtui.runtime import agent_source_path, expected_rpc_protocol, load_file_module, local_runtime_bundle

AGENT = Path(__file__).resolve().parents[1] / "agent" / "meshtui_agent.py"


def install_bundle(into: Path) -> Path:
    bundle = local_runtime_bundle()
    for rel, local in bundle.files:
        (into / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(local, into / rel)
    return into


def test_probe_reports_this_machine() -> None:
    out = subprocess.run([sys.executable, str(AGENT), "probe"], capture_output=True, text=True, check=True).stdout
    facts = json.loads(out)
    assert facts["cores"] >= 1 and facts["mem_total"] >= facts["mem_available"] > 0
    assert facts["arch"] and facts["os"] == "Linux" and facts["glibc"].count(".") >= 1
    assert isinstance(facts["gpus"], list)
    assert facts["cmake"] is (shutil.which("cmake") is not None)
    assert facts["nvcc"] is (shutil.which("nvcc") is not None)


def test_probe_runs_from_stdin_like_over_ssh() -> None:
    out = subprocess.run([sys.executable, "-", "probe"], input=AGENT.read_text(), capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out)["cores"] >= 1


def listeners_of(pid: int) -> list[str]:
    """Every listening socket (TCP, UDP, Unix) of `pid`, as `ss` prints its local address."""
    out = subprocess.run(["ss", "-H", "-l", "-p", "-n", "-t", "-u", "-x"], capture_output=True, text=True,
                         check=True).stdout
    return sorted(line.split()[4] for line in out.splitlines() if f",pid={pid}," in line)


def test_serve_listens_on_a_private_unix_socket_only_speaks_the_heads_protocol_and_exits_on_eof(
        tmp_path: Path) -> None:
    runtime = install_bundle(tmp_path / "runtime")
    home = Path(tempfile.mkdtemp(prefix="mthome-"))  # short: the socket path fits in sun_path
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin"}
    agent = subprocess.Popen([sys.executable, str(runtime / "meshtui_agent.py"), "serve", "--runtime", str(runtime),
                              "--threads", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert agent.stdout is not None and agent.stdin is not None
        ready = json.loads(agent.stdout.readline())
        assert ready["event"] == "ready" and ready["pid"] == agent.pid
        path = Path(ready["socket"])
        assert ready["devices"][0]["type"] == "cpu"
        assert ready["runtime"] in ("head-build", "portable") and ready["backends"] == ["cpu"]
        # A fresh folder of its own, only this user may enter, in its 0700 run dir; no TCP or UDP port at all.
        assert path.name == "stage.sock" and path.parent.parent == home / ".cache/meshtui/run"
        assert path.parent.name.startswith("stage-") and stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700 == stat.S_IMODE(path.parent.parent.stat().st_mode)
        assert stat.S_IMODE(Path(ready["cache_dir"]).stat().st_mode) == 0o700
        assert listeners_of(agent.pid) == [str(path)]
        assert asyncio.run(rpc_hello(str(path))) == expected_rpc_protocol() == (7, 0, 0)
        pidfile = home / ".cache/meshtui/run" / f"agent-{agent.pid}.json"
        assert json.loads(pidfile.read_text())["socket"] == str(path)
        agent.stdin.write("ping 7\n")
        agent.stdin.flush()
        assert json.loads(agent.stdout.readline()) == {"event": "pong", "seq": "7"}
        agent.stdin.close()  # the SSH channel closing
        assert agent.wait(timeout=10) == 0
        assert not pidfile.exists() and not path.parent.exists()
    finally:
        if agent.poll() is None:
            agent.kill()
        shutil.rmtree(home, ignore_errors=True)


def test_serve_puts_the_socket_in_the_temp_dir_when_the_run_dir_path_is_too_long(tmp_path: Path) -> None:
    runtime = install_bundle(tmp_path / "runtime")
    home = tmp_path / ("h" * 80)  # home/.cache/meshtui/run/stage-XXXXXXXX/stage.sock exceeds sun_path
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path)}
    agent = subprocess.Popen([sys.executable, str(runtime / "meshtui_agent.py"), "serve", "--runtime", str(runtime),
                              "--threads", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert agent.stdout is not None and agent.stdin is not None
        path = Path(json.loads(agent.stdout.readline())["socket"])
        assert path.parent.parent == tmp_path and path.parent.name.startswith("meshtui-stage-")
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert asyncio.run(rpc_hello(str(path))) == (7, 0, 0)
        agent.stdin.close()
        assert agent.wait(timeout=10) == 0
        assert not path.parent.exists()
    finally:
        if agent.poll() is None:
            agent.kill()


STUB_RPC = """
void ggml_backend_rpc_start_server(const char *e, const char *c, unsigned long t, unsigned long n, void **d) {}
void *ggml_backend_rpc_reg(void) { return 0; }
void *ggml_backend_rpc_add_server(const char *e) { return 0; }
void *ggml_backend_rpc_init(const char *e, unsigned d) { return 0; }
int ggml_backend_is_rpc(void *b) { return 0; }
void *ggml_backend_rpc_buffer_type(const char *e, unsigned d) { return 0; }
void ggml_backend_rpc_get_device_memory(const char *e, unsigned d, unsigned long *f, unsigned long *t) {}
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc) for a stand-in libggml-rpc")
def test_serve_refuses_a_runtime_without_the_unix_socket_patch(tmp_path: Path) -> None:
    """A stale runtime (ggml RPC without meshtui's patch) is refused in one line, never served over TCP."""
    runtime = install_bundle(tmp_path / "runtime")
    rpc_lib = next(p for p in (runtime / "lib").iterdir() if p.name.startswith("libggml-rpc.so"))
    (tmp_path / "stub.c").write_text(STUB_RPC)
    subprocess.run(["cc", "-shared", "-fPIC", f"-Wl,-soname,{rpc_lib.name}", "-o", str(rpc_lib),
                    str(tmp_path / "stub.c")], check=True)
    result = subprocess.run([sys.executable, str(runtime / "meshtui_agent.py"), "serve", "--runtime", str(runtime)],
                            input="", capture_output=True, text=True, timeout=30, env={"HOME": str(tmp_path)})
    assert result.returncode == 3
    assert json.loads(result.stdout) == {"event": "error", "code": "runtime_error", "reason": (
        f"the ggml runtime in {runtime / 'lib'} lacks meshtui's Unix-socket patch (no "
        "ggml_backend_rpc_unix_socket_support): it was built from an unpatched source; rebuild it with "
        "scripts/setup or native/build_runtime.py")}
    assert not (tmp_path / ".cache/meshtui/run").exists()  # no socket folder, no port: nothing served


def test_serve_reports_a_runtime_that_cannot_load(tmp_path: Path) -> None:
    runtime = install_bundle(tmp_path / "runtime")
    (runtime / "lib" / "libggml-base.so.0").write_bytes(b"not a library")  # loaded first by both layouts
    result = subprocess.run([sys.executable, str(runtime / "meshtui_agent.py"), "serve", "--runtime", str(runtime)],
                            input="", capture_output=True, text=True, timeout=30, env={"HOME": str(tmp_path)})
    assert result.returncode == 3
    message = json.loads(result.stdout)
    assert message["event"] == "error"
    assert message["code"] == AGENT_CANNOT_LOAD  # what the head acts on: it builds a runtime on the host
    assert message["reason"].startswith("cannot load libggml-base.so.0: ")


def test_the_agents_error_codes_are_the_ones_the_head_knows() -> None:
    agent = load_file_module(agent_source_path(), "meshtui_agent_codes")
    assert {name: getattr(agent, name) for name in AGENT_ERROR_CODES} == AGENT_ERROR_CODES


def test_down_stops_only_meshtui_agents(tmp_path: Path) -> None:
    runtime = install_bundle(tmp_path / "runtime")
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    agent = subprocess.Popen([sys.executable, str(runtime / "meshtui_agent.py"), "serve", "--runtime", str(runtime),
                              "--threads", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert agent.stdout is not None
    socket_dir = Path(json.loads(agent.stdout.readline())["socket"]).parent
    decoy = tmp_path / ".cache/meshtui/run/agent-1.json"  # a stale pid file naming init: must not be touched
    decoy.write_text(json.dumps({"pid": 1}))
    out = subprocess.run([sys.executable, str(AGENT), "down"], capture_output=True, text=True, env=env, check=True)
    stopped = json.loads(out.stdout)["stopped"]
    assert [s["pid"] for s in stopped] == [agent.pid]
    assert agent.wait(timeout=10) == -9
    assert not decoy.exists()
    assert not socket_dir.exists()  # the killed agent's socket folder is cleaned up with its pid file


VM_STAT = """Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                               12000.
Pages active:                            300000.
Pages inactive:                           50000.
Pages speculative:                         3000.
Pages wired down:                        100000.
"""


def test_macos_memory_and_library_names_are_read_the_macos_way() -> None:
    agent = load_file_module(AGENT, "meshtui_agent_under_test")
    assert agent.darwin_available(VM_STAT) == 16384 * (12000 + 50000 + 3000)
    assert agent.platform_lib("libggml-base.so.0", "darwin") == "libggml-base.0.dylib"
    assert agent.platform_lib("libggml-base.so.0", "linux") == "libggml-base.so.0"
    assert agent.apple_gpus(32 * 2**30, 20 * 2**30) == []  # not on this Linux machine

