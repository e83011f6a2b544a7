"""SSH connections to hosts: asyncssh with host keys verified, ~/.ssh/config and ssh-agent honoured.

Every failure leaves this module as a `HostError` naming the host, in one line.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import asyncssh

from meshtui.errors import HostError
from meshtui.inventory import HostSpec, SSHSpec

DEFAULT_KNOWN_HOSTS = Path("~/.ssh/known_hosts")


def known_hosts_path(ssh: SSHSpec) -> Path:
    return (ssh.known_hosts or DEFAULT_KNOWN_HOSTS).expanduser()


def _known_hosts_pattern(address: str, port: int) -> str:
    return address if port == 22 else f"[{address}]:{port}"


def host_is_known(path: Path, address: str, port: int) -> bool:
    """Whether known_hosts has any key for this host (so a verification failure means the key changed)."""
    if not path.exists():
        return False
    try:
        known = asyncssh.read_known_hosts(str(path))
    except (OSError, ValueError, asyncssh.Error):
        return False
    trusted, trusted_ca, revoked, *_ = known.match(address, address, port)
    return bool(trusted or trusted_ca or revoked)


def record_host_key(path: Path, address: str, port: int, key: asyncssh.SSHKey) -> None:
    """Append a key the way OpenSSH's StrictHostKeyChecking=accept-new does."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    line = f"{_known_hosts_pattern(address, port)} {key.export_public_key('openssh').decode().strip()}\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(line)


# AES-GCM first: one AEAD call per packet in `cryptography`, where asyncssh's chacha20-poly1305 needs four
# cipher contexts per packet. Activations cross the tunnel as many small packets, so this is latency.
PREFERRED_CIPHERS = (
    "aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
    "aes128-ctr", "aes256-ctr",
)


def _options(host: HostSpec, ssh: SSHSpec, known_hosts: str | None) -> dict[str, object]:
    options: dict[str, object] = {
        "known_hosts": known_hosts,
        "encryption_algs": list(PREFERRED_CIPHERS),
        "compression_algs": None,
        "connect_timeout": ssh.connect_timeout,
        "keepalive_interval": ssh.keepalive_interval,
        "keepalive_count_max": 3,
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
    on_key_recorded: Callable[[str], None] | None = None,
) -> asyncssh.SSHClientConnection:
    """Connect with the host key verified against known_hosts; never accept a changed key."""
    kh_path = known_hosts_path(ssh)
    port = host.port or 22
    if host.identity_file and not host.identity_file.exists():
        raise HostError(f"identity_file {host.identity_file} does not exist", host=host.name)
    known_hosts: str | None = str(kh_path) if kh_path.exists() else None
    try:
        if known_hosts is None:
            # asyncssh reads ~/.ssh/known_hosts itself when given (); a missing file means "all unknown".
            raise asyncssh.HostKeyNotVerifiable("no known_hosts file")
        return await asyncssh.connect(host.address, **_options(host, ssh, known_hosts))
    except asyncssh.HostKeyNotVerifiable as err:
        if host_is_known(kh_path, host.address, port):
            raise HostError(
                f"host key for {host.address}:{port} does not match {kh_path}: it CHANGED, refusing to connect "
                "(remove the old entry only if you know why it changed)",
                host=host.name,
            ) from err
        if not accept_new:
            raise HostError(
                f"unknown host key for {host.address}:{port} (not in {kh_path}); "
                "verify it and add it, or run again with --accept-new",
                host=host.name,
            ) from err
    except (OSError, asyncssh.Error, asyncio.TimeoutError) as err:
        raise HostError(describe_ssh_error(err, host), host=host.name) from err
    # accept-new: the host is not in known_hosts at all; trust this first key and record it.
    try:
        conn = await asyncssh.connect(host.address, **_options(host, ssh, None))
    except (OSError, asyncssh.Error, asyncio.TimeoutError) as err:
        raise HostError(describe_ssh_error(err, host), host=host.name) from err
    key = conn.get_server_host_key()
    if key is not None:
        record_host_key(kh_path, host.address, port, key)
        if on_key_recorded:
            on_key_recorded(f"recorded new host key for {host.address}:{port} in {kh_path}")
    return conn


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
