"""The namespace lab itself: real sshd hosts, loopback-only servers, cut links, clean teardown."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

import asyncssh
import pytest

try:  # see the import note in conftest.py
    from lab import netns as lab_netns
except ModuleNotFoundError:
    from tests.lab import netns as lab_netns

pytestmark = [pytest.mark.lab, pytest.mark.timeout(60)]

# Listens on the namespace's own 127.0.0.1, prints its port, greets every client with argv[1].
LOOPBACK_SERVER = """
import socket, sys
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(8)
print(srv.getsockname()[1], flush=True)
while True:
    conn, _ = srv.accept()
    conn.sendall(sys.argv[1].encode())
    conn.close()
"""

# Tries address:port once; prints refused / timeout / unreachable / got:<first bytes>.
PROBE_CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as s:
        s.settimeout(2)
        print("got:" + s.recv(64).decode(errors="replace"))
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timeout")
except OSError as exc:
    print("unreachable:", exc)
"""


def _connect(
    lab: lab_netns.Lab, host: lab_netns.LabHost, known_hosts: Path | None = None, **kwargs: object
):  # -> asyncssh's awaitable async context manager
    return asyncssh.connect(
        host.address,
        port=host.port,
        username=host.user,
        client_keys=[str(host.identity_file)],
        known_hosts=str(known_hosts or lab.known_hosts),
        agent_path=None,
        config=[],
        **kwargs,
    )


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no such process
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


async def test_each_host_logs_in_as_its_own_user(lab: lab_netns.Lab) -> None:
    assert [h.name for h in lab.hosts] == ["h1", "h2"]
    assert len({h.user for h in lab.hosts}) == 2
    documentation = [ipaddress.ip_network(n) for n in ("198.51.100.0/24", "203.0.113.0/24", "192.0.2.0/24")]
    assert lab.subnet is not None and any(lab.subnet.subnet_of(n) for n in documentation)
    assert all(ipaddress.ip_address(h.address) in lab.subnet for h in lab.hosts)
    for host in lab.hosts:
        async with _connect(lab, host) as conn:
            who = await conn.run("id -un", check=True, timeout=10)
            home = await conn.run("echo $HOME", check=True, timeout=10)
        assert who.stdout.strip() == host.user
        assert home.stdout.strip() == str(host.home)


async def test_host_keys_are_checked_per_address(lab: lab_netns.Lab, tmp_path: Path) -> None:
    h1, h2 = lab.hosts
    # h1's key filed under h2's address: asyncssh must refuse h2, proving the keys differ and checking is on.
    lines = lab.known_hosts.read_text().splitlines()
    h1_line = next(line for line in lines if line.startswith(h1.address + " "))
    wrong = tmp_path / "known_hosts"
    wrong.write_text(h1_line.replace(h1.address, h2.address, 1) + "\n")
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        async with _connect(lab, h2, known_hosts=wrong):
            pass


async def test_loopback_server_is_reachable_only_through_ssh(lab: lab_netns.Lab) -> None:
    h1, h2 = lab.hosts
    token = secrets.token_hex(8)
    server = lab.popen_in(
        h1, ["/usr/bin/python3", "-c", LOOPBACK_SERVER, token], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = int(await asyncio.wait_for(asyncio.to_thread(server.stdout.readline), 10))

        async with _connect(lab, h1) as conn:
            listener = await conn.forward_local_port("127.0.0.1", 0, "127.0.0.1", port)
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.get_port())
            greeting = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            listener.close()
        assert greeting.decode() == token

        # Not from the root namespace at the host's address...
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((h1.address, port), timeout=2).close()

        # ...nor from the other host, which can reach h1's sshd (the control) but not the server.
        def probe(address: str, probe_port: int) -> str:
            done = lab.exec_in(h2, ["/usr/bin/python3", "-c", PROBE_CLIENT, address, str(probe_port)])
            assert done.returncode == 0, done.stderr
            return done.stdout.strip()

        assert probe(h1.address, 22).startswith("got:SSH-2.0-OpenSSH")
        assert probe(h1.address, port) == "refused"
        assert token not in probe("127.0.0.1", port)  # h2's loopback is h2's own
    finally:
        server.kill()
        server.wait(5)


async def test_link_down_cuts_the_host_off_and_link_up_restores_it(lab: lab_netns.Lab) -> None:
    h1 = lab.host("h1")
    async with _connect(lab, h1) as before:
        lab.link_down(h1)
        try:
            with pytest.raises((OSError, asyncssh.Error, asyncio.TimeoutError)):
                await asyncio.wait_for(_connect(lab, h1), 3)
            # An open session stalls: no reply, no error, until someone times out.
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(before.run("true"), 2)
        finally:
            lab.link_up(h1)
        before.abort()
    async with _connect(lab, h1) as after:
        who = await after.run("id -un", check=True, timeout=10)
    assert who.stdout.strip() == h1.user


async def test_sshd_can_be_killed_and_restarted(lab: lab_netns.Lab) -> None:
    h2 = lab.host("h2")
    lab.kill_sshd(h2)
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((h2.address, h2.port), timeout=2).close()
    finally:
        restarted = lab.start_sshd(h2)
    assert restarted.sshd_pid != h2.sshd_pid
    assert lab.host("h2") == restarted
    async with _connect(lab, restarted) as conn:
        assert (await conn.run("id -un", check=True, timeout=10)).stdout.strip() == h2.user


async def test_close_leaves_nothing_behind(lab_factory) -> None:
    lab = lab_factory(1)
    host = lab.host("h1")
    # A detached process started over SSH outlives its session (as a stray agent would).
    async with _connect(lab, host) as conn:
        started = await conn.run("nohup sleep 300 >/dev/null 2>&1 & echo $!", check=True, timeout=10)
    sleeper = int(started.stdout)
    assert sleeper in dict(lab.processes_of(host))
    assert list(lab_netns.iter_lab_resources(lab.stem))  # the leak check does see a live lab

    lab.close()

    assert list(lab_netns.iter_lab_resources(lab.stem)) == []
    assert not _alive(sleeper)
    assert not _alive(host.sshd_pid)
    assert not host.home.exists()
    assert not lab.root.exists()
    assert not (lab_netns.STATE_DIR / f"{lab.stem}.json").exists()


def test_cleanup_stale_removes_a_killed_lab_and_spares_live_ones(lab: lab_netns.Lab, tmp_path: Path) -> None:
    tests_dir = Path(lab_netns.__file__).resolve().parents[1]
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; sys.path.insert(0, sys.argv[1]); from lab.netns import Lab; "
            "lab = Lab(1, prefix='mtlk', workdir=sys.argv[2]); print(lab.stem, flush=True); time.sleep(60)",
            str(tests_dir),
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        stem = child.stdout.readline().strip()
        assert stem.startswith("mtlk"), stem
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(5)
    assert list(lab_netns.iter_lab_resources(stem))  # killed: namespace, user, sshd all left behind

    lab_netns.cleanup_stale("mtlk")  # (a concurrent session may beat us to it: check the outcome)
    assert list(lab_netns.iter_lab_resources(stem)) == []

    assert lab.stem not in lab_netns.cleanup_stale(lab.prefix)  # the session's lab is alive
    assert list(lab_netns.iter_lab_resources(lab.stem)) and lab.wait_port_open("h1", 2)


def test_inventory_lists_every_host(lab: lab_netns.Lab) -> None:
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    text = lab.inventory_toml('name = "smollm2"', extra_host_keys={"h2": {"max_memory": "1GiB"}})
    inventory = tomllib.loads(text)
    assert inventory["model"] == {"name": "smollm2", "context": 512}
    assert inventory["ssh"]["known_hosts"] == str(lab.known_hosts)
    assert [h["address"] for h in inventory["hosts"]] == [h.address for h in lab.hosts]
    assert inventory["hosts"][0]["user"] == lab.host("h1").user
    assert inventory["hosts"][0]["python"] == "/usr/bin/python3"
    assert "max_memory" not in inventory["hosts"][0]
    assert inventory["hosts"][1]["max_memory"] == "1GiB"
    with pytest.raises(KeyError):
        lab.inventory_toml('name = "x"', extra_host_keys={"h9": {"max_memory": "1GiB"}})
