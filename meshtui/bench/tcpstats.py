"""Plain TCP stage servers for the bench's `tcp` mode: naming them, reaching them, and the kernel's byte counts.

Nothing sits between the engine and a plain TCP stage, so its bytes come from the kernel's own TCP counters
(`ss -ti`) for the engine's sockets.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket

from meshtui.errors import InventoryError, MeshError

_SS_BYTES = re.compile(r"\b(bytes_acked|bytes_received):(\d+)")


def parse_tcp_stages(text: str) -> dict[str, str]:
    """`h1=10.0.0.2:50052,h2=10.0.0.3:50052` -> {"h1": "10.0.0.2:50052", ...}."""
    stages: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, endpoint = item.partition("=")
        host, colon, port = endpoint.rpartition(":")
        if not sep or not name or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InventoryError(f"--tcp-stages: expected NAME=HOST:PORT, got {item!r}")
        if name in stages:
            raise InventoryError(f"--tcp-stages: {name} given twice")
        stages[name] = f"{host}:{int(port)}"
    if not stages:
        raise InventoryError("--tcp-stages: expected NAME=HOST:PORT[,NAME=HOST:PORT...]")
    return stages


def parse_ss(text: str, pid: int) -> dict[str, tuple[int, int]]:
    """Peer "addr:port" -> (bytes sent and acked, bytes received), summed over `pid`'s sockets.

    `text` is the output of `ss -tinpH state established`: a socket line (Recv-Q, Send-Q, local, peer,
    users:(...)) followed by an indented line of TCP info.
    """
    counters: dict[str, tuple[int, int]] = {}
    peer: str | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            fields = line.split()
            peer = fields[3] if len(fields) > 4 and f"pid={pid}," in line else None
            continue
        if peer is None:
            continue
        found = dict(_SS_BYTES.findall(line))
        up, down = counters.get(peer, (0, 0))
        counters[peer] = (up + int(found.get("bytes_acked", 0)), down + int(found.get("bytes_received", 0)))
        peer = None
    return counters


async def tcp_counters(pid: int) -> dict[str, tuple[int, int]] | None:
    if shutil.which("ss") is None:
        return None
    proc = await asyncio.create_subprocess_exec(
        "ss", "-tinpH", "state", "established",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await proc.communicate()
    return parse_ss(out.decode(errors="replace"), pid) if proc.returncode == 0 else None


def resolve_endpoint(endpoint: str) -> str:
    """"host:port" as ss prints the peer: a numeric address."""
    host, _, port = endpoint.rpartition(":")
    try:
        info = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except OSError as err:
        raise MeshError(f"--tcp-stages: cannot resolve {host}: {err}") from err
    address = str(info[0][4][0])
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def check_reachable(name: str, endpoint: str, timeout: float = 5.0) -> None:
    host, _, port = endpoint.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise MeshError(f"tcp stage {name} at {endpoint} does not accept connections: {err}") from err
