#!/usr/bin/env python3
"""Benchmark meshtui on the namespace lab: the head alone, the mesh over SSH, and plain TCP stages.

Builds a 2-host lab (tests/lab/netns.py: real OpenSSH sshd hosts in network namespaces), starts one plain
TCP ggml RPC server per host on the host's own lab address (bench/tcp_stage.py, run as the host's user),
then runs `meshtui bench` for SmolLM2 and for a synthetic f16 model of about 2.3 GB (tests/synth.py's
LARGE_SHAPE, whose every block matrix is over ggml's 10 MB RPC-cache threshold). Every process uses one
thread, so the head and two stages never fight over the cores of a small machine.

    sudo .venv/bin/python bench/lab_bench.py --out out/bench

Writes DIR/<model>/bench.json and DIR/<model>/bench.svg and prints where they are. Needs root.

With --rtt, --speculative or --concurrency it runs `meshtui bench`'s sweeps instead (no tcp stages): decode
tok/s against the round trip of every link (slow-link relays in front of each host's sshd), with and without
speculation, and against requests at once, into DIR/<model>-sweep/. --rate caps every host's cable with tc tbf.

    sudo .venv/bin/python bench/lab_bench.py --models smollm2 --hosts 3 --rtt 0,1,2,5 --speculative off,auto \
        --concurrency 1,2,4,8 --out out/bench
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from lab import netns  # noqa: E402  (tests/ is not a package)
from synth import LARGE_SHAPE, synthetic_model  # noqa: E402

from meshtui.runtime import local_runtime_bundle, weight_repack_wanted  # noqa: E402

STAGE_SCRIPT = Path(__file__).resolve().parent / "tcp_stage.py"
STAGE_PORT = 50052
PROXY_SCRIPT = Path(__file__).resolve().parent / "tcp_proxy.py"
PROXY_PORT = 41052  # on the head's 127.0.0.1, with --tcp-via-proxy
RELAY_PORT = 42052  # with --tcp-via-relays: on each host's address, and (+100) on the head's 127.0.0.1
STAGE_DIR = "meshtui-tcp-stage"  # in each lab user's home
NODE_MEMORY = "2 GiB"  # max_memory of every node: equal, stable shares, so both loads get the same plan
# (label, model line of the inventory, default tokens per prompt)
MODELS = {
    "smollm2": ('name = "smollm2"', 64),
    "synthetic": (None, 24),  # path filled in once the file exists
}


def install_stage(lab: netns.Lab, host: netns.LabHost) -> Path:
    """Copy the ggml runtime (the libraries meshtui pushes to agents) and tcp_stage.py into the host's home."""
    folder = host.home / STAGE_DIR
    (folder / "lib").mkdir(parents=True, exist_ok=True)
    for rel, path in local_runtime_bundle().files:  # the agent script too: tcp_stage.py loads with its code
        shutil.copy2(path, folder / rel)
    shutil.copy2(STAGE_SCRIPT, folder / STAGE_SCRIPT.name)
    user = pwd.getpwnam(host.user)
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, user.pw_uid, user.pw_gid)
    return folder


@contextlib.contextmanager
def tcp_stages(lab: netns.Lab, log_dir: Path, port: int, threads: int = 1) -> Iterator[dict[str, str]]:
    """One plain TCP stage server per lab host, as that host's user, on its lab address; all stopped after."""
    procs: list[subprocess.Popen[bytes]] = []
    endpoints: dict[str, str] = {}
    try:
        for host in lab.hosts:
            folder = install_stage(lab, host)
            log = open(log_dir / f"tcp-stage-{host.name}.log", "ab")  # noqa: SIM115 - closed with the process
            proc = lab.popen_in(host, [
                "runuser", "-u", host.user, "--", str(netns.SYSTEM_PYTHON), str(folder / STAGE_SCRIPT.name),
                "--runtime", str(folder), "--host", host.address, "--port", str(port), "--threads", str(threads),
                *([] if weight_repack_wanted() else ["--no-repack"]),
            ], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, start_new_session=True)
            log.close()
            procs.append(proc)
            ready = _read_line(proc, timeout=30.0)
            if ready.get("event") != "ready":
                raise RuntimeError(f"tcp stage on {host.name} did not start: {ready}")
            endpoints[host.name] = f"{host.address}:{port}"
        yield endpoints
    finally:
        for proc in procs:
            _stop(proc)


@contextlib.contextmanager
def tcp_proxy(endpoints: dict[str, str], wanted: bool) -> Iterator[dict[str, str]]:
    """The stages' endpoints, or (wanted) 127.0.0.1 ports of one forwarder process in front of them."""
    if not wanted:
        yield endpoints
        return
    ports = {name: PROXY_PORT + i for i, name in enumerate(endpoints)}
    proc = subprocess.Popen([sys.executable, str(PROXY_SCRIPT), *(f"{ports[n]}:{e}" for n, e in endpoints.items())],
                            stdout=subprocess.PIPE, start_new_session=True)
    try:
        ready = _read_line(proc, timeout=10.0)
        if ready.get("event") != "ready":
            raise RuntimeError(f"bench/tcp_proxy.py did not start: {ready}")
        yield {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def _forwarders(
    lab: netns.Lab, start: Callable[[int, netns.LabHost], tuple[list[subprocess.Popen[bytes]], str]]
) -> Iterator[dict[str, str]]:
    """Start each host's forwarders (start(i, host) -> their processes, the head's endpoint); all killed after."""
    procs: list[subprocess.Popen[bytes]] = []
    reached: dict[str, str] = {}
    try:
        for i, host in enumerate(lab.hosts):
            started, reached[host.name] = start(i, host)
            procs.extend(started)
        for endpoint in reached.values():
            _wait_listening(endpoint, timeout=15.0)
        yield reached
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def openssh_forwards(lab: netns.Lab, endpoints: dict[str, str], wanted: bool) -> Iterator[dict[str, str]]:
    """The endpoints, or (wanted) 127.0.0.1 ports of one `ssh -N -L` per host forwarding to them."""
    if not wanted:
        yield endpoints
        return

    def start(i: int, host: netns.LabHost) -> tuple[list[subprocess.Popen[bytes]], str]:
        port = PROXY_PORT + 10 + i
        return [subprocess.Popen([
            "ssh", "-N", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={lab.known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "Ciphers=aes128-gcm@openssh.com",
            "-o", "ExitOnForwardFailure=yes",
            "-i", str(host.identity_file), "-p", str(host.port),
            "-L", f"127.0.0.1:{port}:{endpoints[host.name]}", f"{host.user}@{host.address}",
        ], start_new_session=True)], f"127.0.0.1:{port}"

    with _forwarders(lab, start) as reached:
        yield reached


@contextlib.contextmanager
def c_relays(lab: netns.Lab, endpoints: dict[str, str], wanted: bool) -> Iterator[dict[str, str]]:
    """The endpoints, or (wanted) the hop structure of any SSH forward with no SSH: two socat relays per stage.

    One relay on the head's 127.0.0.1 (where an SSH client sits) and one in the host's namespace (where sshd
    sits), both C, TCP_NODELAY, no encryption. What they cost is a floor for every SSH forward on this machine.
    """
    if not wanted:
        yield endpoints
        return

    def start(i: int, host: netns.LabHost) -> tuple[list[subprocess.Popen[bytes]], str]:
        host_port, head_port = RELAY_PORT + i, RELAY_PORT + 100 + i
        return [
            lab.popen_in(host, ["socat", f"TCP-LISTEN:{host_port},bind={host.address},reuseaddr,fork,nodelay",
                                f"TCP:{endpoints[host.name]},nodelay"], start_new_session=True),
            subprocess.Popen(["socat", f"TCP-LISTEN:{head_port},bind=127.0.0.1,reuseaddr,fork,nodelay",
                              f"TCP:{host.address}:{host_port},nodelay"], start_new_session=True),
        ], f"127.0.0.1:{head_port}"

    with _forwarders(lab, start) as reached:
        yield reached


def _wait_listening(endpoint: str, timeout: float) -> None:
    host, port = endpoint.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no forward listening on {endpoint}") from None
            time.sleep(0.1)


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], timeout)
    if not readable:
        return {"event": "timeout"}
    line = proc.stdout.readline()
    try:
        parsed: dict[str, Any] = json.loads(line)
    except ValueError:
        return {"event": "unparsable", "line": line[:200].decode(errors="replace"), "status": proc.poll()}
    return parsed


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Close the lifeline; kill the whole group if the server does not leave on its own."""
    with contextlib.suppress(OSError):
        if proc.stdin is not None:
            proc.stdin.close()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def write_inventory(lab: netns.Lab, model_line: str, path: Path, threads: int = 1) -> Path:
    per_host = {h.name: {"threads": threads, "max_memory": NODE_MEMORY} for h in lab.hosts}
    text = lab.inventory_toml(model_line, extra_host_keys=per_host)
    head = "[head]\ncompute = true\n"
    assert text.count(head) == 1, text
    path.write_text(text.replace(head, f'{head}threads = {threads}\nmax_memory = "{NODE_MEMORY}"\n'))
    return path


def run_meshtui_bench(inventory: Path, extra: list[str], out: Path, prompts: int, max_tokens: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "meshtui", "bench", str(inventory), *extra, "--json", "-v",
           "--out", str(out), "--prompts", str(prompts), "--max-tokens", str(max_tokens)]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    result = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, timeout=3600, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"meshtui bench failed with status {result.returncode}")
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def run_bench(inventory: Path, endpoints: dict[str, str], out: Path, prompts: int, max_tokens: int) -> dict[str, Any]:
    stages = ",".join(f"{name}={endpoint}" for name, endpoint in endpoints.items())
    return run_meshtui_bench(inventory, ["--tcp-stages", stages], out, prompts, max_tokens)


def sweep_headline(label: str, report: dict[str, Any]) -> str:
    speeds = "; ".join(f"{r['prompts']} {r.get('path', 'ssh')}/{r['speculative']} at {r['rtt_ms']:g} ms "
                       f"{r['decode_tokens_per_second']:.1f}"
                       for r in report["rtt_sweep"] if r["decode_tokens_per_second"])
    gains = "; ".join(f"{g['speculative']}/off {g['prompts']} at {g['rtt_ms']:g} ms {g['over_off']:.2f}x"
                      if "over_off" in g else f"ssh/tcp {g['prompts']} at {g['rtt_ms']:g} ms {g['ssh_over_tcp']:.2f}"
                      for g in report["speedups"])
    return f"{label} (sweep): decode tok/s {speeds}" + (f"\n  {gains}" if gains else "")


def headline(label: str, report: dict[str, Any]) -> str:
    runs = {r["mode"]: r for r in report["runs"]}
    speeds = ", ".join(f"{mode} {run['decode_tokens_per_second']:.1f}" for mode, run in runs.items())
    ratio = report.get("ssh_over_tcp_decode_ratio")
    return (f"{label}: decode tok/s {speeds}; ssh/tcp {ratio:.2f}; load over ssh "
            f"{runs['ssh']['load_bytes_sent'] / 1e6:.1f} MB, reload {report['reload_bytes_sent'] / 1e6:.1f} MB"
            if ratio is not None else f"{label}: decode tok/s {speeds}")


def model_choice(given: str) -> tuple[str, tuple[str | None, int]]:
    """A `--models` entry as (its name in the report, (its inventory line, or None for the synthetic model; its
    default tokens per prompt)): a builtin name, or a GGUF file's path, named by its stem."""
    if given in MODELS:
        return given, MODELS[given]
    return Path(given).stem, (f"path = {json.dumps(str(Path(given).resolve()))}", 64)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench", help="output folder (default out/bench)")
    parser.add_argument("--models", default="smollm2,synthetic",
                        help="comma-separated: smollm2, synthetic, or paths of .gguf files")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, help="tokens per prompt (default 64 for smollm2, 24 synthetic)")
    via = parser.add_mutually_exclusive_group()
    via.add_argument("--tcp-via-proxy", action="store_true",
                     help="send the tcp mode through a plain TCP forwarder on the head (bench/tcp_proxy.py): "
                          "what the extra hop costs without SSH")
    via.add_argument("--tcp-via-openssh", action="store_true",
                     help="send the tcp mode through OpenSSH client forwards (ssh -L, AES-GCM) to the stages: "
                          "the manual setup users build around rpc-server, as the baseline")
    via.add_argument("--tcp-via-relays", action="store_true",
                     help="send the tcp mode through two socat relays per stage (head loopback, host "
                          "namespace): the hops of any SSH forward without SSH, a floor for its cost")
    parser.add_argument("--hosts", type=int, default=2, help="lab hosts (default 2)")
    parser.add_argument("--rtt", metavar="MS,...", help="sweep: round trips per link, e.g. 0,1,2,5")
    parser.add_argument("--speculative", metavar="MODE,...", help="sweep: speculation modes, e.g. off,auto")
    parser.add_argument("--concurrency", metavar="N,...", help="sweep: requests at once, e.g. 1,2,4,8")
    parser.add_argument("--rate", metavar="RATE", help="cap every host's cable with tc tbf, e.g. 100mbit")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads of the head and of every stage (default 1: a stage computes while the "
                             "others wait, so on a small machine each stage may use all its cores)")
    parser.add_argument("--draft", metavar="PATH_OR_NAME", help="the inventory's [model] draft (--speculative draft)")
    args = parser.parse_args()
    sweep = [f"--{flag}={value}" for flag, value in (("rtt", args.rtt), ("speculative", args.speculative),
                                                     ("concurrency", args.concurrency)) if value is not None]
    if sweep and (args.tcp_via_proxy or args.tcp_via_openssh or args.tcp_via_relays):
        parser.error("the sweeps run no tcp mode: --tcp-via-* does not combine with --rtt/--speculative/--concurrency")
    reason = netns.lab_unavailable_reason()
    if reason is not None:
        print(f"lab_bench: the namespace lab cannot run here: {reason}", file=sys.stderr)
        return 2
    if args.tcp_via_relays and shutil.which("socat") is None:
        parser.error("--tcp-via-relays needs socat (apt-get install socat)")
    labels = [m.strip() for m in args.models.split(",") if m.strip()]
    for label in labels:
        if label not in MODELS and not label.endswith(".gguf"):
            parser.error(f"unknown model {label!r} (known: {', '.join(MODELS)}, or a .gguf file's path)")
        if label not in MODELS and not Path(label).is_file():
            parser.error(f"{label}: no such file")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    netns.cleanup_stale()
    reports: dict[str, dict[str, Any]] = {}
    with netns.Lab(n_hosts=args.hosts) as lab:
        if args.rate:
            for host in lab.hosts:
                lab.cap_bandwidth(host, args.rate)
        for index, (label, (model_line, default_tokens)) in enumerate(model_choice(m) for m in labels):
            if model_line is None:
                print("preparing the synthetic model (about 2.3 GB, cached in ~/.cache/meshtui/models)",
                      file=sys.stderr, flush=True)
                model_line = f'path = "{synthetic_model(**dataclasses.asdict(LARGE_SHAPE))}"'
            if args.draft:  # the inventory's `[model] draft`, for --speculative draft
                model_line += f"\ndraft = {json.dumps(args.draft)}"
            inventory = write_inventory(lab, model_line, lab.root / f"inventory-{label}.toml", args.threads)
            # A new port per run: ggml's server does not set SO_REUSEADDR.
            if sweep:  # the plain TCP stages behind the same relays, as the baseline at every round trip
                with tcp_stages(lab, out, STAGE_PORT + index, args.threads) as endpoints:
                    stages = ",".join(f"{name}={endpoint}" for name, endpoint in endpoints.items())
                    reports[label] = run_meshtui_bench(inventory, [*sweep, "--tcp-stages", stages],
                                                       out / f"{label}-sweep", args.prompts,
                                                       args.max_tokens or default_tokens)
                continue
            with tcp_stages(lab, out, STAGE_PORT + index, args.threads) as endpoints, \
                    tcp_proxy(endpoints, args.tcp_via_proxy) as proxied, \
                    openssh_forwards(lab, proxied, args.tcp_via_openssh) as forwarded, \
                    c_relays(lab, forwarded, args.tcp_via_relays) as reached:
                reports[label] = run_bench(inventory, reached, out / label, args.prompts,
                                           args.max_tokens or default_tokens)
    print()
    for label, report in reports.items():
        folder = out / (f"{label}-sweep" if sweep else label)
        print(sweep_headline(label, report) if sweep else headline(label, report))
        print(f"  {folder / 'bench.json'}\n  {folder / 'bench.svg'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
