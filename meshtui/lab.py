"""The embedded lab: in-process asyncssh servers on 127.0.0.1 acting as hosts, for `meshtui up` with no inventory.

Each host has its own host key (verified like any other, through a known_hosts file the lab writes), its
own home directory (SFTP is chrooted there, commands run there with HOME set), and allows TCP forwards only
to its own loopback and Unix-socket forwards (direct-streamlocal: how the head reaches a stage), as OpenSSH's
sshd does by default. Agents run as ordinary child processes of this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from meshtui.inventory import HeadSpec, HostSpec, Inventory, ModelSpec, SSHSpec


class _LabServer(asyncssh.SSHServer):
    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
        # Like `PermitOpen localhost:*`: forwards reach only this host's loopback.
        return dest_host in ("127.0.0.1", "localhost")

    def unix_connection_requested(self, dest_path: str) -> bool:
        # Like OpenSSH's default `AllowStreamLocalForwarding yes`: the stages' Unix sockets, as this user.
        return dest_path.startswith("/")

    def begin_auth(self, username: str) -> bool:
        return True  # always require a key


async def _run_command(process: asyncssh.SSHServerProcess[bytes], home: Path) -> None:
    env = {
        "HOME": str(home),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "USER": home.name,
    }
    if os.environ.get("LD_LIBRARY_PATH"):  # the lab's hosts are this machine: its GPU driver's libraries too
        env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    command = process.command or "exec /bin/sh -i"
    child = await asyncio.create_subprocess_shell(
        command, cwd=str(home), env=env, start_new_session=True,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async def ssh_to_child() -> None:
        assert child.stdin is not None
        with contextlib.suppress(OSError, asyncssh.Error):
            while data := await process.stdin.read(65536):
                child.stdin.write(data)
                await child.stdin.drain()
        with contextlib.suppress(OSError):
            child.stdin.close()

    async def child_to_ssh(reader: asyncio.StreamReader | None, writer: asyncssh.SSHWriter[bytes]) -> None:
        assert reader is not None
        with contextlib.suppress(OSError, asyncssh.Error):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

    feeder = asyncio.create_task(ssh_to_child())
    try:
        await asyncio.gather(child_to_ssh(child.stdout, process.stdout), child_to_ssh(child.stderr, process.stderr))
        status = await child.wait()
        if status < 0:  # as sshd reports a command killed by a signal: by the signal's name
            process.exit_with_signal(signal.Signals(-status).name.removeprefix("SIG"))
        else:
            process.exit(status)
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        raise
    finally:
        feeder.cancel()


@dataclass
class LabHost:
    name: str
    home: Path
    port: int
    server: asyncssh.SSHAcceptor


class EmbeddedLab:
    def __init__(self, n_hosts: int = 2, root: Path | None = None) -> None:
        if n_hosts < 1:
            raise ValueError("the lab needs at least one host")
        self.n_hosts = n_hosts
        self._own_root = root is None
        self.root = root or Path(tempfile.mkdtemp(prefix="meshtui-lab-"))
        self.hosts: list[LabHost] = []
        self.known_hosts = self.root / "known_hosts"
        self.client_key = self.root / "client_key"

    async def start(self) -> None:
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key.write_private_key(str(self.client_key))
        os.chmod(self.client_key, 0o600)
        authorized = asyncssh.import_authorized_keys(client_key.export_public_key().decode())
        known_lines = []
        for i in range(1, self.n_hosts + 1):
            name = f"lab{i}"
            home = self.root / name
            home.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(home, 0o700)  # whatever the umask
            host_key = asyncssh.generate_private_key("ssh-ed25519")

            def process_factory(process: asyncssh.SSHServerProcess[bytes], home: Path = home) -> object:
                return _run_command(process, home)

            def sftp_factory(chan: asyncssh.SSHServerChannel[bytes], home: Path = home) -> asyncssh.SFTPServer:
                return asyncssh.SFTPServer(chan, chroot=str(home).encode())

            server = await asyncssh.listen(
                "127.0.0.1", 0, server_factory=_LabServer, server_host_keys=[host_key],
                authorized_client_keys=authorized, process_factory=process_factory,
                sftp_factory=sftp_factory, encoding=None, allow_scp=False,
            )
            port = server.sockets[0].getsockname()[1]
            self.hosts.append(LabHost(name, home, port, server))
            known_lines.append(f"[127.0.0.1]:{port} {host_key.export_public_key().decode().strip()}")
        self.known_hosts.write_text("\n".join(known_lines) + "\n")

    def inventory(self, model: ModelSpec, head: HeadSpec | None = None) -> Inventory:
        hosts = tuple(
            HostSpec(name=h.name, address="127.0.0.1", port=h.port, user=os.environ.get("USER") or "meshtui",
                     identity_file=self.client_key, python=_agent_python(), threads=1)
            for h in self.hosts
        )
        return Inventory(
            source="<embedded lab>",
            model=model,
            head=head or HeadSpec(compute=True, threads=1),
            ssh=SSHSpec(known_hosts=self.known_hosts),
            hosts=hosts,
        )

    async def close(self) -> None:
        for host in self.hosts:
            host.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(host.server.wait_closed(), 5)
        self.hosts = []
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)


def _agent_python() -> str:
    """The lab's hosts are this machine: any Python 3.8+ runs the agent; prefer the system one."""
    for candidate in ("/usr/bin/python3", shutil.which("python3") or ""):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return "python3"
