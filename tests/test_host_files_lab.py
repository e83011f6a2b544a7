"""Files and input from hosts, on real OpenSSH hosts: private folders, checked runtimes, hostile answers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
from helpers import host_python, inventory_with_python, meshtui, user_processes, wait_nothing_left

from meshtui import events as ev
from meshtui.inventory import load_inventory
from meshtui.mesh import Mesh
from meshtui.runtime import local_runtime_bundle

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def _as_user(host, script: str) -> None:
    subprocess.run(["runuser", "-u", host.user, "--", "sh", "-c", script], check=True, timeout=30)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("meshtui: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_nothing_left_sees_a_process_of_the_hosts_user(lab) -> None:
    """Positive control for every "nothing left running" check: a sleep of h1's user is seen, then gone."""
    h1 = lab.host("h1")
    sleeper = subprocess.Popen(["runuser", "-u", h1.user, "--", "sleep", "297"])
    try:
        deadline = time.monotonic() + 10
        while not any("sleep 297" in cmd for _pid, cmd in user_processes(lab)["h1"]):
            assert time.monotonic() < deadline, user_processes(lab)
            time.sleep(0.1)
        left = wait_nothing_left(lab, timeout=0.5)
        assert [cmd for _pid, cmd in left["h1"]] == ["sleep 297"] and "h2" not in left
    finally:
        for pid, cmd in lab.processes_of(h1):
            if cmd == "sleep 297":
                os.kill(pid, 9)
        sleeper.wait()
    assert wait_nothing_left(lab) == {}


async def _up_and_down(inventory_file: Path) -> list[ev.Event]:
    seen: list[ev.Event] = []
    mesh = Mesh(load_inventory(inventory_file), listener=seen.append)
    try:
        await mesh.up()
        reply = await mesh.generate(prompt="Hi", raw=True, max_tokens=2, temperature=0.0)
        assert reply.token_ids
    finally:
        await mesh.close()
    return seen


def test_folders_are_private_and_a_changed_runtime_is_pushed_again(lab, tmp_path: Path) -> None:
    inventory_file = tmp_path / "inventory.toml"
    inventory_file.write_text(lab.inventory_toml('name = "smollm2"'))
    bundle = local_runtime_bundle()
    h1, h2 = lab.host("h1"), lab.host("h2")
    for host in (h1, h2):  # as if an older meshtui (or a loose umask) had made it
        _as_user(host, f"mkdir -p {host.home}/.cache/meshtui && chmod 755 {host.home}/.cache/meshtui")
    asyncio.run(_up_and_down(inventory_file))
    for host in (h1, h2):
        cache = host.home / ".cache/meshtui"
        runtime = host.home / bundle.remote_dir
        for folder in (cache, cache / "runtime", runtime, runtime / "lib", cache / "run", cache / "rpc-cache"):
            assert _mode(folder) == 0o700, folder
    # The host's user changes a library on h1 and loosens the agent's mode on h2; the next `up` replaces both.
    library = h1.home / bundle.remote_dir / "lib/libggml-base.so.0"
    _as_user(h1, f"printf x >> {library}")
    agent = h2.home / bundle.remote_dir / "meshtui_agent.py"
    _as_user(h2, f"chmod g+w {agent}")
    seen = asyncio.run(_up_and_down(inventory_file))
    warnings = {e.source: e.message for e in seen if isinstance(e, ev.LogRecorded) and e.level == "warning"
                and "pushing it again" in e.message}
    assert warnings == {
        "h1": "the runtime on the host was changed (lib/libggml-base.so.0: its sha256 is not the head's (the file "
              "was changed)); pushing it again",
        "h2": "the runtime on the host was changed (meshtui_agent.py: writable by group or others (mode 0720)); "
              "pushing it again",
    }
    local = dict(bundle.files)
    assert hashlib.sha256(library.read_bytes()).hexdigest() == hashlib.sha256(
        local["lib/libggml-base.so.0"].read_bytes()).hexdigest()
    assert _mode(agent) == 0o700
    assert not list((h1.home / ".cache/meshtui/runtime").glob("*.stale-*"))
    assert wait_nothing_left(lab) == {}


def test_a_runtime_under_a_folder_others_can_write_is_refused(lab, tmp_path: Path) -> None:
    inventory_file = tmp_path / "inventory.toml"
    inventory_file.write_text(lab.inventory_toml('name = "smollm2"'))
    h1 = lab.host("h1")
    cache = h1.home / ".cache/meshtui"
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run(["chown", "root:root", str(cache)], check=True)
    os.chmod(cache, 0o777)  # not the user's to tighten: meshtui must refuse, not run from there
    try:
        result = meshtui("up", str(inventory_file), "--headless", "--prompt", "hi", "--max-tokens", "2",
                         timeout=180)
    finally:
        os.chmod(cache, 0o700)
        subprocess.run(["chown", f"{h1.user}:", str(cache)], check=True)
    line = _one_error_line(result)
    assert line.startswith("meshtui: error: h1: refusing to run the agent from ~/.cache/meshtui/runtime/")
    assert line.endswith(": ~/.cache/meshtui: writable by group or others (mode 0777)")
    assert result.returncode == 4
    assert wait_nothing_left(lab) == {}


def _hostile_python(lab, host_name: str, probe_answer: str) -> str:
    return host_python(lab, host_name, f"*probe*) cat >/dev/null; printf '%s\\n' '{probe_answer}'; exit 0;;",
                       name="hostile-python")


@pytest.mark.parametrize(("answer", "expected"), [
    ('{"hostname": "h2", "os": "Linux", "arch": "x86_64", "python": "3.11", "cores": Infinity, "mem_total": 1, '
     '"mem_available": 1}', "key 'cores': expected an integer from 1 to 1048576"),
    ('{"hostname": "h2", "os": "Linux", "arch": "x86_64", "python": "3.11", "cores": 2, "mem_total": 1, '
     '"mem_available": 1, "gpus": ["x"]}', "key 'gpus[0]': expected an object"),
])
def test_a_hostile_probe_answer_is_one_line_naming_the_host(lab, tmp_path: Path, answer: str, expected: str) -> None:
    python = _hostile_python(lab, "h2", answer)
    inventory_file = inventory_with_python(lab, tmp_path, "h2", python)
    result = meshtui("plan", str(inventory_file), timeout=120)
    assert result.returncode == 4
    assert result.stderr.strip() == f"meshtui: error: h2: probe answered something unexpected: {expected}"
    assert wait_nothing_left(lab) == {}


def test_a_probe_that_floods_its_output_is_stopped(lab, tmp_path: Path) -> None:
    wrapper = host_python(lab, "h2", "*probe*) cat >/dev/null; exec yes meshtui;;", name="flooding-python")
    inventory_file = inventory_with_python(lab, tmp_path, "h2", wrapper)
    result = meshtui("plan", str(inventory_file), timeout=120)
    assert result.returncode == 4
    assert result.stderr.strip() == "meshtui: error: h2: probe printed more than 256 KiB; stopped reading"
    assert wait_nothing_left(lab) == {}


def test_an_agents_stderr_with_escapes_reaches_the_log_printable(lab, tmp_path: Path) -> None:
    wrapper = host_python(lab, "h1", '*serve*) printf "loading \\033]0;owned\\007 \\033[2J done\\n" >&2;;',
                          name="chatty-python")
    inventory_file = inventory_with_python(lab, tmp_path, "h1", wrapper)
    seen = asyncio.run(_up_and_down(inventory_file))
    logged = [e.message for e in seen if isinstance(e, ev.LogRecorded) and e.source == "h1"]
    assert "loading \\x1b]0;owned\\x07 \\x1b[2J done" in logged
    assert not any("\x1b" in e.message for e in seen if isinstance(e, ev.LogRecorded))
    assert wait_nothing_left(lab) == {}
