"""SSH connections to hosts: asyncssh with host keys decided as OpenSSH decides them, ~/.ssh/config and
ssh-agent honoured, and no agent or X11 forwarding ever.

Every failure leaves this module as a `HostError` naming the host, in one line.
"""

from __future__ import annotations

import asyncio
import getpass
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import asyncssh
from asyncssh.config import SSHClientConfig, SSHConfig

from meshtui.errors import HostError
from meshtui.hostkeys import (
    HostKeyDecision,
    HostKeyTarget,
    KnownHosts,
    append_known_hosts,
    decide_host_key,
    known_hosts_line,
    normalize_hostname,
    read_known_hosts_files,
    trusted_authorities,
    trusted_without_question,
)
from meshtui.inventory import HostSpec, SSHSpec

USER_SSH_CONFIG = Path("~/.ssh/config")
SYSTEM_SSH_CONFIG = Path("/etc/ssh/ssh_config")
DEFAULT_USER_KNOWN_HOSTS = (Path("~/.ssh/known_hosts"), Path("~/.ssh/known_hosts2"))
DEFAULT_GLOBAL_KNOWN_HOSTS = (Path("/etc/ssh/ssh_known_hosts"), Path("/etc/ssh/ssh_known_hosts2"))

# AES-GCM first: one AEAD call per packet in `cryptography`, where asyncssh's chacha20-poly1305 needs four
# cipher contexts per packet. Activations cross the tunnel as many small packets, so this is latency.
PREFERRED_CIPHERS = (
    "aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
    "aes128-ctr", "aes256-ctr",
)


def ssh_config_files(ssh: SSHSpec) -> list[Path]:
    """What OpenSSH's client reads: ~/.ssh/config, then /etc/ssh/ssh_config (`ssh -F` when set in SSHSpec)."""
    if ssh.config_files is not None:
        return list(ssh.config_files)
    candidates = (USER_SSH_CONFIG.expanduser(), SYSTEM_SSH_CONFIG)
    return [path for path in candidates if os.access(path, os.R_OK)]


class _KnownHostsConfig(SSHClientConfig):
    """asyncssh's own ssh_config reader (same Host/Match/Include rules), taught the two options it skips that
    decide what known_hosts gets: HashKnownHosts and CheckHostIP."""

    _handlers = {
        **SSHClientConfig._handlers,
        "hashknownhosts": ("HashKnownHosts", SSHConfig._set_bool),
        "checkhostip": ("CheckHostIP", SSHConfig._set_bool),
    }


@dataclass(frozen=True)
class ResolvedHost:
    """A host as OpenSSH sees it after ~/.ssh/config: where it connects and which known_hosts it uses."""

    target: HostKeyTarget  # peer_address still empty: only the connection knows it
    hash_known_hosts: bool
    user_files: tuple[Path, ...]  # the first one is where accept-new records
    global_files: tuple[Path, ...]


def _paths(values: object) -> tuple[Path, ...]:
    return tuple(Path(str(v)).expanduser() for v in values) if isinstance(values, list) else ()


def resolve_host(host: HostSpec, ssh: SSHSpec, config_files: Sequence[Path]) -> ResolvedHost:
    """Read the ssh config for `host` like asyncssh's connect does, plus what OpenSSH reads and asyncssh skips."""
    user: object = host.user or ()
    port: object = host.port or ()
    try:
        options = asyncssh.SSHClientConnectionOptions(
            host=host.address, port=port, username=user, config=[str(p) for p in config_files],
            known_hosts=None, client_keys=None, agent_path=None,
        )
        extra = _KnownHostsConfig.load(None, [str(p) for p in config_files], False, False, False,
                                       getpass.getuser(), user, host.address, port)
    except (OSError, ValueError, KeyError) as err:  # ConfigParseError is a ValueError; KeyError: no local user
        raise HostError(f"cannot use the ssh config {', '.join(map(str, config_files))}: {err}",
                        host=host.name) from err
    config = options.config
    user_files: tuple[Path, ...]
    if ssh.known_hosts is not None:
        user_files = (ssh.known_hosts,)
    else:
        configured = config.get("UserKnownHostsFile")
        user_files = _paths(configured) if configured is not None else DEFAULT_USER_KNOWN_HOSTS
    if ssh.global_known_hosts is not None:
        global_files = ssh.global_known_hosts
    else:
        configured = config.get("GlobalKnownHostsFile")
        global_files = _paths(configured) if configured is not None else DEFAULT_GLOBAL_KNOWN_HOSTS
    target = HostKeyTarget(
        hostname=normalize_hostname(options.host),
        port=options.port,
        peer_address="",
        alias=options.host_key_alias,
        check_host_ip=bool(extra.get("CheckHostIP", False)),
        proxied=bool(options.proxy_command or options.tunnel),
    )
    return ResolvedHost(target, bool(extra.get("HashKnownHosts", False)),
                        tuple(p.expanduser() for p in user_files), tuple(p.expanduser() for p in global_files))


def _where(host: HostSpec, target: HostKeyTarget) -> str:
    where = f"{target.hostname}:{target.port}"
    if target.alias:
        where += f" (HostKeyAlias {target.alias})"
    return where if host.address in (target.hostname, target.alias) else f"{host.address} = {where}"


class _HostKeyCheck:
    """One connection's host-key decision, made inside asyncssh's own validation.

    asyncssh calls `lookup` before the key exchange (the keys it trusts outright, whose algorithms it then
    prefers), `validate` for any other key the server shows, then the client's `begin_auth` once the key is
    proven; `refusal` says why a key was refused.
    """

    def __init__(self, host: HostSpec, resolved: ResolvedHost, known: KnownHosts, *, accept_new: bool,
                 pinned_key: asyncssh.SSHKey | None, log: Callable[[str], None]) -> None:
        self.host = host
        self.resolved = resolved
        self.known = known
        self.accept_new = accept_new and pinned_key is None
        self.pinned_key = pinned_key
        self.log = log
        self.target = resolved.target
        self.decided = False
        self.refusal: str | None = None

    def lookup(self, host: str, addr: str, port: int | None) -> tuple[list[asyncssh.SSHKey], ...]:
        self.target = replace(self.resolved.target, peer_address=addr or "")
        trusted = trusted_without_question(self.target, self.known)
        if self.pinned_key is not None:
            trusted = [k for k in trusted if k.public_data == self.pinned_key.public_data]
        return trusted, trusted_authorities(self.target, self.known), []

    def validate(self, key: asyncssh.SSHKey) -> bool:
        self.decided = True
        resolved, where = self.resolved, _where(self.host, self.target)
        decision = decide_host_key(key, self.target, self.known, accept_new=self.accept_new,
                                   can_record=bool(resolved.user_files), hash_names=resolved.hash_known_hosts)
        if decision.ip_differs is not None:
            self.log(f"warning: the host key for {where} differs from the key for its address in "
                     f"{decision.ip_differs.where}")
        if self.pinned_key is not None and key.public_data != self.pinned_key.public_data:
            self.refusal = (f"host key for {where} is not the one it had when this mesh connected to it; "
                            "refusing to reconnect")
            return False
        if not decision.accepted:
            self.refusal = self._refusal(decision, where)
            return False
        if decision.record:
            self._record(key, decision, where)
        return True

    def _refusal(self, decision: HostKeyDecision, where: str) -> str:
        if decision.status == "revoked":
            assert decision.offending is not None
            return f"host key for {where} is marked @revoked in {decision.offending.where}; refusing to connect"
        if decision.status == "changed":
            assert decision.offending is not None
            return (f"host key for {where} does not match {decision.offending.where}: it CHANGED, refusing to "
                    "connect (remove the old entry only if you know why it changed)")
        files = self.resolved.user_files + self.resolved.global_files
        looked_in = " or ".join(str(p) for p in files) or "no known_hosts file"
        if self.pinned_key is not None:
            return f"unknown host key for {where} (not in {looked_in}); refusing to reconnect"
        if not self.resolved.user_files:
            return f"unknown host key for {where} (not in {looked_in}) and no user known_hosts file to record it"
        return (f"unknown host key for {where} (not in {looked_in}); verify it and add it, or run again with "
                "--accept-new")

    def _record(self, key: asyncssh.SSHKey, decision: HostKeyDecision, where: str) -> None:
        path = self.resolved.user_files[0]
        lines = [known_hosts_line(name, key, hashed=self.resolved.hash_known_hosts) for name in decision.record]
        try:
            append_known_hosts(path, lines)
        except OSError as err:  # OpenSSH connects anyway and says the key was not recorded
            self.log(f"could not record the host key for {where} in {path}: {err.strerror or err}")
            return
        what = "new host key" if decision.status == "new" else "host key for its address"
        self.log(f"recorded {what} for {where} in {path}")

    def client_factory(self) -> asyncssh.SSHClient:
        return _CheckingClient(self)


class _CheckingClient(asyncssh.SSHClient):
    def __init__(self, check: _HostKeyCheck) -> None:
        self.check = check
        self.conn: asyncssh.SSHClientConnection | None = None

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self.conn = conn

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        return self.check.validate(key)

    def begin_auth(self, username: str) -> None:
        # A key asyncssh trusted outright never reached validate(): decide on it now, before authenticating, so
        # CheckHostIP's address line is written when OpenSSH would write it.
        key = self.conn.get_server_host_key() if self.conn is not None else None
        if not self.check.decided and key is not None and not self.check.validate(key) and self.conn is not None:
            self.conn.abort()  # unreachable: lookup() only trusts keys decide_host_key accepts


def _options(host: HostSpec, ssh: SSHSpec, config_files: Sequence[Path]) -> dict[str, object]:
    options: dict[str, object] = {
        "config": [str(p) for p in config_files],
        "encryption_algs": list(PREFERRED_CIPHERS),
        "compression_algs": None,
        "connect_timeout": ssh.connect_timeout,
        "keepalive_interval": ssh.keepalive_interval,
        "keepalive_count_max": 3,
        # Never, whatever ~/.ssh/config says: a host must not reach the head's ssh-agent or X display.
        "agent_forwarding": False,
        "x11_forwarding": False,
    }
    if host.user:
        options["username"] = host.user
    if host.port:
        options["port"] = host.port
    if host.identity_file:
        options["client_keys"] = [str(host.identity_file)]
    return options


async def connect_host(
    host: HostSpec,
    ssh: SSHSpec,
    *,
    accept_new: bool = False,
    pinned_key: asyncssh.SSHKey | None = None,
    log: Callable[[str], None] | None = None,
) -> asyncssh.SSHClientConnection:
    """Connect once, with the host key decided as OpenSSH decides it; never accept a changed or revoked key.

    `accept_new` records a first-seen key like StrictHostKeyChecking=accept-new. `pinned_key` (a reconnect)
    requires exactly that key and never records one.
    """
    if host.identity_file and not host.identity_file.exists():
        raise HostError(f"identity_file {host.identity_file} does not exist", host=host.name)
    config_files = ssh_config_files(ssh)
    resolved = resolve_host(host, ssh, config_files)
    try:
        known = read_known_hosts_files(resolved.user_files + resolved.global_files)
    except HostError as err:
        raise HostError(str(err), host=host.name) from err
    check = _HostKeyCheck(host, resolved, known, accept_new=accept_new, pinned_key=pinned_key,
                          log=log or (lambda message: None))
    try:
        return await asyncssh.connect(host.address, known_hosts=check.lookup, client_factory=check.client_factory,
                                      **_options(host, ssh, config_files))
    except asyncssh.HostKeyNotVerifiable as err:
        raise HostError(check.refusal or f"host key for {_where(host, check.target)} not verified: {err.reason}",
                        host=host.name) from err
    except (OSError, asyncssh.Error, asyncio.TimeoutError) as err:
        raise HostError(describe_ssh_error(err, host), host=host.name) from err
    except ValueError as err:  # an identity file asyncssh cannot load, a bad option value
        raise HostError(f"cannot connect to {host.address}: {err}", host=host.name) from err


def describe_ssh_error(err: BaseException, host: HostSpec) -> str:
    target = f"{host.address}:{host.port or 22}"
    if isinstance(err, asyncssh.PermissionDenied):
        who = host.user or "the default user"
        return f"authentication refused at {target} for {who}"
    if isinstance(err, asyncio.TimeoutError | TimeoutError):
        return f"timed out connecting to {target}"
    if isinstance(err, ConnectionRefusedError):
        return f"connection refused at {target} (is sshd running?)"
    if isinstance(err, asyncssh.Error):
        return f"SSH error at {target}: {err.reason}"
    if isinstance(err, OSError):
        return f"cannot connect to {target}: {err.strerror or err}"
    return f"cannot connect to {target}: {err}"
