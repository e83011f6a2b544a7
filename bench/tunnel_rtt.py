"""Round-trip cost of meshtui's SSH tunnel against plain TCP, on the namespace lab (run as root).

Mimics one stage's traffic for one token: the client sends a burst of small frames (UP bytes, default 3000; a
SmolLM2 decode step sends about 12000), the server answers with the activations (DOWN bytes, default 2304) once
it has them all, in one write, or with SPLIT=1 as ggml's server does: the 8-byte size, then the payload.
Prints the mean and median round trip per path.

    sudo [UP=12000] [SPLIT=1] .venv/bin/python bench/tunnel_rtt.py [--rounds 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from lab.netns import Lab  # noqa: E402

from meshtui.tunnels import StageTunnel  # noqa: E402

UP, DOWN = int(os.environ.get("UP", 3000)), int(os.environ.get("DOWN", 2304))
SPLIT = bool(os.environ.get("SPLIT"))
SERVER = f"""
import socket, sys
SPLIT = {SPLIT}
if sys.argv[1].startswith("/"):  # a Unix socket, as a stage listens
    s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1])
else:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(4)
while True:
    c, _ = s.accept()
    if c.family == socket.AF_INET: c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        got = 0
        while got < {UP}:
            d = c.recv(65536)
            if not d: break
            got += len(d)
        if got < {UP}: break
        if SPLIT:
            c.sendall(({DOWN} - 8).to_bytes(8, "little")); c.sendall(bytes({DOWN} - 8))
        else:
            c.sendall(({DOWN} - 8).to_bytes(8, "little") + bytes({DOWN} - 8))
    c.close()
"""


async def measure(port: int, host: str, rounds: int) -> list[float]:
    if host.startswith("/"):
        reader, writer = await asyncio.open_unix_connection(host)
    else:
        reader, writer = await asyncio.open_connection(host, port)
    import struct

    def frame(cmd: int, size: int) -> bytes:
        return bytes([cmd]) + struct.pack("<Q", size) + bytes(size)

    # 8 SET_TENSOR, 1 GRAPH_RECOMPUTE, 1 GET_TENSOR: the frames of one decode step, UP bytes in all.
    frames = [frame(6, 300)] * 8 + [frame(16, 16)]
    frames.append(frame(8, UP - sum(map(len, frames)) - 9))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for chunk in frames:
            writer.write(chunk)
        await reader.readexactly(DOWN)
        times.append(time.perf_counter() - start)
    writer.close()
    return times


def measure_in_child(host: str, port: int, rounds: int) -> list[float]:
    """The client runs in its own process, as the engine does, so it doesn't share the tunnel's event loop."""
    import json
    import subprocess

    out = subprocess.run([sys.executable, __file__, "--client", host, str(port), str(rounds)],
                         capture_output=True, text=True, check=True).stdout
    return list(json.loads(out))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3000)
    parser.add_argument("--client", nargs=3, metavar=("HOST", "PORT", "ROUNDS"))
    args = parser.parse_args()
    if args.client:
        import json

        await measure(int(args.client[1]), args.client[0], 200)
        print(json.dumps(await measure(int(args.client[1]), args.client[0], int(args.client[2]))))
        return
    with Lab(n_hosts=1) as lab:
        host = lab.hosts[0]
        script = host.home / "echo_server.py"
        script.write_text(SERVER)
        stage_socket = host.home / "echo.sock"  # owned by the host's user, like a stage's socket
        loop_srv = lab.popen_in(host, ["runuser", "-u", host.user, "--", "/usr/bin/python3", str(script),
                                       str(stage_socket), "0"])
        lan_srv = lab.popen_in(host, ["/usr/bin/python3", str(script), host.address, "7002"])
        await asyncio.sleep(1.0)
        try:
            from meshtui.inventory import HostSpec, SSHSpec
            from meshtui.ssh import connect_host

            spec = HostSpec(name=host.name, address=host.address, user=host.user, port=host.port,
                            identity_file=host.identity_file)
            async with await connect_host(spec, SSHSpec(known_hosts=lab.known_hosts)) as conn:
                tunnel = StageTunnel(conn, str(stage_socket), max_pktsize=int(os.environ.get("PKT", 32768)))
                local_path = await tunnel.start()
                results = {}
                for label, target in (("plain TCP", (host.address, 7002)), ("meshtui tunnel", (str(local_path), 0))):
                    times = await asyncio.get_running_loop().run_in_executor(
                        None, measure_in_child, target[0], target[1], args.rounds)
                    results[label] = times
                    print(f"{label:>15}: mean {statistics.fmean(times) * 1e6:7.1f} us, "
                          f"median {statistics.median(times) * 1e6:7.1f} us over {len(times)} rounds")
                await tunnel.close()
                overhead = statistics.median(results["meshtui tunnel"]) - statistics.median(results["plain TCP"])
                print(f"tunnel adds {overhead * 1e6:.1f} us per round trip (median)")
        finally:
            loop_srv.kill()
            lan_srv.kill()


if __name__ == "__main__":
    asyncio.run(main())
