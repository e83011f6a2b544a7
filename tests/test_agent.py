"""The stage agent on its own: probe, serve on loopback only, speak the head's protocol, exit on EOF."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
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


def _non_loopback_addresses() -> list[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    return [f.split("/")[0] for line in out.splitlines() for f in line.split()[3:4] if not f.startswith("127.")]


def test_serve_binds_loopback_only_speaks_the_heads_protocol_and_exits_on_eof(tmp_path: Path) -> None:
    runtime = install_bundle(tmp_path / "runtime")
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    agent = subprocess.Popen([sys.executable, str(runtime / "meshtui_agent.py"), "serve", "--runtime", str(runtime),
                              "--threads", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert agent.stdout is not None and agent.stdin is not None
        ready = json.loads(agent.stdout.readline())
        assert ready["event"] == "ready" and ready["pid"] == agent.pid
        port = ready["port"]
        assert ready["devices"][0]["type"] == "cpu"
        assert ready["runtime"] in ("head-build", "portable") and ready["backends"] == ["cpu"]
        assert asyncio.run(rpc_hello("127.0.0.1", port)) == expected_rpc_protocol() == (7, 0, 0)
        for address in _non_loopback_addresses():
            with pytest.raises(OSError):
                socket.create_connection((address, port), timeout=2).close()
        assert (tmp_path / ".cache/meshtui/run" / f"agent-{agent.pid}.json").exists()
        agent.stdin.write("ping 7\n")
        agent.stdin.flush()
        assert json.loads(agent.stdout.readline()) == {"event": "pong", "seq": "7"}
        agent.stdin.close()  # the SSH channel closing
        assert agent.wait(timeout=10) == 0
        assert not (tmp_path / ".cache/meshtui/run" / f"agent-{agent.pid}.json").exists()
    finally:
        if agent.poll() is None:
            agent.kill()


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
    json.loads(agent.stdout.readline())
    decoy = tmp_path / ".cache/meshtui/run/agent-1.json"  # a stale pid file naming init: must not be touched
    decoy.write_text(json.dumps({"pid": 1}))
    out = subprocess.run([sys.executable, str(AGENT), "down"], capture_output=True, text=True, env=env, check=True)
    stopped = json.loads(out.stdout)["stopped"]
    assert [s["pid"] for s in stopped] == [agent.pid]
    assert agent.wait(timeout=10) == -9
    assert not decoy.exists()


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

