"""No other user reaches a stage or its cache (issue #12), proved on OpenSSH hosts in network namespaces.

While a mesh serves (the head and two hosts, the output layer on the head's local stage), every socket the mesh's
processes listen on is enumerated with `ss`, on each host (its agent) and on the head (the orchestrator's tunnels,
the engine, the local stage's agent). Another unprivileged user on a host and another on the head then try each
of them the way an attacker would: connect, HELLO, ALLOC_BUFFER, BUFFER_GET_BASE and a SET_TENSOR with the cache
flag (which makes ggml's server write a file into its cache dir), and write into the cache dir directly.

Every attempt is refused by the kernel (the sockets live in 0700 folders), the mesh answers the same prompt
exactly as before, and no cache dir changed. Controls show the checks can fail: the mesh's own user reaches
every one of those sockets; the same full probe, run as the host's user against a stage nobody holds, gets
ggml's HELLO and writes a cache file; a listener on a LAN address is found by the same enumeration.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import SMOLLM2
from lab.netns import SYSTEM_PYTHON, Lab, LabHost

from meshtui import runtime
from meshtui.inventory import load_inventory
from meshtui.mesh import Mesh

pytestmark = [pytest.mark.lab, pytest.mark.slow]

PROMPT = "The three primary colors are"
MAX_TOKENS = 8

# Run by any user with the system Python (stdlib only). argv: "connect" or "full", then targets:
# "unix:/path", "tcp:host:port" or "file:/path" (create that file). Prints one JSON list of results.
PROBE = r'''
import json, socket, struct, sys

TIMEOUT = 5.0  # only so that a stage busy with its engine cannot hang the probe; no result depends on it
CMD_ALLOC_BUFFER, CMD_GET_ALIGNMENT, CMD_BUFFER_GET_BASE, CMD_SET_TENSOR, CMD_HELLO = 0, 1, 3, 6, 14
DATA = b"intruder" * 64  # 128 floats


def frame(cmd, payload):
    return bytes([cmd]) + struct.pack("<Q", len(payload)) + payload


def exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def reply(sock):
    (size,) = struct.unpack("<Q", exactly(sock, 8))
    return exactly(sock, size)


def rpc_tensor(buffer, data, n):
    """ggml-rpc.cpp's packed rpc_tensor (296 bytes): an F32 vector of n floats at `data` in `buffer`."""
    return (struct.pack("<QIQ", 1, 0, buffer) + struct.pack("<4I", n, 1, 1, 1)
            + struct.pack("<4I", 4, 4 * n, 4 * n, 4 * n) + struct.pack("<I", 0) + bytes(64) + struct.pack("<i", 0)
            + bytes(8 * 10) + struct.pack("<QQQ", 0, 0, data) + b"probe".ljust(64, b"\0") + struct.pack("<i", 0))


def drive(sock):
    out = {}
    sock.sendall(frame(CMD_HELLO, bytes(24)))
    out["hello"] = list(reply(sock)[:3])
    sock.sendall(frame(CMD_ALLOC_BUFFER, struct.pack("<IQ", 0, 4096)))
    buffer, size = struct.unpack("<QQ", reply(sock))
    out["alloc_size"] = size
    sock.sendall(frame(CMD_BUFFER_GET_BASE, struct.pack("<Q", buffer)))
    (base,) = struct.unpack("<Q", reply(sock))
    cached = b"\x01" + struct.pack("<Q", 0)  # cache_flag 1, offset 0
    sock.sendall(frame(CMD_SET_TENSOR, rpc_tensor(buffer, base, len(DATA) // 4) + cached + DATA))
    sock.sendall(frame(CMD_GET_ALIGNMENT, struct.pack("<I", 0)))  # answered only after the SET_TENSOR
    reply(sock)
    out["set_tensor"] = "done"
    return out


def attempt(target, mode):
    kind, _, where = target.partition(":")
    result = {"target": target}
    try:
        if kind == "file":
            with open(where, "xb") as f:
                f.write(DATA)
            return dict(result, result="written")
        if kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(TIMEOUT)
            sock.connect(where)
        else:
            host, _, port = where.rpartition(":")
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout=TIMEOUT)
    except OSError as err:
        return dict(result, result="refused", error=type(err).__name__)
    result["result"] = "connected"
    with sock:
        if mode == "full":
            try:
                result.update(drive(sock))
            except socket.timeout:
                result["stalled"] = True  # queued behind the engine's connection: reached, not served yet
            except (OSError, struct.error) as err:
                result["error"] = type(err).__name__
    return result


print(json.dumps([attempt(target, sys.argv[1]) for target in sys.argv[2:]]))
'''


# ---------------------------------------------------------------- enumerating listeners


def parse_listeners(ss_output: str, pids: set[int]) -> list[tuple[str, str]]:
    """(netid, local address) of every listening socket `ss -H -l -p -n -t -u -x` shows for one of `pids`."""
    found = []
    for line in ss_output.splitlines():
        fields = line.split()
        if len(fields) > 4 and {int(p) for p in re.findall(r"\bpid=(\d+)", line)} & pids:
            found.append((fields[0], fields[4]))
    return sorted(found)


def on_lan(listeners: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The listeners a machine on the network could reach: TCP or UDP on anything but loopback."""
    def loopback(address: str) -> bool:
        host = address.rpartition(":")[0].strip("[]").split("%")[0]
        return host.startswith("127.") or host == "::1"

    return [(netid, address) for netid, address in listeners if netid in ("tcp", "udp") and not loopback(address)]


SS = ["ss", "-H", "-l", "-p", "-n", "-t", "-u", "-x"]


def head_listeners(pids: set[int]) -> list[tuple[str, str]]:
    return parse_listeners(subprocess.run(SS, capture_output=True, text=True, check=True).stdout, pids)


def host_listeners(lab: Lab, host: LabHost, pids: set[int]) -> list[tuple[str, str]]:
    return parse_listeners(lab.exec_in(host, SS, check=True).stdout, pids)


def as_user(user: str, argv: list[str]) -> list[str]:
    return ["runuser", "-u", user, "--", *argv]


def probe_argv(user: str, mode: str, targets: list[str]) -> list[str]:
    return as_user(user, [str(SYSTEM_PYTHON), "-c", PROBE, mode, *targets])


async def probe_on_head(user: str, mode: str, targets: list[str]) -> list[dict[str, Any]]:
    # In a thread: the orchestrator's tunnels run on this event loop and must keep serving meanwhile.
    result = await asyncio.to_thread(subprocess.run, probe_argv(user, mode, targets), capture_output=True,
                                     text=True, check=True, cwd="/", timeout=120)
    return list(json.loads(result.stdout))


async def probe_on_host(lab: Lab, host: LabHost, user: str, mode: str, targets: list[str]) -> list[dict[str, Any]]:
    result = await asyncio.to_thread(lab.exec_in, host, probe_argv(user, mode, targets), cwd="/", check=True,
                                     timeout=120)
    return list(json.loads(result.stdout))


def cache_state(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder`: (size, mtime in ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(results: list[dict[str, Any]]) -> bool:
    return all(r["result"] == "refused" and r["error"] == "PermissionError" for r in results)


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def head_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The head's cache and run folders in a world-searchable place (not root's 0700 home): only meshtui's own
    0700 folders stand between another user of the head and its sockets."""
    base = Path(tempfile.mkdtemp(prefix="mtiso-"))
    base.chmod(0o755)
    monkeypatch.setenv("MESHTUI_RUNTIME_BUILD_CACHE", str(runtime.portable_cache_root()))
    monkeypatch.setenv("XDG_CACHE_HOME", str(base))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def other_users(lab: Lab) -> Iterator[Callable[[], str]]:
    made: list[str] = []

    def make() -> str:
        made.append(lab.add_user())
        return made[-1]

    yield make
    for user in made:
        lab.remove_user(user)


@pytest.fixture
def lan_decoys(lab: Lab) -> Iterator[Callable[[LabHost | None], int]]:
    """Start a process listening on every address of a host (or of the head): the LAN check's positive control."""
    procs: list[subprocess.Popen[str]] = []
    code = ("import socket, sys; s = socket.socket(); s.bind(('0.0.0.0', 0)); s.listen(); "
            "print(s.getsockname()[1], flush=True); sys.stdin.read()")

    def start(host: LabHost | None) -> int:
        argv = [str(SYSTEM_PYTHON), "-c", code]
        kw: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
        proc = lab.popen_in(host, argv, **kw) if host is not None else subprocess.Popen(argv, **kw)
        procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip().isdigit()  # listening
        return proc.pid

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(5)


# ---------------------------------------------------------------- the test


async def test_no_other_user_reaches_a_stage_or_its_cache(
        lab: Lab, tmp_path: Path, head_state: Path, other_users: Callable[[], str],
        lan_decoys: Callable[[LabHost | None], int]) -> None:
    for host in lab.hosts:  # homes others may enter (useradd with UMASK 022): only meshtui's folders protect
        assert stat.S_IMODE(host.home.stat().st_mode) & 0o005 == 0o005
    intruder_on_hosts, intruder_on_head = other_users(), other_users()
    inventory_file = tmp_path / "inventory.toml"
    inventory_file.write_text(lab.inventory_toml('name = "smollm2"'))
    assert SMOLLM2.exists()
    mesh = Mesh(load_inventory(inventory_file), output_on_head=True)
    try:
        await mesh.up()
        assert mesh.engine is not None and mesh.local_stage is not None and mesh.local_stage.proc is not None
        before = await mesh.generate(prompt=PROMPT, raw=True, max_tokens=MAX_TOKENS, temperature=0.0)

        # Every socket the mesh listens on: Unix sockets only, exactly the tunnels and the stages.
        head_pids = {os.getpid(), mesh.engine.pid, mesh.local_stage.proc.pid}
        on_head = head_listeners(head_pids)
        tunnels = {str(stage.tunnel.local_path) for stage in mesh.stages.values()
                   if stage.tunnel and stage.tunnel.local_path}
        assert len(tunnels) == 2
        assert on_head == sorted(("u_str", p) for p in (*tunnels, mesh.local_stage.socket_path))
        assert on_lan(on_head) == []
        on_hosts: dict[str, list[tuple[str, str]]] = {}
        for node in mesh.hosts:
            agent = mesh.stages[node.name].running_agent()
            on_hosts[node.name] = host_listeners(lab, lab.host(node.name), {agent.pid})
            assert on_hosts[node.name] == [("u_str", agent.socket_path)]
            assert on_lan(on_hosts[node.name]) == []

        caches = {h.name: h.home / ".cache/meshtui/rpc-cache" for h in lab.hosts}
        caches["head"] = head_state / "meshtui" / "rpc-cache"
        cached_before = {name: cache_state(folder) for name, folder in caches.items()}

        # Another user on each host, then another on the head, tries every one of them and the cache dir.
        for host in lab.hosts:
            targets = [f"unix:{address}" for _, address in on_hosts[host.name]]
            targets.append(f"file:{caches[host.name] / 'planted'}")
            results = await probe_on_host(lab, host, intruder_on_hosts, "full", targets)
            assert [r["target"] for r in results] == targets
            assert refused(results), results
        head_targets = [f"unix:{address}" for _, address in on_head] + [f"file:{caches['head'] / 'planted'}"]
        results = await probe_on_head(intruder_on_head, "full", head_targets)
        assert [r["target"] for r in results] == head_targets
        assert refused(results), results

        # Control: the mesh's own users reach every one of those sockets (ggml queues them behind the engine).
        for host in lab.hosts:
            targets = [f"unix:{address}" for _, address in on_hosts[host.name]]
            results = await probe_on_host(lab, host, host.user, "connect", targets)
            assert [r["result"] for r in results] == ["connected"], results
        results = await probe_on_head("root", "connect", head_targets[:-1])
        assert [r["result"] for r in results] == ["connected"] * 3, results

        after = await mesh.generate(prompt=PROMPT, raw=True, max_tokens=MAX_TOKENS, temperature=0.0)
        assert list(after.token_ids) == list(before.token_ids) and after.text == before.text
        assert {name: cache_state(folder) for name, folder in caches.items()} == cached_before

        # Control: nothing on the LAN because nothing is there, not because the check is blind.
        decoy = lan_decoys(lab.hosts[0])
        h1_agent = mesh.stages[lab.hosts[0].name].running_agent()
        found = on_lan(host_listeners(lab, lab.hosts[0], {h1_agent.pid, decoy}))
        assert [netid for netid, _ in found] == ["tcp"] and found[0][1].startswith("0.0.0.0:")
        decoy = lan_decoys(None)
        found = on_lan(head_listeners(head_pids | {decoy}))
        assert [netid for netid, _ in found] == ["tcp"] and found[0][1].startswith("0.0.0.0:")
    finally:
        await mesh.close()


async def test_the_probe_drives_a_stage_it_can_reach_and_writes_its_cache(
        lab: Lab, other_users: Callable[[], str]) -> None:
    """Control for the test above: on a stage no engine holds, the same full probe, run as the host's own user,
    gets ggml's HELLO v7 and makes the server write a cache file; run as another user it is refused."""
    host = lab.hosts[0]
    intruder = other_users()
    bundle = runtime.local_runtime_bundle()
    folder = host.home / "probe-runtime"
    cache = host.home / "probe-cache"
    # The runtime as a push leaves it, owned by the host's user, and an agent serving it as that user.
    for rel, local in bundle.files:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(local, folder / rel)
    subprocess.run(["chown", "-R", f"{host.user}:{host.user}", str(folder)], check=True)
    agent = lab.popen_in(host, as_user(host.user, [
        "env", f"HOME={host.home}", str(SYSTEM_PYTHON), str(folder / runtime.AGENT_FILE), "serve",
        "--runtime", str(folder), "--threads", "1", "--cache", str(cache)]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert agent.stdout is not None and agent.stdin is not None
        ready = json.loads(agent.stdout.readline())
        assert ready["event"] == "ready", ready
        target = f"unix:{ready['socket']}"
        results = await probe_on_host(lab, host, intruder, "full", [target, f"file:{cache / 'planted'}"])
        assert refused(results), results
        assert list(cache.iterdir()) == []
        results = await probe_on_host(lab, host, host.user, "full", [target])
        assert results == [{"target": target, "result": "connected", "hello": [7, 0, 0], "alloc_size": 4096,
                            "set_tensor": "done"}]
        written = list(cache.iterdir())
        assert len(written) == 1 and written[0].read_bytes() == b"intruder" * 64
    finally:
        if agent.stdin is not None:
            agent.stdin.close()
        agent.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)


def test_parse_listeners_and_on_lan() -> None:
    ss = """u_str LISTEN 0 1 /home/u/.cache/meshtui/run/stage-ab/stage.sock 5871 * 0 users:(("python3",pid=41,fd=3))
u_str LISTEN 0 1 /run/other.sock 5872 * 0 users:(("other",pid=7,fd=3))
tcp LISTEN 0 4096 127.0.0.1:8000 0.0.0.0:* users:(("python3",pid=41,fd=9),("python3",pid=42,fd=9))
tcp LISTEN 0 4096 0.0.0.0:2024 0.0.0.0:*
udp UNCONN 0 0 [::]:5353 [::]:* users:(("python3",pid=42,fd=4))
"""
    found = parse_listeners(ss, {41, 42})
    assert found == [("tcp", "127.0.0.1:8000"), ("u_str", "/home/u/.cache/meshtui/run/stage-ab/stage.sock"),
                     ("udp", "[::]:5353")]
    assert on_lan(found) == [("udp", "[::]:5353")]
    assert parse_listeners(ss, {99}) == []
