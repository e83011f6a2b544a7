"""Host keys against OpenSSH itself: for each case meshtui and `ssh -o StrictHostKeyChecking=accept-new` (Debian's
openssh-client on the head) connect to the same lab host with the same ssh config and known_hosts files, and must
make the same accept/refuse decision and leave byte-identical known_hosts files (hashed lines: the same names and
key, since salts differ). Also: no agent or X11 forwarding whatever the config says, the engine without
SSH_AUTH_SOCK, a rejoin that takes only the key accepted at start, and `up`/`plan` refusing a changed key.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest
from helpers import meshtui

from meshtui import events as ev
from meshtui.errors import HostError
from meshtui.hostkeys import parse_known_hosts
from meshtui.inventory import HeadSpec, HostSpec, Inventory, ModelSpec, SSHSpec, load_inventory
from meshtui.mesh import Mesh, RejoinPolicy
from meshtui.ssh import connect_host

pytestmark = [pytest.mark.lab]

ALT_PORT = 2222  # a second sshd on h1, same host key, debug log: the non-22 port cases and forwarding checks


@dataclass
class AltSshd:
    """h1's second sshd, on ALT_PORT with LogLevel DEBUG1; restartable with another host key."""

    lab: object
    host: object
    directory: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.directory / "sshd-alt.log"

    def start(self, host_key: Path) -> None:
        base = (self.lab.root / self.host.name / "sshd_config").read_text()  # tests/lab/netns.py's layout
        config = re.sub(r"(?m)^(ListenAddress|HostKey|PidFile) .*\n", "", base) + "\n".join([
            f"ListenAddress {self.host.address}:{ALT_PORT}", f"HostKey {host_key}",
            f"PidFile {self.directory / 'sshd-alt.pid'}", "LogLevel DEBUG1", ""])
        (self.directory / "sshd_config").write_text(config)
        with open(self.log, "ab") as log:
            self.proc = self.lab.popen_in(self.host, ["/usr/sbin/sshd", "-D", "-e", "-f",
                                                      str(self.directory / "sshd_config")],
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        assert self.lab.wait_port_open(self.host, timeout=10, port=ALT_PORT), self.log.read_text()[-2000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        assert self.lab.wait_port_closed(self.host, timeout=10, port=ALT_PORT)

    def log_after(self, offset: int, until: str) -> str:
        """The log written since `offset`, once it shows `until` (sshd writes it as the session runs)."""
        deadline = time.monotonic() + 30
        while True:
            text = self.log.read_bytes()[offset:].decode(errors="replace")
            if until in text or time.monotonic() > deadline:
                return text
            time.sleep(0.05)


@pytest.fixture(scope="module")
def alt(lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AltSshd]:
    directory = tmp_path_factory.mktemp("sshd-alt")
    directory.chmod(0o700)
    sshd = AltSshd(lab, lab.host("h1"), directory)
    sshd.start(lab.root / "h1" / "ssh_host_ed25519_key")
    try:
        yield sshd
    finally:
        sshd.stop()


def _h1_key(lab) -> str:
    h1 = lab.host("h1")
    (line,) = [line for line in lab.known_hosts.read_text().splitlines() if line.split()[0] == h1.address]
    return " ".join(line.split()[1:3])


OTHER_KEY = " ".join(asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().split()[:2])


@dataclass(frozen=True)
class Case:
    config: str  # ~/.ssh/config for both; {addr} {port}
    user: str  # the user known_hosts before; {addr} {port} {key} {other}
    target: str = "{addr}"  # what is connected to: an inventory address, `ssh HOST`
    global_: str = ""  # the global known_hosts (/etc/ssh/ssh_known_hosts)
    accept_new: bool = True
    accepted: bool = True  # OpenSSH's decision, and meshtui's
    meshtui_accepts: bool | None = None  # only where meshtui deliberately differs
    hashed: bool = False  # HashKnownHosts: compare lines by what they match, salts differ
    hash_user_file: bool = False  # hash the user file first with `ssh-keygen -H` (OpenSSH's own hashing)


ALIAS = "Host mesh-h1\n  HostName {addr}\n  Port {port}\n"
CASES = {
    "alias-hostname-port-unknown-recorded": Case(ALIAS, "", target="mesh-h1"),
    "alias-hostname-port-known": Case(ALIAS, "[{addr}]:{port} {key}\n", target="mesh-h1"),
    "alias-port-falls-back-to-entry-without-port": Case(ALIAS, "{addr} {key}\n", target="mesh-h1"),
    "alias-port-entry-without-port-other-key-recorded": Case(ALIAS, "{addr} {other}\n", target="mesh-h1"),
    "alias-port-own-entry-other-key-changed": Case(ALIAS, "{addr} {key}\n[{addr}]:{port} {other}\n",
                                                   target="mesh-h1", accepted=False),
    "host-key-alias-ignores-address-entries": Case(ALIAS + "  HostKeyAlias Mesh.Example\n",
                                                   "{addr} {key}\n[{addr}]:{port} {key}\n", target="mesh-h1"),
    "ip-only-entry": Case("", "{addr} {key}\n"),
    "hashed-entry": Case("", "{addr} {key}\n", hash_user_file=True),
    "hashed-entry-other-key-changed": Case("", "{addr} {other}\n", hash_user_file=True, accepted=False),
    "hash-known-hosts-records-hashed": Case(ALIAS + "  HashKnownHosts yes\n", "", target="mesh-h1", hashed=True),
    "entry-only-in-global-file": Case("", "", global_="{addr} {key}\n"),
    "other-key-only-in-global-file-changed": Case("", "", global_="{addr} {other}\n", accepted=False),
    "changed-key": Case("", "{addr} {other}\n", accepted=False),
    "changed-key-without-accept-new": Case("", "{addr} {other}\n", accept_new=False, accepted=False),
    "revoked-key": Case("", "@revoked {addr} {key}\n{addr} {key}\n", accepted=False),
    "revoked-key-wildcard": Case("", "{addr} {key}\n@revoked * {key}\n", accepted=False),
    # OpenSSH looks only at [addr]:port for a non-22 port and records the revoked key; meshtui refuses it.
    "revoked-without-port-meshtui-stricter": Case(ALIAS, "@revoked {addr} {key}\n", target="mesh-h1",
                                                  meshtui_accepts=False),
    "unknown-without-accept-new": Case("", "", accept_new=False, accepted=False),
    "unknown-with-accept-new-recorded": Case("", ""),
    "check-host-ip-name-is-address": Case(ALIAS + "  CheckHostIP yes\n", "", target="mesh-h1"),
    "check-host-ip-with-host-key-alias": Case(ALIAS + "  CheckHostIP yes\n  HostKeyAlias mesh.example\n", "",
                                              target="mesh-h1"),
    "check-host-ip-adds-address-to-known-alias": Case(
        ALIAS + "  CheckHostIP yes\n  HostKeyAlias mesh.example\n", "mesh.example {key}\n", target="mesh-h1"),
}


def _user_text(directory: Path, case: Case, values: dict[str, str]) -> str:
    text = case.user.format(**values)
    if not case.hash_user_file:
        return text
    plain = directory / "to_hash"
    plain.write_text(text)
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(plain)], check=True, capture_output=True)
    hashed = plain.read_text()
    assert hashed.startswith("|1|") and len(hashed.splitlines()) == len(text.splitlines())
    return hashed


def _files(directory: Path, case: Case, values: dict[str, str], user_text: str) -> tuple[Path, Path, Path]:
    directory.mkdir(mode=0o700)
    config, user, global_ = directory / "config", directory / "known_hosts", directory / "ssh_known_hosts"
    config.write_text(case.config.format(**values))
    user.write_text(user_text)
    global_.write_text(case.global_.format(**values))
    return config, user, global_


def _openssh(lab, config: Path, user: Path, global_: Path, target: str, accept_new: bool) -> bool:
    h1 = lab.host("h1")
    result = subprocess.run(
        ["ssh", "-F", str(config), "-o", f"UserKnownHostsFile={user}", "-o", f"GlobalKnownHostsFile={global_}",
         "-o", f"StrictHostKeyChecking={'accept-new' if accept_new else 'yes'}", "-o", "BatchMode=yes",
         "-o", "IdentitiesOnly=yes", "-i", str(lab.client_key), "-l", h1.user, target, "true"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode in (0, 255), result.stderr
    return result.returncode == 0


async def _meshtui(lab, config: Path, user: Path, global_: Path, target: str, accept_new: bool) -> bool:
    h1 = lab.host("h1")
    spec = HostSpec(name="h1", address=target, user=h1.user, identity_file=lab.client_key)
    ssh = SSHSpec(known_hosts=user, config_files=(config,), global_known_hosts=(global_,), connect_timeout=10)
    try:
        conn = await connect_host(spec, ssh, accept_new=accept_new)
    except HostError as err:
        assert str(err).startswith("h1: ") and "\n" not in str(err)
        return False
    async with conn:
        assert (await conn.run("true", check=True, timeout=30)).exit_status == 0
    return True


def _matched_names(path: Path, names: list[str]) -> list[tuple[str, ...]]:
    """For each line: which of `names` it matches, and its key (how hashed lines are compared)."""
    return [(*sorted(n for n in names if e.matches(n)), e.key.export_public_key().decode().split()[1])
            for e in parse_known_hosts(path.read_text(), path)]


@pytest.mark.parametrize("case_id", list(CASES))
async def test_meshtui_decides_and_records_like_openssh(lab, alt, tmp_path: Path, case_id: str) -> None:
    case = CASES[case_id]
    h1 = lab.host("h1")
    values = {"addr": h1.address, "port": str(ALT_PORT), "key": _h1_key(lab), "other": OTHER_KEY}
    target = case.target.format(**values)
    user_text = _user_text(tmp_path, case, values)  # hashed once: both sides start from the same bytes
    ours = _files(tmp_path / "meshtui", case, values, user_text)
    theirs = _files(tmp_path / "openssh", case, values, user_text)
    before = ours[1].read_bytes()

    openssh_accepted = _openssh(lab, *theirs, target, case.accept_new)
    meshtui_accepted = await _meshtui(lab, *ours, target, case.accept_new)

    assert openssh_accepted == case.accepted
    expected = case.accepted if case.meshtui_accepts is None else case.meshtui_accepts
    assert meshtui_accepted == expected
    if case.meshtui_accepts is not None:  # it refused where OpenSSH accepted: it must have recorded nothing
        assert ours[1].read_bytes() == before
        return
    if case.hashed:
        names = [h1.address, f"[{h1.address}]:{ALT_PORT}", "mesh-h1"]
        assert _matched_names(ours[1], names) == _matched_names(theirs[1], names)
        assert all(line.startswith("|1|") for line in ours[1].read_text().splitlines())
        assert ours[1].read_text() != theirs[1].read_text()  # salted: the comparison above is what counts
        assert _matched_names(ours[1], names) == [(f"[{h1.address}]:{ALT_PORT}", values["key"].split()[1])]
    else:
        assert ours[1].read_bytes() == theirs[1].read_bytes()
    if not case.accepted:
        assert ours[1].read_bytes() == before


# ------------------------------------------------------------------------------ agent and X11 forwarding


@pytest.fixture
def ssh_agent(tmp_path: Path) -> Iterator[str]:
    socket_path = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket_path)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert socket_path.exists()
        yield str(socket_path)
    finally:
        agent.terminate()
        agent.wait(10)


async def test_no_agent_or_x11_forwarding_whatever_the_config_says(
        lab, alt, tmp_path: Path, ssh_agent: str, monkeypatch: pytest.MonkeyPatch) -> None:
    h1 = lab.host("h1")
    monkeypatch.setenv("SSH_AUTH_SOCK", ssh_agent)
    monkeypatch.setenv("DISPLAY", "localhost:10")
    config = tmp_path / "config"
    config.write_text(f"Host mesh-h1\n  HostName {h1.address}\n  Port {ALT_PORT}\n  ForwardAgent yes\n"
                      "  ForwardX11 yes\n  ForwardX11Trusted yes\n")
    known = tmp_path / "known_hosts"
    known.write_text(f"[{h1.address}]:{ALT_PORT} {_h1_key(lab)}\n")
    empty = tmp_path / "global"
    empty.write_text("")
    requests = ("req auth-agent-req@openssh.com", "req x11-req")

    # Positive control: OpenSSH's client with this config asks the host for both.
    offset = alt.log.stat().st_size
    assert _openssh(lab, config, known, empty, "mesh-h1", accept_new=False)
    log = alt.log_after(offset, "req exec")
    assert "req exec" in log and all(r in log for r in requests), log

    offset = alt.log.stat().st_size
    spec = HostSpec(name="h1", address="mesh-h1", user=h1.user, identity_file=lab.client_key)
    ssh = SSHSpec(known_hosts=known, config_files=(config,), global_known_hosts=(empty,))
    async with await connect_host(spec, ssh) as conn:
        await conn.run("true", check=True, timeout=30)
    log = alt.log_after(offset, "req exec")
    assert "req exec" in log
    assert not any(r in log for r in requests), log


async def test_the_engine_process_does_not_inherit_ssh_auth_sock(monkeypatch: pytest.MonkeyPatch) -> None:
    from meshtui.engine.client import EngineProcess

    monkeypatch.setenv("SSH_AUTH_SOCK", "/tmp/agent-of-the-user.sock")
    monkeypatch.setenv("SSH_AGENT_PID", "4242")
    engine = EngineProcess()
    await engine.start()
    try:
        environ = Path(f"/proc/{engine.pid}/environ").read_bytes().split(b"\0")
    finally:
        await engine.close()
    names = {entry.split(b"=", 1)[0] for entry in environ if entry}
    assert b"PATH" in names  # positive control: the environment was read
    assert b"SSH_AUTH_SOCK" not in names and b"SSH_AGENT_PID" not in names


# ------------------------------------------------------------------------------ rejoin pins the key


async def test_rejoin_takes_only_the_key_accepted_at_start(lab, alt, tmp_path: Path) -> None:
    h1 = lab.host("h1")
    known = tmp_path / "known_hosts"
    known.write_text("")
    empty = tmp_path / "global"
    empty.write_text("")
    spec = HostSpec(name="h1", address=h1.address, port=ALT_PORT, user=h1.user, identity_file=lab.client_key,
                    python="/usr/bin/python3")
    ssh = SSHSpec(known_hosts=known, config_files=(), global_known_hosts=(empty,), connect_timeout=10)
    inventory = Inventory("<test>", ModelSpec(path=None, name="smollm2"), HeadSpec(), ssh, (spec,))
    logs: list[ev.LogRecorded] = []
    mesh = Mesh(inventory, accept_new=True,
                listener=lambda e: logs.append(e) if isinstance(e, ev.LogRecorded) else None)
    impostor = tmp_path / "impostor_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(impostor)], check=True)
    try:
        await mesh.connect_and_probe()
        stage = mesh.stages["h1"]
        assert stage.host_key is not None
        assert known.read_text() == f"[{h1.address}]:{ALT_PORT} {_h1_key(lab)}\n"
        assert any("recorded new host key" in e.message for e in logs)
        # Positive control: the pinned key is taken on reconnect.
        async with await connect_host(spec, ssh, pinned_key=stage.host_key):
            pass

        # The host now shows another key, and known_hosts forgot the old one: accept-new would take it.
        alt.stop()
        alt.start(impostor)
        known.write_text("")
        async with await connect_host(spec, ssh, accept_new=True):
            pass
        assert known.read_text().startswith(f"[{h1.address}]:{ALT_PORT} ssh-ed25519 ")
        known.write_text("")

        mesh.node("h1").status = "failed"  # as after a lost stage; rejoin() reconnects, re-plans and reloads
        with pytest.raises(HostError, match=r"^h1: host key for .* is not the one it had when this mesh "
                                            r"connected to it; refusing to reconnect$"):
            await mesh.rejoin("h1")
        assert known.read_text() == ""

        mesh.node("h1").status = "failed"
        mesh.enable_auto_rejoin(RejoinPolicy(first_delay=0.0, max_delay=0.0, max_attempts=1, poll_seconds=0.05))
        deadline = time.monotonic() + 60
        while not any("rejoin attempt 1 failed" in e.message for e in logs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        (failed,) = [e.message for e in logs if "rejoin attempt 1 failed" in e.message]
        assert "is not the one it had when this mesh connected to it" in failed
        assert known.read_text() == ""
    finally:
        await mesh.close()
        alt.stop()
        alt.start(lab.root / "h1" / "ssh_host_ed25519_key")


# ------------------------------------------------------------------------------ the CLI: up and plan


@pytest.mark.parametrize("accept_new", [False, True], ids=["strict", "accept-new"])
@pytest.mark.parametrize("command", ["up", "plan"])
def test_a_changed_key_is_refused_by_up_and_plan(lab, tmp_path: Path, command: str, accept_new: bool) -> None:
    h1 = lab.host("h1")
    known = tmp_path / "known_hosts"
    lines = lab.known_hosts.read_text().splitlines()
    number = next(i for i, line in enumerate(lines, start=1) if line.startswith(h1.address + " "))
    lines[number - 1] = f"{h1.address} {OTHER_KEY}"
    known.write_text("\n".join(lines) + "\n")
    before = known.read_bytes()
    inventory_file = tmp_path / "inventory.toml"
    inventory_file.write_text(lab.inventory_toml('name = "smollm2"').replace(str(lab.known_hosts), str(known)))
    assert load_inventory(inventory_file).ssh.known_hosts == known
    args = [command, str(inventory_file)] + (["--headless", "--prompt", "hi", "--max-tokens", "4"]
                                            if command == "up" else [])
    result = meshtui(*args, *(["--accept-new"] if accept_new else []), timeout=120)
    lines_out = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert lines_out == [f"meshtui: error: h1: host key for {h1.address}:22 does not match {known}:{number}: it "
                         "CHANGED, refusing to connect (remove the old entry only if you know why it changed)"]
    assert known.read_bytes() == before
    assert not [p for p in lab.processes_of(h1) if "meshtui_agent" in p[1]]

