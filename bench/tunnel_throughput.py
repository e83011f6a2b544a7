"""How fast weights cross meshtui's SSH tunnel, against OpenSSH streaming the same bytes, on the namespace lab.

One lab host; a sink on a Unix socket owned by the host's user reads everything and answers one byte at the end.
The client (its own process, as the engine is) writes BYTES as SET_TENSOR frames of FRAME bytes, as ggml's client
does during a load, through the tunnel; OpenSSH's `ssh host 'cat > /dev/null'` (aes128-gcm) streams the same
bytes. Prints MB/s for each, best of ROUNDS, alternating. Run as root:

    sudo [BYTES=268435456] [FRAME=1048576] [ROUNDS=3] .venv/bin/python bench/tunnel_throughput.py [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from lab.netns import Lab  # noqa: E402

from meshtui.tunnels import StageTunnel  # noqa: E402

BYTES = int(os.environ.get("BYTES", 256 * 1024 * 1024))
FRAME = int(os.environ.get("FRAME", 1024 * 1024))
ROUNDS = int(os.environ.get("ROUNDS", 3))
SINK = """
import socket, sys
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(4)
while True:
    c, _ = s.accept()
    want = int(c.recv(32).split(b"\\n")[0]); got = 0
    while got < want:
        d = c.recv(1 << 20)
        if not d: break
        got += len(d)
    c.sendall(b"k"); c.close()
"""


def client(path: str) -> float:
    """Send BYTES as SET_TENSOR frames to the tunnel's socket; seconds until the sink says it has them all."""
    import socket

    frame = bytes([6]) + struct.pack("<Q", FRAME) + bytes(FRAME)
    n = BYTES // len(frame)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        header = f"{n * len(frame)}\n".encode().ljust(32)
        start = time.perf_counter()
        s.sendall(header)
        for _ in range(n):
            s.sendall(frame)
        s.recv(1)
        return time.perf_counter() - start


def in_child(path: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--client", path], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def openssh(lab: Lab, host) -> float:  # type: ignore[no-untyped-def]
    n = (BYTES // (FRAME + 9)) * (FRAME + 9)
    command = ["ssh", "-i", str(host.identity_file), "-o", f"UserKnownHostsFile={lab.known_hosts}",
               "-o", "BatchMode=yes", "-c", "aes128-gcm@openssh.com", "-p", str(host.port),
               f"{host.user}@{host.address}", "cat > /dev/null"]
    feeder = subprocess.Popen(["head", "-c", str(n), "/dev/zero"], stdout=subprocess.PIPE)
    start = time.perf_counter()
    subprocess.run(command, stdin=feeder.stdout, check=True)
    feeder.wait()
    return time.perf_counter() - start


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--client")
    parser.add_argument("--profile", action="store_true", help="cProfile the tunnel's process, print the top 25")
    args = parser.parse_args()
    if args.client:
        print(client(args.client))
        return
    with Lab(n_hosts=1) as lab:
        host = lab.hosts[0]
        script = host.home / "sink.py"
        script.write_text(SINK)
        sink_socket = host.home / "sink.sock"
        sink = lab.popen_in(host, ["runuser", "-u", host.user, "--", "/usr/bin/python3", str(script),
                                   str(sink_socket)])
        await asyncio.sleep(1.0)
        try:
            from meshtui.inventory import HostSpec, SSHSpec
            from meshtui.ssh import connect_host

            spec = HostSpec(name=host.name, address=host.address, user=host.user, port=host.port,
                            identity_file=host.identity_file)
            async with await connect_host(spec, SSHSpec(known_hosts=lab.known_hosts)) as conn:
                tunnel = StageTunnel(conn, str(sink_socket))
                local = await tunnel.start()
                loop = asyncio.get_running_loop()
                results: dict[str, list[float]] = {"openssh": [], "tunnel": []}
                profiler = None
                if args.profile:
                    import cProfile

                    profiler = cProfile.Profile()
                for _ in range(ROUNDS):
                    results["openssh"].append(await loop.run_in_executor(None, openssh, lab, host))
                    if profiler is not None:
                        profiler.enable()
                    results["tunnel"].append(await loop.run_in_executor(None, in_child, str(local)))
                    if profiler is not None:
                        profiler.disable()
                await tunnel.close()
                mb = (BYTES // (FRAME + 9)) * (FRAME + 9) / 1e6
                report = {k: round(mb / min(v), 1) for k, v in results.items()}
                report["tunnel/openssh"] = round(report["tunnel"] / report["openssh"], 2)
                print(json.dumps({"bytes": int(mb * 1e6), "frame": FRAME, "MB_per_s": report,
                                  "seconds": {k: [round(x, 3) for x in v] for k, v in results.items()}}))
                if profiler is not None:
                    import pstats

                    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        finally:
            sink.kill()


if __name__ == "__main__":
    asyncio.run(main())
