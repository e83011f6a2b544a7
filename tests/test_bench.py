"""`meshtui bench`: runs end to end on the embedded lab and writes well-formed JSON and SVG. No timing checks."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers import meshtui_json

from meshtui.bench import parse_ss, parse_tcp_stages
from meshtui.errors import InventoryError


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
