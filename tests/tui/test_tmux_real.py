"""The real app in a real terminal: `meshtui up` on the embedded lab, driven through tmux like a person would.

It brings the mesh up, asks one question, waits for the streamed reply and a latency for every host, quits
with q and checks that the agents it started are gone.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

MESHTUI = Path(sys.executable).with_name("meshtui")
LAB_ROOT = re.compile(r"/meshtui-lab-[^/\s]+/")
HOST_ROW = re.compile(r"│\s+(lab\d+)\s+127\.0\.0\.1\s+ready\s+\S+\s+.+?\s(\d+\.\d+) \(")


# A private tmux server per run, so the test neither sees nor disturbs anyone else's sessions.
SOCKET = f"meshtui-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
# readline (imported by pytest's debugging support) exports COLUMNS/LINES into this process's C environ;
# a pane that inherited them would make Textual believe the terminal is 80x24.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}


def tmux(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tmux", "-L", SOCKET, *args], capture_output=True, text=True, timeout=30,
                          env=CLEAN_ENV)


def screen(session: str) -> str:
    return tmux("capture-pane", "-p", "-t", session).stdout


def wait_for(what: str, check: Callable[[], bool], session: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; the screen:\n{screen(session)}")


def agent_lines() -> list[str]:
    result = subprocess.run(["pgrep", "-fa", "meshtui_agent"], capture_output=True, text=True)
    return [line for line in result.stdout.splitlines() if " serve" in line]


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # the process ended while we looked
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def test_meshtui_up_in_tmux_chats_measures_and_tears_down(tmp_path: Path) -> None:
    if shutil.which("tmux") is None:
        print("skipping: tmux is not installed (apt-get install tmux)")
        pytest.skip("tmux is not installed")
    assert MESHTUI.exists(), f"{MESHTUI} is missing: install the project into this venv"
    session = "meshtui"
    exit_file = tmp_path / "exit_code"
    agents_before = {line.split()[0] for line in agent_lines()}
    command = f"unset COLUMNS LINES; '{MESHTUI}' up; echo $? > '{exit_file}'"
    started = tmux("new-session", "-d", "-s", session, "-x", "140", "-y", "40", command)
    assert started.returncode == 0, started.stderr
    try:
        wait_for("the mesh to come up", lambda: "ask something; Enter sends" in screen(session), session, 120)
        pane_pid = int(tmux("display-message", "-p", "-t", session, "#{pane_pid}").stdout.strip())
        ours = {pid: line for line in agent_lines()
                if (pid := line.split()[0]).isdigit() and int(pid) in descendants(pane_pid)}
        roots = {m.group(0) for line in ours.values() if (m := LAB_ROOT.search(line))}
        assert ours and roots, f"no agents of this run found among:\n{agent_lines()}"

        tmux("send-keys", "-t", session, "-l", "Name three colours.")
        tmux("send-keys", "-t", session, "Enter")
        wait_for("the reply", lambda: "tok/s ·" in screen(session), session, 60)
        text = screen(session)
        assert "Name three colours." in text, text
        reply = text.split("Name three colours.", 1)[1]
        assert re.search(r"█ \S", reply), f"no reply text in the chat pane:\n{text}"

        def every_host_measured() -> bool:
            latencies = {m.group(1): float(m.group(2)) for m in HOST_ROW.finditer(screen(session))}
            return set(latencies) == {"lab1", "lab2"} and all(v > 0 for v in latencies.values())

        wait_for("a latency for every host", every_host_measured, session, 10)
        assert re.search(r"│\s+head\s+127\.0\.0\.1\s+ready\s+0–\d+(\+out)?\s", screen(session))

        tmux("send-keys", "-t", session, "Escape")  # leave the prompt so that q is a key, not a letter
        time.sleep(0.5)
        tmux("send-keys", "-t", session, "q")
        wait_for("the app to exit", lambda: tmux("has-session", "-t", session).returncode != 0, session, 30)
        assert exit_file.read_text().strip() == "0"

        def agents_gone() -> bool:
            left = [line for line in agent_lines()
                    if line.split()[0] in ours or any(root in line for root in roots)]
            return not left

        wait_for("this run's agents to exit", agents_gone, session, 15)
        new = {line.split()[0] for line in agent_lines()} - agents_before
        # agents of other runs on this machine (other test sessions) may come and go; ours must be gone
        assert not (new & set(ours))
    finally:
        if tmux("has-session", "-t", session).returncode == 0:
            # quit the app properly first: killing the pane would skip the teardown it is here to test
            tmux("send-keys", "-t", session, "C-c")
            deadline = time.monotonic() + 20
            while tmux("has-session", "-t", session).returncode == 0 and time.monotonic() < deadline:
                time.sleep(0.5)
            tmux("kill-server")  # our private server only (-L)
        socket_dir = Path(os.environ.get("TMUX_TMPDIR", "/tmp")) / f"tmux-{os.getuid()}"
        (socket_dir / SOCKET).unlink(missing_ok=True)
