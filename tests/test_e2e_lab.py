"""End to end on real OpenSSH hosts in network namespaces: the mesh answers exactly like one process would."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import stat
import subprocess
import time
from pathlib import Path

import asyncssh
import pytest
from helpers import (
    SMOLLM2,
    agent_processes,
    host_python,
    inventory_with_python,
    meshtui,
    meshtui_json,
    wait_nothing_left,
)
from reference import reference_greedy

from meshtui.inventory import load_inventory
from meshtui.mesh import Mesh
from meshtui.report import summary as node_summary

PROMPT = "The three primary colors are"
MAX_TOKENS = 24

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def _listeners_in(lab, host, pid: int) -> list[str]:
    """Local addresses of every listening socket (TCP, UDP, Unix) of `pid`, seen inside `host`'s namespace."""
    out = lab.exec_in(host, ["ss", "-H", "-l", "-p", "-n", "-t", "-u", "-x"], check=True).stdout
    return sorted(line.split()[4] for line in out.splitlines() if f",pid={pid}," in line)


@pytest.mark.parametrize("output_on_head", [True, False], ids=["output-on-head", "output-on-last-stage"])
async def test_mesh_on_sshd_hosts_places_layers_and_matches_single_process(
        lab, tmp_path: Path, output_on_head: bool) -> None:
    inventory_file = tmp_path / "inventory.toml"
    inventory_file.write_text(lab.inventory_toml('name = "smollm2"'))
    mesh = Mesh(load_inventory(inventory_file), output_on_head=output_on_head)
    try:
        await mesh.up()
        assert mesh.plan is not None
        # Agents run on every host, as that host's own user.
        running = agent_processes(lab)
        assert all(running[h.name] for h in lab.hosts), running
        # llama.cpp put every layer exactly where the plan said, and every node holds some.
        planned = {a.name: mesh.plan.layers_of(a.name) for a in mesh.plan.assignments}
        assert mesh.placement == planned
        assert set(planned) == {"head", "h1", "h2"} and all(planned.values())
        assert mesh.plan.output_on_head == output_on_head
        # The output layer (index n_layer) is on the head's local stage, or else on the last stage.
        assert planned["head" if output_on_head else "h2"][-1] == mesh.plan.n_layer
        if output_on_head:
            # Only hidden states come back from the last stage: no logits (n_vocab floats) cross SSH.
            reply_bytes = mesh.stages["h2"].tunnel.meter.bytes_down
            assert reply_bytes < 1024 * 1024
        # Each stage listens on one Unix socket in a 0700 folder of its host's user, and on no port at all
        # (tests/test_isolation_lab.py: other users on the host and the head cannot reach any of them).
        for node in mesh.hosts:
            agent = mesh.stages[node.name].running_agent()
            own = lab.host(node.name)
            path = Path(agent.socket_path)
            assert path.parent.parent == own.home / ".cache/meshtui/run" and path.name == "stage.sock"
            folder = path.parent.stat()
            assert folder.st_uid == pwd.getpwnam(own.user).pw_uid and stat.S_IMODE(folder.st_mode) == 0o700
            assert _listeners_in(lab, own, agent.pid) == [str(path)]
        reply = await mesh.generate(prompt=PROMPT, raw=True, max_tokens=MAX_TOKENS, temperature=0.0)
    finally:
        await mesh.close()
    assert wait_nothing_left(lab) == {}
    expected = reference_greedy(SMOLLM2, PROMPT, MAX_TOKENS, context=512)
    assert list(reply.token_ids) == expected["tokens"]
    assert reply.text == expected["text"]
    assert len(reply.token_ids) == MAX_TOKENS


def test_cli_synthetic_model_with_other_layer_count_matches_single_process(lab, tmp_path: Path) -> None:
    from synth import synthetic_model

    model = synthetic_model(n_layer=7, n_ff=4096)  # blocks big enough that every node gets some
    inventory_file = tmp_path / "inventory.toml"
    inventory_file.write_text(lab.inventory_toml(f'path = "{model}"'))
    result = meshtui_json("up", str(inventory_file), "--headless", "--prompt", PROMPT, "--raw",
                          "--temperature", "0", "--max-tokens", "16")
    expected = reference_greedy(model, PROMPT, 16, context=512)
    assert result["tokens"] == expected["tokens"]
    assert result["text"] == expected["text"]
    plan = {row["name"]: row["layers"] for row in result["plan"]}
    assert plan["head"][0] == 0 and plan["h2"][1] == 7  # 7 blocks; the output layer stays on the head
    assert [row["output_layer"] for row in result["plan"]] == [True, False, False]
    assert plan["head"][1] == plan["h1"][0] and plan["h1"][1] == plan["h2"][0]
    assert result["placement"]["head"][-1] == 7
    nodes = {row["name"]: row for row in result["nodes"]}
    for name in ("head", "h1", "h2"):  # the head too: its layers and the output layer on its local stage
        assert nodes[name]["status"] == "ready"
        latency = nodes[name]["latency_ms"]
        assert latency["mean"] > 0 and latency["p95"] >= latency["mean"] * 0.5
    assert result["tokens_per_second"] > 0
    assert wait_nothing_left(lab) == {}


# ---------------------------------------------------------------- bad input: one line, non-zero, nothing left


def _one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("meshtui: error: ")
    assert "Traceback" not in result.stderr
    return lines[0]


def _run_bad(lab, tmp_path: Path, text: str) -> str:
    inventory_file = tmp_path / "inventory.toml"
    inventory_file.write_text(text)
    result = meshtui("up", str(inventory_file), "--headless", "--prompt", "hi", "--max-tokens", "4", timeout=120)
    line = _one_error_line(result)
    assert wait_nothing_left(lab) == {}
    return line


def test_unknown_host_key_is_refused_without_accept_new(lab, tmp_path: Path) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    text = lab.inventory_toml('name = "smollm2"').replace(str(lab.known_hosts), str(empty))
    line = _run_bad(lab, tmp_path, text)
    assert any(f"unknown host key for {h.address}:22" in line for h in lab.hosts) and "--accept-new" in line
    assert line.startswith("meshtui: error: h1: ") or line.startswith("meshtui: error: h2: ")


def test_accept_new_records_the_key_then_a_changed_key_is_refused(lab, tmp_path: Path) -> None:
    from meshtui.hostkeys import parse_known_hosts

    recorded = tmp_path / "known_hosts"
    recorded.write_text("")
    text = lab.inventory_toml('name = "smollm2"').replace(str(lab.known_hosts), str(recorded))
    inventory_file = tmp_path / "inventory.toml"
    inventory_file.write_text(text)
    result = meshtui("plan", str(inventory_file), "--accept-new", "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    keys = recorded.read_text().splitlines()
    entries = parse_known_hosts(recorded.read_text(), recorded)
    lab_keys = dict(line.split(maxsplit=1) for line in lab.known_hosts.read_text().splitlines())
    # One line per host, with its key, hashed exactly when this head's OpenSSH config says HashKnownHosts.
    assert len(keys) == len(lab.hosts)
    for h in lab.hosts:
        (entry,) = [e for e in entries if e.matches(h.address)]
        assert " ".join(entry.key.export_public_key().decode().split()[:2]) == lab_keys[h.address]
    openssh = subprocess.run(["ssh", "-G", lab.host("h1").address], capture_output=True, text=True, check=True)
    hashed = "hashknownhosts yes" in openssh.stdout.splitlines()
    assert all(line.startswith("|1|") == hashed for line in keys)
    # Now h1's recorded key is replaced by another one: that must be refused, accept-new or not.
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    h1 = lab.host("h1")
    recorded.write_text("".join(f"{h1.address} {other}\n" if e.matches(h1.address) else keys[e.line_number - 1] + "\n"
                                for e in entries))
    result = meshtui("plan", str(inventory_file), "--accept-new", timeout=120)
    line = _one_error_line(result)
    assert line.startswith(f"meshtui: error: h1: host key for {h1.address}:22 ")
    assert "CHANGED" in line


def test_refused_authentication_names_the_host(lab, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger_key"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(stranger))
    os.chmod(stranger, 0o600)
    text = lab.inventory_toml('name = "smollm2"').replace(str(lab.client_key), str(stranger))
    line = _run_bad(lab, tmp_path, text)
    assert any(f"authentication refused at {h.address}:22" in line for h in lab.hosts)


def test_unreachable_host_names_the_host(lab, tmp_path: Path) -> None:
    nobody = str(list(lab.subnet.hosts())[-1])  # in the lab's subnet, but no host answers there
    text = lab.inventory_toml('name = "smollm2"').replace(f'"{lab.host("h2").address}"', f'"{nobody}"')
    text = text.replace("[ssh]\n", "[ssh]\nconnect_timeout = 3\n")
    line = _run_bad(lab, tmp_path, text)
    assert line.startswith("meshtui: error: h2: ")
    assert f"{nobody}:22" in line


def test_missing_and_non_gguf_models_name_the_file(lab, tmp_path: Path) -> None:
    line = _run_bad(lab, tmp_path, lab.inventory_toml('path = "/nonexistent/model.gguf"'))
    assert "/nonexistent/model.gguf" in line
    text_file = tmp_path / "notes.gguf"
    text_file.write_text("this is not a model\n")
    line = _run_bad(lab, tmp_path, lab.inventory_toml(f'path = "{text_file}"'))
    assert str(text_file) in line and "GGUF" in line


def test_model_that_does_not_fit_names_the_shortfall(lab, tmp_path: Path) -> None:
    text = lab.inventory_toml('name = "smollm2"', {"h1": {"max_memory": "130MiB"}, "h2": {"max_memory": "130MiB"}})
    text = text.replace("compute = true", 'compute = true\nmax_memory = "150MiB"')
    line = _run_bad(lab, tmp_path, text)
    assert "short by" in line


def test_agent_that_dies_at_start_is_reported(lab, tmp_path: Path) -> None:
    h2 = lab.host("h2")
    wrapper = h2.home / "broken-python"
    wrapper.write_text('#!/bin/sh\ncase "$*" in *serve*) echo "cannot map the runtime: boom" >&2; exit 1;; esac\n'
                       'exec /usr/bin/python3 "$@"\n')
    os.chmod(wrapper, 0o755)
    text = lab.inventory_toml('name = "smollm2"', {"h2": {"python": str(wrapper)}})
    # The lab already sets python for every host; the later key would be a TOML duplicate, so replace it.
    lines = text.splitlines()
    h2_start = lines.index('name = "h2"')
    for i in range(h2_start, len(lines)):
        if lines[i].startswith("python = ") and str(wrapper) not in lines[i]:
            del lines[i]
            break
    line = _run_bad(lab, tmp_path, "\n".join(lines) + "\n")
    assert line.startswith("meshtui: error: h2: agent exited at start")
    assert "boom" in line
    # h1's agent was started too and must be gone as well (checked in _run_bad).


def test_down_stops_agents_left_behind(lab, tmp_path: Path) -> None:
    from meshtui.runtime import local_runtime_bundle

    inventory_file = tmp_path / "inventory.toml"
    inventory_file.write_text(lab.inventory_toml('name = "smollm2"'))

    async def bring_up_and_down() -> None:
        mesh = Mesh(load_inventory(inventory_file))
        try:
            await mesh.up()  # pushes the runtime to both hosts
        finally:
            await mesh.close()

    asyncio.run(bring_up_and_down())
    # An agent that outlived its head: started by hand, its stdin held open by a pipe nobody closes.
    h1 = lab.host("h1")
    runtime = h1.home / local_runtime_bundle().remote_dir
    script = h1.home / "orphan.sh"
    # The sleep holds the agent's stdin open; it is this test's to clean up (the agent is `down`'s).
    # Its command line carries an escape sequence, as a hostile host's could: `down` must not print it raw.
    script.write_text(f"sleep 299 | /usr/bin/python3 {runtime}/meshtui_agent.py serve --runtime {runtime} "
                      "--cache \"/tmp/meshtui-cache-$(printf '\\033]0;owned\\007')\"\n")
    orphan = lab.popen_in(h1, ["runuser", "-u", h1.user, "--", "env", f"HOME={h1.home}", "sh", str(script)])
    deadline = time.monotonic() + 20
    while not agent_processes(lab)["h1"] or not list((h1.home / ".cache/meshtui/run").glob("agent-*.json")):
        assert time.monotonic() < deadline, "the orphan agent did not start"
        time.sleep(0.2)
    (pid, _cmd), = agent_processes(lab)["h1"]
    result = meshtui("down", str(inventory_file), timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"h1: stopped agent pid {pid}: " in result.stdout
    assert "h2: nothing to stop" in result.stdout
    # The listing shows the agent's command line, its escape sequence made printable.
    assert "--cache /tmp/meshtui-cache-\\x1b]0;owned\\x07\n" in result.stdout
    assert "\x1b" not in result.stdout
    assert not agent_processes(lab)["h1"]
    orphan.kill()
    for pid, cmdline in lab.processes_of(h1):
        if cmdline.startswith("sleep 299"):
            os.kill(pid, 9)
    assert wait_nothing_left(lab) == {}


# ---------------------------------------------------------------- node loss mid-reply


async def _reply_with_loss(lab, tmp_path: Path, lose, keepalive: float = 5.0, step_costs: list | None = None):
    """One greedy reply, uninterrupted; then the same reply with `lose(mesh)` called at token 8. `step_costs` gets
    the mesh's timed step costs after the first load and after the reload."""
    from meshtui import events as ev

    inventory_file = tmp_path / "inventory.toml"
    text = lab.inventory_toml('name = "smollm2"').replace("[ssh]\n", f"[ssh]\nkeepalive_interval = {keepalive}\n")
    inventory_file.write_text(text)
    mesh = Mesh(load_inventory(inventory_file))
    try:
        await mesh.up()
        if step_costs is not None:
            step_costs.append(mesh.step_costs)
        clean = await mesh.generate(prompt=PROMPT, raw=True, max_tokens=40, temperature=0.0)
        finished = None
        async for event in mesh.stream(prompt=PROMPT, raw=True, max_tokens=40, temperature=0.0):
            if isinstance(event, ev.TokenGenerated) and event.index == 8:
                await asyncio.get_running_loop().run_in_executor(None, lose, mesh)
            if isinstance(event, ev.ReplyFinished):
                finished = event
        summary = {row["name"]: row for row in node_summary(mesh.state)}
        plan = mesh.plan
        if step_costs is not None:
            step_costs.append(mesh.step_costs)
    finally:
        await mesh.close()
    return clean, finished, mesh.recoveries, summary, plan


async def test_killed_agent_mid_reply_the_reply_completes_identically(lab, tmp_path: Path) -> None:
    def kill_h1_agent(mesh: Mesh) -> None:
        ((pid, _),) = agent_processes(lab)["h1"]
        os.kill(pid, 9)

    costs: list[tuple[float, ...]] = []
    clean, finished, recoveries, summary, plan = await _reply_with_loss(lab, tmp_path, kill_h1_agent,
                                                                        step_costs=costs)
    assert finished is not None
    assert finished.text == clean.text and finished.token_ids == clean.token_ids
    # The steps were timed once, after the first load; the reload kept those timings instead of timing again.
    first, after_reload = costs
    assert len(first) == 8 and after_reload == first
    # `lose` runs when the orchestrator sees token 8; the engine may have finished the next step by then
    assert [r.node for r in recoveries] == ["h1"] and 9 <= recoveries[0].token_index <= 10, recoveries
    assert recoveries[0].seconds > 0
    # The cause, not the agent's last log line (that goes to the log).
    assert (summary["h1"]["status"], summary["h1"]["reason"]) == ("failed", "killed by signal 9")
    assert [a.name for a in plan.assignments] == ["head", "h2"]  # re-planned on the survivors
    assert wait_nothing_left(lab) == {}


async def test_host_link_down_mid_reply_the_reply_completes_identically(lab, tmp_path: Path) -> None:
    def cut_h2(mesh: Mesh) -> None:
        lab.link_down(lab.host("h2"))

    try:
        clean, finished, recoveries, summary, plan = await _reply_with_loss(lab, tmp_path, cut_h2, keepalive=1.0)
    finally:
        lab.link_up(lab.host("h2"))
    assert finished is not None
    assert finished.text == clean.text and finished.token_ids == clean.token_ids
    # the cable goes down a few milliseconds after token 8 (`ip link`): a step or two may finish before it does
    assert [r.node for r in recoveries] == ["h2"] and 9 <= recoveries[0].token_index <= 11, recoveries
    # Keepalives are 1 s here: SSH or the step watchdog (tests/test_stalls_lab.py) notices first, by load.
    reason = summary["h2"]["reason"]
    assert summary["h2"]["status"] == "failed"
    assert reason == "SSH connection lost" or reason.startswith("lost after a "), reason
    assert [a.name for a in plan.assignments] == ["head", "h1"]
    # Once the link is back, h2's sshd learns the session is gone and its agent exits with it.
    assert wait_nothing_left(lab, timeout=60) == {}


async def test_sshd_and_its_sessions_killed_mid_reply_the_reply_completes_identically(lab, tmp_path: Path) -> None:
    def kill_h1_sshd(mesh: Mesh) -> None:
        lab.kill_sshd(lab.host("h1"), sessions=True)

    try:
        clean, finished, recoveries, summary, plan = await _reply_with_loss(lab, tmp_path, kill_h1_sshd)
    finally:
        lab.start_sshd(lab.host("h1"))
    assert finished is not None
    assert finished.text == clean.text and finished.token_ids == clean.token_ids
    assert [r.node for r in recoveries] == ["h1"]
    assert summary["h1"]["status"] == "failed"
    assert [a.name for a in plan.assignments] == ["head", "h2"]
    assert wait_nothing_left(lab) == {}


async def test_when_the_survivors_cannot_hold_the_model_the_error_says_so(lab, tmp_path: Path) -> None:
    from meshtui.errors import MeshError

    inventory_file = tmp_path / "inventory.toml"
    text = lab.inventory_toml('name = "smollm2"', {"h1": {"max_memory": "168MiB"}, "h2": {"max_memory": "168MiB"}})
    inventory_file.write_text(text.replace("compute = true", 'compute = true\nmax_memory = "200MiB"'))
    mesh = Mesh(load_inventory(inventory_file), parallel=1)  # memory sized for one sequence of KV cache
    try:
        await mesh.up()
        assert all(mesh.plan.layers_of(name) for name in ("head", "h1", "h2"))
        ((pid, _),) = agent_processes(lab)["h1"]
        os.kill(pid, 9)
        with pytest.raises(MeshError) as caught:
            await mesh.generate(prompt=PROMPT, raw=True, max_tokens=8, temperature=0.0)
        message = str(caught.value)
        assert message.startswith("h1 was lost (killed by signal 9)")
        assert "the remaining nodes cannot hold the model: " in message and "short by" in message
        assert "\n" not in message
        assert not mesh.ready
    finally:
        await mesh.close()
    assert wait_nothing_left(lab) == {}


async def test_failed_host_rejoins_automatically_before_the_next_reply(lab, tmp_path: Path) -> None:
    from meshtui import events as ev
    from meshtui.mesh import RejoinPolicy

    inventory_file = tmp_path / "inventory.toml"
    inventory_file.write_text(lab.inventory_toml('name = "smollm2"'))
    seen: list[ev.Event] = []
    mesh = Mesh(load_inventory(inventory_file), listener=seen.append)
    try:
        await mesh.up()
        mesh.enable_auto_rejoin(RejoinPolicy(first_delay=0.2, poll_seconds=0.1))
        clean = await mesh.generate(prompt=PROMPT, raw=True, max_tokens=16, temperature=0.0)
        ((pid, _),) = agent_processes(lab)["h1"]
        os.kill(pid, 9)
        # The loss is noticed by the next reply, which completes on the survivors.
        after_loss = await mesh.generate(prompt=PROMPT, raw=True, max_tokens=16, temperature=0.0)
        assert [a.name for a in mesh.plan.assignments] == ["head", "h2"]
        deadline = time.monotonic() + 30
        while "h1" not in mesh.rejoin_pending:
            assert time.monotonic() < deadline, "h1 was never found reachable again"
            await asyncio.sleep(0.1)
        rejoined = await mesh.generate(prompt=PROMPT, raw=True, max_tokens=16, temperature=0.0)
        assert [a.name for a in mesh.plan.assignments] == ["head", "h1", "h2"]
        assert mesh.node("h1").status == "ready"
        assert any(isinstance(e, ev.HostRejoined) and e.host == "h1" for e in seen)
    finally:
        await mesh.close()
    assert after_loss.token_ids == clean.token_ids == rejoined.token_ids
    assert wait_nothing_left(lab) == {}


def _build_record(lab) -> tuple[Path, dict]:
    """The head's record of this lab's h2's build (the head keeps them by host key, not by name)."""
    records = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "meshtui/host-builds"
    key = asyncssh.import_public_key(lab._state("h2").host_public_key).get_fingerprint("sha256")
    found = [p for p in records.glob("*.json") if json.loads(p.read_text()).get("host_key") == key]
    assert len(found) == 1, found
    return found[0], json.loads(found[0].read_text())


def _digests(folder: Path) -> dict[str, str]:
    import hashlib

    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".complete"}


def test_host_that_builds_its_own_runtime_joins_with_identical_output(lab, tmp_path: Path) -> None:
    inventory_file = tmp_path / "inventory.toml"
    inventory_file.write_text(lab.inventory_toml('name = "smollm2"', {"h2": {"runtime": "build"}}))
    args = ("up", str(inventory_file), "--headless", "--prompt", PROMPT, "--raw", "--temperature", "0",
            "--max-tokens", str(MAX_TOKENS), "--json")
    result = meshtui_json(*args[:-1], timeout=1800)
    expected = reference_greedy(SMOLLM2, PROMPT, MAX_TOKENS, context=512)
    assert result["tokens"] == expected["tokens"] and result["text"] == expected["text"]
    assert result["placement"]["h2"]  # h2 served layers, from the runtime it built
    built = list((lab.host("h2").home / ".cache/meshtui/runtime").glob("build-*/lib/libggml-cpu.so.0"))
    assert len(built) == 1
    folder = built[0].parent.parent
    assert not list((lab.host("h1").home / ".cache/meshtui/runtime").glob("build-*"))  # h1 got the pushed one
    assert wait_nothing_left(lab) == {}

    # The head recorded the digest of every file it built there, and checks them before each launch.
    record_file, record = _build_record(lab)
    assert record["files"] == _digests(folder) and "lib/libggml-rpc.so.0" in record["files"]

    # A library changed on the host after the build: never run; the build is made again and recorded anew.
    with (folder / "lib/libggml-rpc.so.0").open("ab") as lib:
        lib.write(b"\0")
    tampered = _digests(folder)["lib/libggml-rpc.so.0"]
    run = meshtui(*args, timeout=1800)
    assert run.returncode == 0, run.stderr
    assert ("h2: the runtime built on the host was changed (lib/libggml-rpc.so.0: its sha256 is not the head's "
            "(the file was changed)); building it again") in run.stderr
    assert json.loads(run.stdout)["tokens"] == expected["tokens"]
    record = json.loads(record_file.read_text())
    assert _digests(folder) == record["files"] and record["files"]["lib/libggml-rpc.so.0"] != tampered

    # A build this head has no record of (another head made it) is recorded when first met, and said so.
    record_file.unlink()
    run = meshtui(*args, timeout=1800)
    assert run.returncode == 0, run.stderr
    assert "found there, not built by this head: its digests are recorded in" in run.stderr
    assert json.loads(record_file.read_text())["files"] == record["files"]
    assert wait_nothing_left(lab) == {}


def test_host_that_cannot_load_the_pushed_runtime_builds_its_own(lab, tmp_path: Path) -> None:
    # h2's agent cannot load the pushed runtime (as on a host with another libc); the one it builds loads.
    wrapper = host_python(lab, "h2", '*/runtime/build-*) ;;\n*serve*) '
                          'echo \'{"event": "error", "code": "cannot_load", '
                          '"reason": "cannot load libggml-base.so.0: GLIBC_2.38 not found"}\'; exit 3;;',
                          name="old-libc-python")
    inventory_file = inventory_with_python(lab, tmp_path, "h2", wrapper)
    run = meshtui("up", str(inventory_file), "--headless", "--prompt", PROMPT, "--raw", "--temperature", "0",
                  "--max-tokens", str(MAX_TOKENS), "--json", timeout=1800)
    assert run.returncode == 0, run.stderr
    assert "  h2: agent cannot serve: cannot load libggml-base.so.0" in run.stderr
    assert "building the runtime on the host instead" in run.stderr
    result = json.loads(run.stdout)
    expected = reference_greedy(SMOLLM2, PROMPT, MAX_TOKENS, context=512)
    assert result["tokens"] == expected["tokens"] and result["text"] == expected["text"]
    assert result["placement"]["h2"]
    assert list((lab.host("h2").home / ".cache/meshtui/runtime").glob("build-*/lib/libggml-cpu.so.0"))
    assert wait_nothing_left(lab) == {}
