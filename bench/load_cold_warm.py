"""Cold and warm model loads on the namespace lab, per host, against OpenSSH streaming the same bytes.

A cold load (every host's weights cache emptied first) and a warm one (the same plan again), each timed by the
mesh; the difference is the time weights spent crossing. OpenSSH (`ssh host 'cat > /dev/null'`, aes128-gcm)
then streams each host's cold bytes to it, one host after the other, then to all hosts at once (as meshtui
pushes them), then to all at once into a file on each host's disk (as the push writes its cache); its connection
setup, timed as `ssh host true`, taken off. Prints JSON: cold and warm seconds,
bytes sent per host, and the transfer rates side by side. Run as root:

    sudo .venv/bin/python bench/load_cold_warm.py [--model smollm2|large] [--hosts 2] [--rounds 2] [--rate 1gbit]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from lab.netns import Lab  # noqa: E402  (tests/ is not a package)

from meshtui.inventory import load_inventory  # noqa: E402
from meshtui.mesh import Mesh  # noqa: E402


def model_line(which: str) -> str:
    if which == "smollm2":
        return 'name = "smollm2"'
    import dataclasses

    from synth import LARGE_SHAPE, synthetic_model

    return f'path = "{synthetic_model(**dataclasses.asdict(LARGE_SHAPE))}"'


def empty_caches(lab: Lab) -> None:
    for host in lab.hosts:
        folder = host.home / ".cache/meshtui/rpc-cache"
        for entry in folder.iterdir() if folder.is_dir() else []:
            entry.unlink()


async def load_once(inventory: Path) -> dict[str, Any]:
    mesh = Mesh(load_inventory(inventory))
    try:
        await mesh.up()
        return {"seconds": mesh.load_seconds,
                "hosts": {name: load.to_json() for name, load in mesh.host_loads.items()}}
    finally:
        await mesh.close()


def ssh_command(lab: Lab, name: str) -> list[str]:
    host = lab.host(name)
    return ["ssh", "-i", str(host.identity_file), "-o", f"UserKnownHostsFile={lab.known_hosts}",
            "-o", "BatchMode=yes", "-c", "aes128-gcm@openssh.com", "-p", str(host.port),
            f"{host.user}@{host.address}"]


def ssh_setup(lab: Lab, name: str) -> float:
    start = time.perf_counter()
    subprocess.run([*ssh_command(lab, name), "true"], check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - start


def openssh_stream(lab: Lab, name: str, n: int) -> float:
    """Seconds OpenSSH takes to stream n bytes to the host, less its connection setup (`ssh host true`)."""
    setup = ssh_setup(lab, name)
    feeder = subprocess.Popen(["head", "-c", str(n), "/dev/zero"], stdout=subprocess.PIPE)
    start = time.perf_counter()
    subprocess.run([*ssh_command(lab, name), "cat > /dev/null"], stdin=feeder.stdout, check=True)
    feeder.wait()
    return max(time.perf_counter() - start - setup, 1e-9)


def openssh_stream_all(lab: Lab, sent: dict[str, int], sink: str = "/dev/null") -> float:
    """Seconds OpenSSH takes to stream each host its bytes, all hosts at once, less the slowest setup. With a
    file as `sink` the host also writes them to its disk, as a push into its cache does (then removes it)."""
    setup = max(ssh_setup(lab, name) for name in sent)
    remote = "cat > /dev/null" if sink == "/dev/null" else f"cat > {sink} && rm -f {sink}"
    start = time.perf_counter()
    running = []
    for name, n in sent.items():
        feeder = subprocess.Popen(["head", "-c", str(n), "/dev/zero"], stdout=subprocess.PIPE)
        running.append((feeder, subprocess.Popen([*ssh_command(lab, name), remote], stdin=feeder.stdout)))
    for feeder, ssh in running:
        if ssh.wait() != 0:
            raise RuntimeError("ssh failed")
        feeder.wait()
    return max(time.perf_counter() - start - setup, 1e-9)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("smollm2", "large"), default="smollm2")
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="cold/warm pairs; each number is the best of them")
    parser.add_argument("--rate", help="cap every host's cable with tc tbf, e.g. 1gbit: a link slower than the CPU")
    args = parser.parse_args()
    with Lab(n_hosts=args.hosts) as lab:
        for host in lab.hosts if args.rate else []:
            lab.cap_bandwidth(host, args.rate)
        inventory = Path(tempfile.mkdtemp(prefix="meshtui-load-bench-")) / "inventory.toml"
        inventory.write_text(lab.inventory_toml(model_line(args.model)))
        runs: list[dict[str, Any]] = []
        for _ in range(args.rounds):
            empty_caches(lab)
            cold = await load_once(inventory)
            warm = await load_once(inventory)
            sent = {name: row["bytes_sent"] for name, row in cold["hosts"].items()}
            ssh = sum(openssh_stream(lab, name, n) for name, n in sent.items())
            ssh_parallel = openssh_stream_all(lab, sent)
            ssh_to_disk = openssh_stream_all(lab, sent, sink=".cache/meshtui-bench-sink")
            runs.append({"cold": cold, "warm": warm, "openssh_seconds": ssh,
                         "openssh_parallel_seconds": ssh_parallel, "openssh_parallel_to_disk_seconds": ssh_to_disk})
        best_cold = min(r["cold"]["seconds"] for r in runs)
        best_warm = min(r["warm"]["seconds"] for r in runs)
        best_ssh = min(r["openssh_seconds"] for r in runs)
        best_ssh_parallel = min(r["openssh_parallel_seconds"] for r in runs)
        best_ssh_disk = min(r["openssh_parallel_to_disk_seconds"] for r in runs)
        total = sum(row["bytes_sent"] for row in runs[0]["cold"]["hosts"].values())
        transfer = max(best_cold - best_warm, 1e-9)
        print(json.dumps({
            "model": args.model, "hosts": args.hosts, "rate": args.rate, "bytes_sent_cold": total,
            "cold_seconds": round(best_cold, 3), "warm_seconds": round(best_warm, 3),
            "warm_bytes_sent": {n: row["bytes_sent"] for n, row in runs[0]["warm"]["hosts"].items()},
            "transfer_MB_per_s": round(total / transfer / 1e6, 1),
            "openssh_MB_per_s": round(total / best_ssh / 1e6, 1),
            "transfer_over_openssh": round(best_ssh / transfer, 2),
            "openssh_parallel_MB_per_s": round(total / best_ssh_parallel / 1e6, 1),
            "transfer_over_openssh_parallel": round(best_ssh_parallel / transfer, 2),
            "openssh_parallel_to_disk_MB_per_s": round(total / best_ssh_disk / 1e6, 1),
            "transfer_over_openssh_parallel_to_disk": round(best_ssh_disk / transfer, 2),
            "runs": runs,
        }, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
