"""Host keys decided the way OpenSSH decides them, as pure functions over known_hosts entries.

asyncssh's own known_hosts matching differs from OpenSSH's where it matters: it trusts an entry for the peer's
IP address as much as one for the host name, and for a port other than 22 it falls back to the entries without
a port even when they hold another key. meshtui hands asyncssh the result of the functions below instead, so
the accept/refuse decision and the line recorded by `--accept-new` are those of OpenSSH's `check_host_key`
(sshconnect.c, OpenSSH 9.2) with `StrictHostKeyChecking=accept-new` (or `yes` without `--accept-new`).

One deliberate difference: a key marked `@revoked` for the host name without the port is refused too (OpenSSH
only looks at `[host]:port` for a non-22 port, so it would accept and record such a key).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import asyncssh

from meshtui.errors import HostError

DEFAULT_SSH_PORT = 22
# Characters OpenSSH never writes into a known_hosts name (check_host_key makes the lookup read-only).
_UNRECORDABLE = set("@?*#[]|'\"\\")

HostKeyStatus = Literal["known", "new", "changed", "revoked"]


@dataclass(frozen=True)
class KnownHostsEntry:
    """One usable line of a known_hosts file."""

    path: Path
    line_number: int
    marker: str | None  # None, "revoked" or "cert-authority"
    key: asyncssh.SSHKey
    _matcher: asyncssh.SSHKnownHosts  # this line alone: asyncssh's own pattern and |1|hash matching

    def matches(self, name: str) -> bool:
        # No address and no port: `name` is matched exactly as OpenSSH spells it ("host" or "[host]:port").
        return any(self._matcher.match(name, "", None)[:3])

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line_number}"


@dataclass(frozen=True)
class KnownHosts:
    """Every usable entry of the user's and the global known_hosts files, in OpenSSH's reading order."""

    entries: tuple[KnownHostsEntry, ...] = ()

    def for_name(self, name: str | None) -> tuple[KnownHostsEntry, ...]:
        if name is None:
            return ()
        return tuple(e for e in self.entries if e.matches(name))


def parse_known_hosts(text: str, path: Path) -> tuple[KnownHostsEntry, ...]:
    """The entries of one file; lines OpenSSH would skip (malformed, unknown key types) are skipped."""
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        marker = fields[0][1:] if fields[0].startswith("@") else None
        key_fields = fields[2:] if marker is not None else fields[1:]
        if marker not in (None, "revoked", "cert-authority") or len(key_fields) < 2:
            continue
        try:
            key = asyncssh.import_public_key(" ".join(key_fields[:2]))
            matcher = asyncssh.import_known_hosts(line)
        except ValueError:  # malformed or an unknown key type (KeyImportError is one): OpenSSH skips it too
            continue
        entries.append(KnownHostsEntry(path, number, marker, key, matcher))
    return tuple(entries)


def read_known_hosts_files(paths: Iterable[Path]) -> KnownHosts:
    """A missing file holds no keys (as in OpenSSH); one that exists but cannot be read is an error."""
    entries: list[KnownHostsEntry] = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            continue
        except OSError as err:
            raise HostError(f"cannot read known_hosts file {path}: {err.strerror or err}") from err
        entries.extend(parse_known_hosts(text, path))
    return KnownHosts(tuple(entries))


def put_host_port(host: str, port: int) -> str:
    """How OpenSSH names a host in known_hosts: `host`, or `[host]:port` for a port other than 22."""
    return host if port == DEFAULT_SSH_PORT else f"[{host}]:{port}"


def normalize_hostname(host: str) -> str:
    """OpenSSH lowercases a host name and writes an address in its canonical numeric form."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower()


@dataclass(frozen=True)
class HostKeyTarget:
    """What was connected to, as OpenSSH's known_hosts lookup sees it (after ~/.ssh/config)."""

    hostname: str  # HostName after alias resolution, normalized
    port: int
    peer_address: str  # the numeric address the TCP connection reached ("" through a proxy)
    alias: str | None = None  # HostKeyAlias
    check_host_ip: bool = False  # OpenSSH's default since 8.5
    proxied: bool = False  # ProxyCommand or ProxyJump: no peer address of the host itself

    @property
    def name(self) -> str:
        return self.alias.lower() if self.alias else put_host_port(self.hostname, self.port)

    @property
    def name_without_port(self) -> str | None:
        """OpenSSH retries an unknown `[host]:port` as plain `host` (never with HostKeyAlias)."""
        return self.hostname if self.alias is None and self.port != DEFAULT_SSH_PORT else None

    @property
    def ip_name(self) -> str | None:
        """The address entry CheckHostIP reads and writes, when it applies to this connection."""
        if not self.check_host_ip or self.proxied or not self.peer_address:
            return None
        ip = put_host_port(self.peer_address, self.port)
        if _is_loopback(self.peer_address) or self.hostname == ip:
            return None
        return ip


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class HostKeyDecision:
    status: HostKeyStatus  # of the key for target.name (or the name without the port, when that knew it)
    accepted: bool
    record: tuple[str, ...] = ()  # names to append, one line each, in order ("host,ip" is one unhashed name)
    offending: KnownHostsEntry | None = None  # the entry that holds another key, or that revokes this one
    ip_differs: KnownHostsEntry | None = None  # CheckHostIP: the address's entry holds another key (a warning)


def _same(a: asyncssh.SSHKey, b: asyncssh.SSHKey) -> bool:
    return a.public_data == b.public_data


def key_status(
    key: asyncssh.SSHKey, entries: Sequence[KnownHostsEntry]
) -> tuple[HostKeyStatus, KnownHostsEntry | None]:
    """OpenSSH's check_hostkeys_by_key_or_type for a plain key: any other key for the name means CHANGED."""
    status: HostKeyStatus = "new"
    found = None
    for entry in entries:
        if entry.marker is not None:
            continue
        if _same(entry.key, key):
            status, found = "known", entry
            break
        status, found = "changed", entry
    for entry in entries:
        if entry.marker == "revoked" and _same(entry.key, key):
            return "revoked", entry
    return status, found


def decide_host_key(
    key: asyncssh.SSHKey,
    target: HostKeyTarget,
    known: KnownHosts,
    *,
    accept_new: bool,
    can_record: bool,
    hash_names: bool,
) -> HostKeyDecision:
    """OpenSSH's check_host_key, StrictHostKeyChecking=accept-new when `accept_new`, else yes.

    `can_record`: there is a user known_hosts file to write to. `hash_names`: HashKnownHosts.
    """
    name = target.name
    status, found = key_status(key, known.for_name(name))
    bare = target.name_without_port
    if status != "revoked" and bare is not None:
        revoked = key_status(key, [e for e in known.for_name(bare) if e.marker == "revoked"])
        if revoked[0] == "revoked":
            status, found = revoked
    check_ip = target.ip_name is not None
    ip_status, ip_found = key_status(key, known.for_name(target.ip_name)) if check_ip else (status, found)
    ip_differs = ip_found if check_ip and status != "changed" and ip_status == "changed" else None
    recordable = can_record and not (_UNRECORDABLE & set(target.hostname))
    if status in ("revoked", "changed"):
        return HostKeyDecision(status, False, offending=found)
    if status == "known":
        ip_name = target.ip_name
        add_ip = ip_name is not None and ip_status == "new" and recordable
        return HostKeyDecision("known", True, (ip_name,) if add_ip and ip_name else (), ip_differs=ip_differs)
    if bare is not None:
        # OpenSSH's retry without the port turns CheckHostIP off for the rest of the connection when the
        # host name is the address itself (sshconnect.c changes options.check_host_ip there).
        if target.hostname == target.peer_address:
            check_ip, ip_differs = False, None
        bare_status, _ = key_status(key, known.for_name(bare))
        if bare_status == "known":
            return HostKeyDecision("known", True, ip_differs=ip_differs)
    if not recordable or not accept_new:
        return HostKeyDecision("new", False)
    ip_name = target.ip_name
    record: tuple[str, ...]
    if check_ip and ip_name is not None and ip_status == "new":
        record = (name, ip_name) if hash_names else (f"{name},{ip_name}",)
    else:
        record = (name,)
    return HostKeyDecision("new", True, record, ip_differs=ip_differs)


def trusted_without_question(target: HostKeyTarget, known: KnownHosts) -> list[asyncssh.SSHKey]:
    """Keys `decide_host_key` accepts as known, before the server shows its key.

    asyncssh accepts these itself (and prefers their algorithms in the key exchange, as OpenSSH does); any
    other key reaches `decide_host_key`.
    """
    entries = [e for e in known.for_name(target.name) if e.marker is None]
    bare = target.name_without_port
    revoked = [e.key for e in known.for_name(target.name) + known.for_name(bare) if e.marker == "revoked"]
    if not entries and bare is not None:
        entries = [e for e in known.for_name(bare) if e.marker is None]
    return [e.key for e in entries if not any(_same(e.key, r) for r in revoked)]


def trusted_authorities(target: HostKeyTarget, known: KnownHosts) -> list[asyncssh.SSHKey]:
    return [e.key for e in known.for_name(target.name) if e.marker == "cert-authority"]


def hash_name(name: str, salt: bytes) -> str:
    """OpenSSH's HashKnownHosts form: |1|base64(salt)|base64(HMAC-SHA1(salt, name))."""
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


def known_hosts_line(name: str, key: asyncssh.SSHKey, *, hashed: bool, salt: bytes | None = None) -> str:
    """The line OpenSSH's write_host_entry writes: lowercased name (or its hash), key type, base64 key."""
    name = name.lower()
    if hashed:
        name = hash_name(name, salt if salt is not None else os.urandom(hashlib.sha1().digest_size))
    key_text = " ".join(key.export_public_key("openssh").decode().split()[:2])
    return f"{name} {key_text}\n"


def append_known_hosts(path: Path, lines: Sequence[str]) -> None:
    """Append like OpenSSH's add_host_to_hostfile; a file without its last newline gets one first."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        prefix = b""
        if size:
            f.seek(size - 1)
            prefix = b"" if f.read(1) == b"\n" else b"\n"
        f.write(prefix + "".join(lines).encode())
