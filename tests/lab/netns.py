"""A lab of real OpenSSH hosts, each in its own Linux network namespace.

Why: meshtui reaches agents only through SSH port forwards to servers bound to
127.0.0.1 on each host. A namespace gives every lab host its own loopback and
its own address, so a test can prove that a stage is reachable through SSH and
through nothing else, with Debian's real sshd instead of an in-process server.

Layout of one lab (names carry a random suffix so concurrent and leftover runs
never collide; ``stem = prefix + 6 hex digits``)::

    root namespace                         namespace <stem>h1
    bridge <stem>br 198.51.100.1/26 --- veth <stem>v1 === eth0 198.51.100.11/26, lo
                                    --- veth <stem>v2 === eth0 198.51.100.12/26  (<stem>h2)

Each host has a Unix user ``<stem>h<i>`` and runs ``/usr/sbin/sshd -D -e`` in
its namespace with its own config, host key and pid file. The only packets the
lab sends leave for its own RFC 5737 documentation subnet.

Plain stdlib + subprocess on purpose: the module must import without pytest so
it can also back benchmarks and manual experiments. Everything needs root.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

SSHD = Path("/usr/sbin/sshd")
SYSTEM_PYTHON = Path("/usr/bin/python3")
DEFAULT_PREFIX = "mtl"
SSH_PORT = 22
# Lab networks: /26 blocks of the RFC 5737 documentation ranges, tried in order.
# A lab takes the first block with no address on any interface of the root
# namespace, so labs of concurrent test sessions get separate routes. The first
# lab of a machine gets 198.51.100.0/26: gateway .1, hosts .11, .12, ...
SUBNETS = tuple(
    ipaddress.IPv4Network(f"{net}.{offset}/26")
    for net in ("198.51.100", "203.0.113", "192.0.2")
    for offset in (0, 64, 128, 192)
)
STATE_DIR = Path("/run/meshtui-lab")
PRIVSEP_DIR = Path("/run/sshd")
DISABLE_ENV = "MESHTUI_NO_LAB"

_SUFFIX_LEN = 6  # hex digits
_MAX_PREFIX = 5  # keeps "<prefix><suffix>v<nn>" within IFNAMSIZ-1 = 15 chars
_MAX_HOSTS = 50  # host i is .10+i of a /26
_CMD_TIMEOUT = 30.0


class LabError(RuntimeError):
    """The lab could not be built, driven or torn down; the message says which step."""


@dataclass(frozen=True)
class LabHost:
    """One lab host as a test sees it. Replaced (not mutated) when its sshd restarts."""

    name: str
    namespace: str
    address: str
    port: int
    user: str
    home: Path
    identity_file: Path
    sshd_pid: int


@dataclass
class _HostState:
    """What the lab itself needs to drive and tear down one host."""

    index: int
    name: str
    namespace: str
    user: str
    address: str
    veth_root: str
    directory: Path
    sshd_config: Path
    sshd_log: Path
    host_public_key: str = ""
    home: Path | None = None
    sshd: subprocess.Popen[bytes] | None = None
    user_created: bool = False
    namespace_created: bool = False
    hidden_libs: tuple[str, ...] = ()


# --------------------------------------------------------------------------- helpers


def _run(
    argv: Sequence[str | os.PathLike[str]], *, check: bool = True, timeout: float = _CMD_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [os.fspath(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        cmd = " ".join(os.fspath(a) for a in argv)
        detail = (proc.stderr or proc.stdout).strip()
        raise LabError(f"`{cmd}` failed ({proc.returncode}): {detail}")
    return proc


def _stem_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(prefix)}(?P<suffix>[0-9a-f]{{{_SUFFIX_LEN}}})(?:h\d+|br|v\d+|u\d+)$")


def _list_namespaces() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False).stdout
    # Lines look like "name" or "name (id: 3)".
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _list_links() -> list[str]:
    out = _run(["ip", "-o", "link", "show"], check=False).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names


def _link_exists(name: str) -> bool:
    return _run(["ip", "link", "show", "dev", name], check=False).returncode == 0


def _namespace_pids(namespace: str) -> list[int]:
    out = _run(["ip", "netns", "pids", namespace], check=False).stdout
    return [int(tok) for tok in out.split() if tok.isdigit() and not _is_zombie(int(tok))]


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone entirely: as dead as a zombie
        return True
    return stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X")


def _uid_pids(uid: int) -> list[int]:
    """Live processes of ``uid``. Zombies are left out: here PID 1 reaps orphans only every
    second or two, and a zombie can neither be killed nor hold anything."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if entry.stat().st_uid == uid and not _is_zombie(int(entry.name)):
                pids.append(int(entry.name))
    return pids


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # the process is gone: report it as such
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _kill_all(pids_of: Callable[[], list[int]], attempts: int = 20) -> list[int]:
    """SIGKILL whatever ``pids_of()`` lists until it lists nothing; return survivors."""
    own = os.getpid()
    pids: list[int] = []
    for _ in range(attempts):
        pids = [p for p in pids_of() if p != own]
        if not pids:
            return []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # already exited
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    return [p for p in pids_of() if p != own]


def _delete_user(user: str) -> None:
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:  # never created or already gone
        return
    survivors = _kill_all(lambda: _uid_pids(uid))
    if survivors:
        raise LabError(f"processes of {user} would not die: {survivors}")
    # -r removes home and mail spool, -f even if the user still appears logged in.
    proc = _run(["userdel", "-r", "-f", user], check=False)
    # Exit 12 is only "could not remove home"; the account itself is gone then.
    if proc.returncode not in (0, 12) and user in {p.pw_name for p in pwd.getpwall()}:
        raise LabError(f"userdel {user} failed: {proc.stderr.strip()}")


def _delete_namespace(namespace: str) -> None:
    if namespace not in _list_namespaces():
        return
    survivors = _kill_all(lambda: _namespace_pids(namespace))
    if survivors:
        raise LabError(f"processes in namespace {namespace} would not die: {survivors}")
    proc = _run(["ip", "netns", "delete", namespace], check=False)
    if proc.returncode != 0 and namespace in _list_namespaces():  # gone meanwhile is fine
        raise LabError(f"`ip netns delete {namespace}` failed: {proc.stderr.strip()}")


def _delete_link(name: str) -> None:
    # A deleted namespace takes its veth peers along asynchronously (kernel
    # cleanup work), so the link may vanish between the check and the delete.
    if _link_exists(name):
        proc = _run(["ip", "link", "delete", "dev", name], check=False)
        if proc.returncode != 0 and _link_exists(name):
            raise LabError(f"`ip link delete dev {name}` failed: {proc.stderr.strip()}")


def _tcp_open(address: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:  # refused, unreachable or timed out: closed for our purpose
        return False


def _assigned_ipv4() -> set[str]:
    out = _run(["ip", "-4", "-o", "addr", "show"], check=False).stdout
    found = re.findall(r"\binet (\d+\.\d+\.\d+\.\d+)/", out)
    return set(found)


def _free_subnets(taken: set[str]) -> list[ipaddress.IPv4Network]:
    used = [ipaddress.IPv4Address(a) for a in taken]
    return [net for net in SUBNETS if not any(a in net for a in used)]


def _lock_is_held(path: Path) -> bool:
    """True when a live process holds the lab's flock on ``path`` (its lab is running)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing also drops the lock we may have taken
    return False


# --------------------------------------------------------------------------- public functions


def lab_unavailable_reason() -> str | None:
    """None when a lab can be built here, else one line saying why not."""
    if os.environ.get(DISABLE_ENV):
        return f"{DISABLE_ENV} is set"
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, useradd, sshd)"
    for tool in ("ip", "ssh-keygen", "useradd", "userdel"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not on PATH"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} is missing (apt-get install openssh-server)"
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} is missing (lab users run agents with the system python3)"
    probe = f"{DEFAULT_PREFIX}probe{secrets.token_hex(3)}"  # 14 chars: room for one more
    try:
        add = _run(["ip", "netns", "add", probe], check=False)
        if add.returncode != 0:
            return f"cannot create a network namespace: {add.stderr.strip()}"
        veth = _run(
            [
                "ip",
                "link",
                "add",
                f"{probe}a",
                "type",
                "veth",
                "peer",
                "name",
                f"{probe}b",
                "netns",
                probe,
            ],
            check=False,
        )
        if veth.returncode != 0:
            return f"cannot create a veth pair: {veth.stderr.strip()}"
        _run(["ip", "link", "delete", f"{probe}a"], check=False)
        bridge = _run(["ip", "link", "add", f"{probe}r", "type", "bridge"], check=False)
        if bridge.returncode != 0:
            return f"cannot create a bridge: {bridge.stderr.strip()}"
        _run(["ip", "link", "delete", f"{probe}r"], check=False)
    except (OSError, subprocess.SubprocessError) as exc:  # ip missing or hung: not usable
        return f"probing network namespaces failed: {exc}"
    finally:
        _run(["ip", "netns", "delete", probe], check=False)
    taken = _assigned_ipv4()
    if not _free_subnets(taken):
        return "every lab subnet is in use (leftovers of killed runs? see cleanup_stale)"
    return None


def cleanup_stale(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove what killed labs with ``prefix`` left behind; return the stems removed.

    A lab whose owner process is alive holds an flock on its state file and is
    left alone, so this is safe to call while another test session runs a lab.
    """
    STATE_DIR.mkdir(mode=0o755, exist_ok=True)
    with open(STATE_DIR / "cleanup.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two sessions cleaning the same leftovers race otherwise
        return _cleanup_stale_locked(prefix)


def _cleanup_stale_locked(prefix: str) -> list[str]:
    pattern = _stem_pattern(prefix)
    namespaces: dict[str, list[str]] = {}
    links: dict[str, list[str]] = {}
    users: dict[str, list[str]] = {}
    for ns in _list_namespaces():
        if m := pattern.match(ns):
            namespaces.setdefault(m["suffix"], []).append(ns)
    for link in _list_links():
        if m := pattern.match(link):
            links.setdefault(m["suffix"], []).append(link)
    for entry in pwd.getpwall():
        if m := pattern.match(entry.pw_name):
            users.setdefault(m["suffix"], []).append(entry.pw_name)
    state_files: dict[str, Path] = {}
    if STATE_DIR.is_dir():
        for path in STATE_DIR.glob(f"{prefix}*.json"):
            suffix = path.stem[len(prefix) :]
            if re.fullmatch(rf"[0-9a-f]{{{_SUFFIX_LEN}}}", suffix):
                state_files[suffix] = path

    removed = []
    errors = []
    for suffix in sorted(set(namespaces) | set(links) | set(users) | set(state_files)):
        state = state_files.get(suffix)
        if state is not None and _lock_is_held(state):
            continue
        workdir = None
        if state is not None:
            with contextlib.suppress(OSError, ValueError):  # unreadable state: nothing to add
                workdir = json.loads(state.read_text()).get("root")
        steps: list[tuple[Callable[[str], None], str]] = [
            *((_delete_namespace, ns) for ns in namespaces.get(suffix, [])),
            *((_delete_user, user) for user in users.get(suffix, [])),
            *((_delete_link, link) for link in links.get(suffix, [])),
        ]
        for delete, name in steps:
            try:
                delete(name)
            except (LabError, OSError, subprocess.SubprocessError) as exc:
                errors.append(str(exc))
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        if state is not None:
            state.unlink(missing_ok=True)
        removed.append(prefix + suffix)
    if errors:
        raise LabError("cleanup_stale left things behind: " + "; ".join(errors))
    return removed


def _check_hide_libs(
    hide_libs: Mapping[str, Sequence[str | os.PathLike[str]]], n_hosts: int
) -> dict[str, tuple[str, ...]]:
    names = {f"h{i}" for i in range(1, n_hosts + 1)}
    unknown = sorted(set(hide_libs) - names)
    if unknown:
        raise ValueError(f"hide_libs names unknown hosts {unknown} (have h1..h{n_hosts})")
    checked: dict[str, tuple[str, ...]] = {}
    for host, libs in hide_libs.items():
        paths = tuple(os.fspath(lib) for lib in libs)
        for path in paths:
            if not os.path.isabs(path) or not os.path.exists(path):
                raise ValueError(f"hide_libs[{host!r}]: {path} is not an existing absolute path")
        if paths and shutil.which("unshare") is None:
            raise LabError("hide_libs needs `unshare` (util-linux)")
        checked[host] = paths
    return checked


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        return json.dumps(os.fspath(value))  # JSON string escapes are valid TOML basic strings
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r} as a TOML value")


# --------------------------------------------------------------------------- the lab


class Lab:
    """A bridge, ``n_hosts`` namespaces with sshd and users; ``close()`` removes all of it.

    The constructor builds everything (and tears down what it made if a step
    fails); use it as a context manager or call ``close()``.
    """

    def __init__(
        self,
        n_hosts: int = 2,
        prefix: str | None = None,
        workdir: Path | None = None,
        *,
        sshd_start_timeout: float = 10.0,
        hide_libs: Mapping[str, Sequence[str | os.PathLike[str]]] | None = None,
    ) -> None:
        """``hide_libs`` maps a host name ("h2") to library files that host must lack: its sshd, and so every
        session on it, runs in its own mount namespace where each of those files is an empty file (dlopen
        fails with "file too short"), e.g. ``{"h2": ["/usr/lib/x86_64-linux-gnu/libgomp.so.1"]}``."""
        prefix = DEFAULT_PREFIX if prefix is None else prefix
        if not re.fullmatch(rf"[a-z][a-z0-9]{{0,{_MAX_PREFIX - 1}}}", prefix):
            raise ValueError(f"prefix must be 1-{_MAX_PREFIX} lowercase letters/digits, got {prefix!r}")
        if not 1 <= n_hosts <= _MAX_HOSTS:
            raise ValueError(f"n_hosts must be 1..{_MAX_HOSTS}, got {n_hosts}")
        self._hide_libs = _check_hide_libs(hide_libs or {}, n_hosts)
        self.prefix = prefix
        self.suffix = secrets.token_hex(_SUFFIX_LEN // 2)
        self.stem = prefix + self.suffix
        self.bridge = f"{self.stem}br"
        self.subnet: ipaddress.IPv4Network | None = None
        self.gateway = ""
        self._sshd_start_timeout = sshd_start_timeout
        self._states: list[_HostState] = []
        self._extra_users: list[str] = []
        self._hosts: dict[str, LabHost] = {}
        self._bridge_created = False
        self._closed = False
        self._lock_fd: int | None = None
        self._logs: list[IO[bytes]] = []
        self._state_file = STATE_DIR / f"{self.stem}.json"
        self.root = Path(tempfile.mkdtemp(prefix=f"{self.stem}-", dir=workdir))
        self.client_key = self.root / "client_ed25519"
        self.known_hosts = self.root / "known_hosts"
        try:
            self._claim_state()
            self._build(n_hosts)
        except BaseException:
            with contextlib.suppress(LabError):  # the build error is the one to report
                self.close()
            raise

    # ----------------------------------------------------------------- building

    def _claim_state(self) -> None:
        STATE_DIR.mkdir(mode=0o755, exist_ok=True)
        fd = os.open(self._state_file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until close(): marks this lab as alive
        os.write(fd, json.dumps({"pid": os.getpid(), "root": str(self.root)}).encode())
        self._lock_fd = fd

    def _build(self, n_hosts: int) -> None:
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)  # sshd refuses to start without it
        _run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                f"{self.stem}-client",
                "-f",
                self.client_key,
            ]
        )
        client_public = self.client_key.with_name(self.client_key.name + ".pub").read_text().strip()
        subnet = self._create_bridge()
        for i in range(1, n_hosts + 1):
            state = _HostState(
                index=i,
                name=f"h{i}",
                namespace=f"{self.stem}h{i}",
                user=f"{self.stem}h{i}",
                address=str(subnet[10 + i]),
                veth_root=f"{self.stem}v{i}",
                directory=self.root / f"h{i}",
                sshd_config=self.root / f"h{i}" / "sshd_config",
                sshd_log=self.root / f"h{i}" / "sshd.log",
                hidden_libs=self._hide_libs.get(f"h{i}", ()),
            )
            self._states.append(state)
            state.directory.mkdir(mode=0o700)
            self._create_namespace(state, subnet.prefixlen)
            self._create_user(state, client_public)
            self._write_sshd_config(state)
        self.known_hosts.write_text("".join(f"{s.address} {s.host_public_key}\n" for s in self._states))
        for state in self._states:
            self._spawn_sshd(state)
        for state in self._states:
            self._await_sshd(state)

    def _create_bridge(self) -> ipaddress.IPv4Network:
        # Serialise the choice of subnet with other labs on this machine.
        with open(STATE_DIR / "subnets.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            free = _free_subnets(_assigned_ipv4())
            if not free:
                raise LabError(
                    f"all {len(SUBNETS)} lab subnets (/26 blocks of the RFC 5737 ranges) are in use "
                    f"by other labs or leftovers (cleanup_stale({self.prefix!r}) removes killed runs')"
                )
            subnet = self.subnet = free[0]
            self.gateway = str(subnet[1])
            _run(
                [
                    "ip",
                    "link",
                    "add",
                    "name",
                    self.bridge,
                    "type",
                    "bridge",
                    "stp_state",
                    "0",
                    "forward_delay",
                    "0",
                ]
            )
            self._bridge_created = True
            _run(["ip", "addr", "add", f"{self.gateway}/{subnet.prefixlen}", "dev", self.bridge])
            _run(["ip", "link", "set", "dev", self.bridge, "up"])
        return subnet

    def _create_namespace(self, state: _HostState, prefixlen: int) -> None:
        ns = state.namespace
        inner = f"{self.stem}p{state.index}"
        _run(["ip", "netns", "add", ns])
        state.namespace_created = True
        _run(["ip", "link", "add", state.veth_root, "type", "veth", "peer", "name", inner, "netns", ns])
        _run(["ip", "-n", ns, "link", "set", "dev", inner, "name", "eth0"])
        _run(["ip", "-n", ns, "addr", "add", f"{state.address}/{prefixlen}", "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "dev", "lo", "up"])
        _run(["ip", "-n", ns, "link", "set", "dev", "eth0", "up"])
        _run(["ip", "link", "set", "dev", state.veth_root, "master", self.bridge, "up"])

    def _create_user(self, state: _HostState, client_public: str) -> None:
        home = Path("/home") / state.user
        _run(
            [
                "useradd",
                "-m",
                "-U",
                "-d",
                home,
                "-s",
                "/bin/bash",
                "-c",
                f"meshtui lab {state.name}",
                state.user,
            ]
        )
        state.user_created = True
        state.home = home
        # useradd leaves the password "!" (locked). With UsePAM no, sshd refuses a
        # locked account even for public-key logins; "*" means "no password" instead.
        _run(["usermod", "-p", "*", state.user])
        entry = pwd.getpwnam(state.user)
        ssh_dir = home / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        keys = ssh_dir / "authorized_keys"
        keys.write_text(client_public + "\n")
        keys.chmod(0o600)
        for path in (ssh_dir, keys):
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _write_sshd_config(self, state: _HostState) -> None:
        key = state.directory / "ssh_host_ed25519_key"
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{self.stem}-{state.name}", "-f", key])
        key.chmod(0o600)  # sshd ignores host keys that group or others can read
        state.host_public_key = " ".join(key.with_name(key.name + ".pub").read_text().split()[:2])
        state.sshd_config.write_text(
            "\n".join(
                [
                    f"ListenAddress {state.address}:{SSH_PORT}",
                    f"HostKey {key}",
                    f"PidFile {state.directory / 'sshd.pid'}",
                    "UsePAM no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "AuthorizedKeysFile .ssh/authorized_keys",
                    "StrictModes yes",
                    "PermitRootLogin no",
                    f"AllowUsers {state.user}",
                    "AllowTcpForwarding local",
                    "AllowAgentForwarding no",
                    "X11Forwarding no",
                    "PermitTunnel no",
                    "UseDNS no",
                    "PrintMotd no",
                    "MaxStartups 64",
                    "MaxSessions 64",
                    "Subsystem sftp internal-sftp",
                    "",
                ]
            )
        )

    def _spawn_sshd(self, state: _HostState) -> None:
        log = open(state.sshd_log, "ab")  # noqa: SIM115 - kept open for sshd's lifetime
        self._logs.append(log)
        sshd = [str(SSHD), "-D", "-e", "-f", str(state.sshd_config)]
        if state.hidden_libs:
            sshd = self._hiding_libs(state, sshd)
        # `ip netns exec` (and unshare, and sh's exec) exec in place, so the Popen pid is sshd's own pid.
        state.sshd = subprocess.Popen(
            ["ip", "netns", "exec", state.namespace, *sshd],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @staticmethod
    def _hiding_libs(state: _HostState, sshd: list[str]) -> list[str]:
        """Wrap sshd's command: a private mount namespace where each hidden library is an empty file."""
        empty = state.directory / "hidden-library"
        empty.write_bytes(b"")
        empty.chmod(0o644)
        mounts = " && ".join(f"mount --bind {shlex.quote(str(empty))} {shlex.quote(lib)}"
                             for lib in state.hidden_libs)
        script = f"{mounts} && exec {' '.join(shlex.quote(a) for a in sshd)}"
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]

    def _await_sshd(self, state: _HostState) -> None:
        assert state.sshd is not None
        deadline = time.monotonic() + self._sshd_start_timeout
        while not _tcp_open(state.address, SSH_PORT, timeout=0.5):
            if state.sshd.poll() is not None:
                raise LabError(
                    f"sshd for {state.name} exited with {state.sshd.returncode}: {self._log_tail(state)}"
                )
            if time.monotonic() > deadline:
                raise LabError(
                    f"sshd for {state.name} did not listen on {state.address}:{SSH_PORT} "
                    f"within {self._sshd_start_timeout}s: {self._log_tail(state)}"
                )
            time.sleep(0.05)
        assert state.home is not None
        self._hosts[state.name] = LabHost(
            name=state.name,
            namespace=state.namespace,
            address=state.address,
            port=SSH_PORT,
            user=state.user,
            home=state.home,
            identity_file=self.client_key,
            sshd_pid=state.sshd.pid,
        )

    @staticmethod
    def _log_tail(state: _HostState) -> str:
        try:
            return " | ".join(state.sshd_log.read_text(errors="replace").strip().splitlines()[-5:])
        except OSError as exc:  # the log is only a diagnostic
            return f"(no log: {exc})"

    # ----------------------------------------------------------------- looking up

    @property
    def hosts(self) -> tuple[LabHost, ...]:
        return tuple(self._hosts[s.name] for s in self._states if s.name in self._hosts)

    def host(self, name: str) -> LabHost:
        return self._hosts[name]

    def _state(self, host: LabHost | str) -> _HostState:
        name = host if isinstance(host, str) else host.name
        for state in self._states:
            if state.name == name:
                return state
        raise KeyError(f"no lab host {name!r} (have {[s.name for s in self._states]})")

    # ----------------------------------------------------------------- driving

    def exec_in(
        self, host: LabHost | str, argv: Sequence[str | os.PathLike[str]], **kw: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` as root inside the host's namespace (text, captured, no check by default)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", _CMD_TIMEOUT)
        kw.setdefault("check", False)
        full = ["ip", "netns", "exec", self._state(host).namespace, *[os.fspath(a) for a in argv]]
        return subprocess.run(full, **kw)

    def popen_in(
        self, host: LabHost | str, argv: Sequence[str | os.PathLike[str]], **kw: Any
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` as root inside the host's namespace in the background; close() kills it."""
        full = ["ip", "netns", "exec", self._state(host).namespace, *[os.fspath(a) for a in argv]]
        return subprocess.Popen(full, **kw)

    def add_user(self) -> str:
        """A new unprivileged user `<stem>u<n>` with a home and no login: someone else on the hosts and the head.

        Users are not per namespace: run its commands with ``runuser -u NAME --`` through ``exec_in`` to act
        on a host, or directly to act on the head. ``remove_user`` or ``close()`` deletes it.
        """
        name = f"{self.stem}u{len(self._extra_users) + 1}"
        _run(["useradd", "-m", "-U", "-s", "/usr/sbin/nologin", "-c", f"meshtui lab other user {name}", name])
        self._extra_users.append(name)
        return name

    def remove_user(self, name: str) -> None:
        """Delete a user made by ``add_user`` (its processes and home too)."""
        if name not in self._extra_users:
            raise LabError(f"{name} is not a user this lab added (have {self._extra_users})")
        _delete_user(name)
        self._extra_users.remove(name)

    def processes_of(self, host: LabHost | str) -> list[tuple[int, str]]:
        """(pid, command line) of every process the host's user owns, on any namespace."""
        uid = pwd.getpwnam(self._state(host).user).pw_uid
        return [(pid, _cmdline(pid)) for pid in sorted(_uid_pids(uid))]

    def kill_sshd(self, host: LabHost | str, *, sessions: bool = False, timeout: float = 5.0) -> None:
        """Stop the host's listening sshd; with ``sessions`` also every open SSH session."""
        state = self._state(host)
        if state.sshd is not None and state.sshd.poll() is None:
            state.sshd.terminate()
            try:
                state.sshd.wait(timeout)
            except subprocess.TimeoutExpired:
                state.sshd.kill()
                state.sshd.wait(timeout)
        if sessions:
            for pid in _namespace_pids(state.namespace):
                if _cmdline(pid).startswith("sshd"):
                    with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                        os.kill(pid, signal.SIGKILL)
        if not self.wait_port_closed(state.name, timeout):
            raise LabError(f"{state.name}:{SSH_PORT} still accepts connections after killing sshd")

    def start_sshd(self, host: LabHost | str) -> LabHost:
        """(Re)start the host's sshd with its original config and key; return the updated host."""
        state = self._state(host)
        if state.sshd is not None and state.sshd.poll() is None:
            raise LabError(f"sshd for {state.name} is already running (pid {state.sshd.pid})")
        self._spawn_sshd(state)
        self._await_sshd(state)
        return self._hosts[state.name]

    def link_down(self, host: LabHost | str) -> None:
        """Take the host's cable out: its veth goes down, packets to and from it are lost."""
        _run(["ip", "link", "set", "dev", self._state(host).veth_root, "down"])

    def link_up(self, host: LabHost | str, *, wait: float = 5.0) -> None:
        """Plug the cable back in and wait (up to ``wait`` s, 0 for no wait) until sshd answers."""
        state = self._state(host)
        _run(["ip", "link", "set", "dev", state.veth_root, "up"])
        if wait and not self.wait_port_open(state.name, wait):
            raise LabError(f"{state.name}:{SSH_PORT} unreachable {wait}s after link_up")

    def cap_bandwidth(self, host: LabHost | str, rate: str) -> None:
        """Limit the host's cable to `rate` (tc's syntax, e.g. "100mbit") both ways with tbf (netem is absent)."""
        state = self._state(host)
        tbf = ["root", "tbf", "rate", rate, "burst", "64kb", "latency", "50ms"]
        _run(["tc", "qdisc", "replace", "dev", state.veth_root, *tbf])
        result = self.exec_in(host, ["tc", "qdisc", "replace", "dev", "eth0", *tbf])
        if result.returncode != 0:
            raise LabError(f"{state.name}: tc tbf on eth0 failed: {result.stderr.strip()}")

    def wait_port_open(self, host: LabHost | str, timeout: float = 5.0, port: int = SSH_PORT) -> bool:
        address = self._state(host).address
        deadline = time.monotonic() + timeout
        while not _tcp_open(address, port, timeout=0.3):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def wait_port_closed(self, host: LabHost | str, timeout: float = 5.0, port: int = SSH_PORT) -> bool:
        address = self._state(host).address
        deadline = time.monotonic() + timeout
        while _tcp_open(address, port, timeout=0.3):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    # ----------------------------------------------------------------- inventory

    def inventory_toml(
        self, model_line: str, extra_host_keys: Mapping[str, Mapping[str, object]] | None = None
    ) -> str:
        """A meshtui inventory for this lab; ``extra_host_keys`` adds keys per host name."""
        extra = dict(extra_host_keys or {})
        unknown = set(extra) - set(self._hosts)
        if unknown:
            raise KeyError(f"extra_host_keys names unknown hosts {sorted(unknown)}")
        lines = [
            "[model]",
            model_line,
            "context = 512",
            "",
            "[head]",
            "compute = true",
            "",
            "[ssh]",
            f"known_hosts = {_toml_value(self.known_hosts)}",
            "",
        ]
        for host in self.hosts:
            lines += [
                "[[hosts]]",
                f"name = {_toml_value(host.name)}",
                f"address = {_toml_value(host.address)}",
                f"user = {_toml_value(host.user)}",
                f"port = {host.port}",
                f"identity_file = {_toml_value(host.identity_file)}",
                f"python = {_toml_value(SYSTEM_PYTHON)}",
            ]
            lines += [f"{key} = {_toml_value(value)}" for key, value in extra.get(host.name, {}).items()]
            lines.append("")
        return "\n".join(lines)

    # ----------------------------------------------------------------- teardown

    def close(self) -> None:
        """Remove everything this lab made; tries every step, then reports what failed."""
        if self._closed:
            return
        errors: list[str] = []

        def attempt(what: str, fn: Callable[..., object], *args: Any) -> None:
            try:
                fn(*args)
            except (LabError, OSError, subprocess.SubprocessError) as exc:
                errors.append(f"{what}: {exc}")

        for state in self._states:
            if state.sshd is not None and state.sshd.poll() is None:
                attempt(f"stop sshd {state.name}", self._stop_popen, state.sshd)
        for user in list(self._extra_users):
            attempt(f"delete user {user}", self.remove_user, user)
        for state in self._states:
            if state.user_created:
                attempt(f"delete user {state.user}", _delete_user, state.user)
            if state.namespace_created:
                attempt(f"delete namespace {state.namespace}", _delete_namespace, state.namespace)
            attempt(f"delete veth {state.veth_root}", _delete_link, state.veth_root)
        if self._bridge_created:
            attempt(f"delete bridge {self.bridge}", _delete_link, self.bridge)
        for log in self._logs:
            log.close()
        shutil.rmtree(self.root, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):  # already removed by cleanup_stale
            self._state_file.unlink()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._closed = True
        if errors:
            raise LabError(f"lab {self.stem} teardown incomplete: " + "; ".join(errors))

    @staticmethod
    def _stop_popen(proc: subprocess.Popen[Any]) -> None:
        proc.terminate()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(3)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        hosts = ", ".join(f"{h.name}={h.user}@{h.address}" for h in self.hosts)
        return f"<Lab {self.stem} {hosts}>"


def iter_lab_resources(stem: str) -> Iterator[str]:
    """Every namespace, link, user and process that still carries ``stem`` (for leak checks)."""
    for ns in _list_namespaces():
        if ns.startswith(stem):
            yield f"namespace {ns}"
    for link in _list_links():
        if link.startswith(stem):
            yield f"link {link}"
    for entry in pwd.getpwall():
        if entry.pw_name.startswith(stem):
            yield f"user {entry.pw_name}"
    for home in Path("/home").glob(f"{stem}*"):
        yield f"home {home}"
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and stem in _cmdline(int(proc.name)):
            yield f"process {proc.name}: {_cmdline(int(proc.name))}"
