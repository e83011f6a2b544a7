"""`meshtui bench`: runs end to end on the embedded lab and writes well-formed JSON and SVG. No timing checks."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import REPO, meshtui_json

from meshtui.bench import parse_ss, parse_tcp_stages
from meshtui.errors import InventoryError
from meshtui.runtime import local_runtime_bundle


@pytest.mark.slow
def test_bench_on_embedded_lab_reports_single_and_ssh(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = meshtui_json("bench", "--lab-hosts", "2", "--prompts", "1", "--max-tokens", "8", "--out", str(out))
    runs = {run["mode"]: run for run in report["runs"]}
    assert set(runs) == {"single", "ssh"}
    assert [s["mode"] for s in report["skipped"]] == ["tcp"]
    for run in runs.values():
        for key in ("decode_tokens_per_second", "prefill_tokens_per_second", "ttft_seconds", "load_seconds"):
            assert run[key] > 0, (run["mode"], key, run[key])
        assert run["nodes"]
    assert runs["ssh"]["load_bytes_sent"] > 0
    assert report["reload_bytes_sent"] > 0
    # The first load pushes every tensor from 64 KiB into the hosts' caches before the engine loads (which then
    # finds them all there); the second finds every one in place and sends under 1%.
    assert set(report["reload_by_host"]) == set(runs["ssh"]["load_by_host"]) == {"lab1", "lab2"}
    for name, cold in runs["ssh"]["load_by_host"].items():
        warm = report["reload_by_host"][name]
        assert cold["tensors_offered"] > 0
        assert cold["tensors_pushed"] == cold["tensors_cached"] == cold["tensors_offered"]
        assert warm["tensors_pushed"] == 0
        assert warm["tensors_cached"] == warm["tensors_offered"] == cold["tensors_offered"]
        assert warm["bytes_sent"] < 0.01 * (warm["weights_sent"] + warm["weights_cached"])
    stages = [n for n in runs["ssh"]["nodes"] if n["name"] != "head"]
    assert stages
    for node in stages:
        assert node["latency_ms"]["mean"] > 0
        assert node["compute_ms"] >= 0 and node["network_ms"] >= 0
        assert node["round_trips_per_token"] > 0
        assert node["decode_bytes_per_token"]["up"] > 0 and node["decode_bytes_per_token"]["down"] > 0
    assert report["outputs_identical"] is True
    assert report["machine"]["cores"] >= 1 and report["machine"]["kernel"]
    assert report["plan"]["n_gpu_layers"] > 0
    assert json.loads((out / "bench.json").read_text()) == report
    svg = ET.parse(out / "bench.svg").getroot()
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    assert svg.findall(".//{http://www.w3.org/2000/svg}rect")


def test_tcp_stages_are_parsed_and_bad_ones_named() -> None:
    assert parse_tcp_stages("h1=198.51.100.11:50052, h2=host.lan:7") == {
        "h1": "198.51.100.11:50052", "h2": "host.lan:7"}
    for bad in ("h1", "h1=addr", "=a:1", "h1=a:0", "h1=a:1,h1=b:2", ""):
        with pytest.raises(InventoryError, match="--tcp-stages"):
            parse_tcp_stages(bad)


def test_ss_counters_are_summed_per_peer_for_one_process() -> None:
    text = (
        '0 0 198.51.100.1:40000 198.51.100.11:50052 users:(("python",pid=42,fd=5))\n'
        "\t cubic wscale:7,7 rto:204 bytes_sent:1200 bytes_acked:1000 bytes_received:300 segs_out:9\n"
        '0 0 198.51.100.1:40002 198.51.100.11:50052 users:(("python",pid=42,fd=6))\n'
        "\t cubic bytes_acked:5 bytes_received:7\n"
        '0 0 198.51.100.1:40001 198.51.100.12:50052 users:(("python",pid=43,fd=5))\n'
        "\t cubic bytes_acked:999 bytes_received:999\n"
    )
    assert parse_ss(text, 42) == {"198.51.100.11:50052": (1005, 307)}


@contextlib.contextmanager
def plain_tcp_stages(folder: Path, names: list[str]) -> Iterator[dict[str, str]]:
    """bench/tcp_stage.py (a plain TCP ggml RPC server on the meshtui runtime) on 127.0.0.1, one per name."""
    (folder / "lib").mkdir(parents=True)
    for rel, path in local_runtime_bundle().files:
        shutil.copy2(path, folder / rel)
    procs: list[subprocess.Popen[str]] = []
    endpoints: dict[str, str] = {}
    try:
        for name in names:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "tcp_stage.py"), "--runtime", str(folder),
                                     "--host", "127.0.0.1", "--port", str(port)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs.append(proc)
            assert proc.stdout is not None
            assert json.loads(proc.stdout.readline())["event"] == "ready"
            endpoints[name] = f"127.0.0.1:{port}"
        yield endpoints
    finally:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(10)


@pytest.mark.slow
def test_the_tcp_baseline_loads_as_up_does_and_runs_behind_the_relays_too(tmp_path: Path) -> None:
    with plain_tcp_stages(tmp_path / "runtime", ["lab1", "lab2"]) as endpoints:
        stages = ",".join(f"{name}={endpoint}" for name, endpoint in endpoints.items())
        report = meshtui_json("bench", "--lab-hosts", "2", "--tcp-stages", stages, "--prompts", "1",
                              "--max-tokens", "6")
        runs = {run["mode"]: run for run in report["runs"]}
        assert set(runs) == {"single", "ssh", "tcp"} and report["skipped"] == []
        assert runs["tcp"]["placement_matches_plan"] is True
        assert runs["tcp"]["placement"] == runs["ssh"]["placement"]
        assert runs["tcp"]["load_bytes_sent"] > 0 and runs["tcp"]["decode_tokens_per_second"] > 0
        assert report["outputs_identical"] is True and report["ssh_over_tcp_decode_ratio"] > 0
        # The same plain stages as the baseline of the round-trip sweep, behind the same relays.
        sweep = meshtui_json("bench", "--lab-hosts", "2", "--tcp-stages", stages, "--rtt", "2", "--prompts", "1",
                             "--max-tokens", "4")
    assert [(r["path"], r["prompts"]) for r in sweep["rtt_sweep"]] == [
        ("ssh", "copy"), ("tcp", "copy"), ("ssh", "free"), ("tcp", "free")]
    tcp_rows = [r for r in sweep["rtt_sweep"] if r["path"] == "tcp"]
    assert all(r["agreement_with_off"] == [{"identical": True, "common_prefix": r["replies"][0]["tokens"],
                                            "parted_at": None}] for r in tcp_rows)
    assert sorted(g["prompts"] for g in sweep["speedups"] if "ssh_over_tcp" in g) == ["copy", "free"]
