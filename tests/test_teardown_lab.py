"""Nothing is left behind: signals to the head, hung or babbling hosts, and a soak of up/down cycles."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, agent_processes, host_python, inventory_with_python, meshtui, wait_nothing_left

from meshtui.inventory import load_inventory
from meshtui.mesh import Mesh

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def _engines_of(head_pid: int) -> list[int]:
    """Engine processes the head started (its children; they may be reparented once the head is gone)."""
    out = subprocess.run(["ps", "-o", "pid,args", "--ppid", str(head_pid)], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()[1:] if "meshtui.engine.worker" in line]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def _start_head(inventory: Path) -> subprocess.Popen[str]:
    # A suite started in the background of a shell has SIGINT ignored, and a child inherits that (Python then
    # leaves it ignored: no KeyboardInterrupt). A handler is not inherited: with one here, the head starts with
    # SIGINT at its default, as it does from a terminal.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "meshtui", "up", str(inventory), "--headless", "--raw", "--temperature", "0",
             "--prompt", "Tell me a very long story about", "--max-tokens", "2000"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_head_killed_or_stopped_mid_reply_leaves_no_agent(lab, tmp_path: Path, sig: signal.Signals) -> None:
    inventory = tmp_path / "inventory.toml"
    inventory.write_text(lab.inventory_toml('name = "smollm2"'))
    head = _start_head(inventory)
    try:
        assert _wait(lambda: all(agent_processes(lab).values()) and head.stdout is not None, 120), head.stderr
        assert head.stdout.read(1)  # the first token arrived: the reply is under way
        engines = _engines_of(head.pid)
        assert len(engines) == 1
        head.send_signal(sig)
        code = head.wait(timeout=30)
    finally:
        if head.poll() is None:
            head.kill()
    if sig != signal.SIGKILL:
        assert code == 130
        assert head.stderr is not None and "torn down" in head.stderr.read()
    # Agents notice their SSH channel is gone; the engine notices its orchestrator is gone. Nothing else of the
    # hosts' users is left either.
    assert wait_nothing_left(lab) == {}
    assert _wait(lambda: not _alive(engines[0]), 10), f"engine {engines[0]} still running"


def test_host_whose_agent_prints_garbage_is_named(lab, tmp_path: Path) -> None:
    python = host_python(lab, "h2", '*probe*) cat >/dev/null; echo "Welcome to the jungle"; exit 0;;')
    inventory = inventory_with_python(lab, tmp_path, "h2", python)
    result = meshtui("up", str(inventory), "--headless", "--prompt", "hi", timeout=120)
    assert result.returncode == 4
    assert result.stderr.strip() == "meshtui: error: h2: probe failed: Welcome to the jungle"
    assert wait_nothing_left(lab) == {}


def test_host_that_hangs_in_probe_times_out_and_is_cleaned_up(lab, tmp_path: Path) -> None:
    python = host_python(lab, "h1", "*probe*) sleep 300;;")
    inventory = inventory_with_python(lab, tmp_path, "h1", python, extra_ssh="connect_timeout = 2")
    started = time.monotonic()
    result = meshtui("up", str(inventory), "--headless", "--prompt", "hi", timeout=120)
    assert result.returncode == 4
    assert result.stderr.strip() == "meshtui: error: h1: probe did not answer within 4s"
    assert time.monotonic() - started < 60
    assert wait_nothing_left(lab) == {}  # the hung probe's sleep too


def _listening_ports() -> set[str]:
    """Listening TCP sockets of this process (other processes on the machine are none of our business)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN, ours
                    ports.add(fields[1])
    return ports


def _children() -> list[str]:
    out = subprocess.run(["ps", "-o", "pid,args", "--ppid", str(os.getpid())], capture_output=True, text=True).stdout
    return [line for line in out.splitlines()[1:] if " ps " not in line]


async def test_soak_up_down_cycles_and_a_long_conversation_leak_nothing(lab, tmp_path: Path) -> None:
    inventory_file = tmp_path / "inventory.toml"
    inventory_file.write_text(lab.inventory_toml('name = "smollm2"').replace("context = 512", "context = 2048"))
    inventory = load_inventory(inventory_file)
    host_procs_before = {h.name: len(lab.processes_of(h)) for h in lab.hosts}

    def head_state() -> tuple[int, set[str], list[str]]:
        return len(os.listdir("/proc/self/fd")), _listening_ports(), _children()

    async def cycle(turns: int) -> int:
        mesh = Mesh(inventory)
        replies = 0
        try:
            await mesh.up()
            messages: list[dict[str, str]] = []
            for turn in range(turns):
                messages.append({"role": "user", "content": f"Say the number {turn}."})
                reply = await mesh.generate(messages=messages, max_tokens=6, temperature=0.0)
                messages.append({"role": "assistant", "content": reply.text})
                replies += 1
        finally:
            await mesh.close()
        return replies

    assert await cycle(1) == 1  # warm-up: imports, caches, the runtime pushed
    fds, ports, children = head_state()
    for turns in (1, 1, 50):
        assert await cycle(turns) == turns
        assert _wait(lambda: not any(agent_processes(lab).values()), 10)
        now_fds, now_ports, now_children = head_state()
        assert now_fds <= fds, (fds, now_fds)
        assert now_ports <= ports, now_ports - ports
        assert now_children == children
    host_procs_after = {h.name: len(lab.processes_of(h)) for h in lab.hosts}
    assert host_procs_after == host_procs_before
