"""`meshtui bench --rtt/--speculative/--concurrency`: the sweeps' harness, not their speed.

End to end on the embedded lab (real asyncssh hosts behind real relays, SmolLM2): the report's shape, the relay
really in the path (every stage's ping is at least the round trip set, a bound that cannot flake), the table and
the plot. The tables are also checked exactly on fixed numbers.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers import meshtui, meshtui_json

from meshtui.bench import parse_concurrency, parse_rtt, parse_speculative, render_sweep_table
from meshtui.bench.links import link_targets, ssh_config_through
from meshtui.bench.plot import render_sweep_svg
from meshtui.bench.rates import all_decoding_rate, end_to_end_rate, speculation_totals, speedups
from meshtui.bench.sweeps import speculation_support
from meshtui.bench.timing import ReplyTiming, token_agreement
from meshtui.errors import InventoryError
from meshtui.inventory import HeadSpec, HostSpec, Inventory, ModelSpec, SSHSpec

SVG = "{http://www.w3.org/2000/svg}"


@pytest.mark.slow
def test_sweeps_on_the_embedded_lab(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = meshtui_json("bench", "--lab-hosts", "2", "--rtt", "0,3", "--speculative", "off,auto",
                          "--concurrency", "1,2", "--prompts", "1", "--max-tokens", "6", "--out", str(out),
                          timeout=600)
    assert report["kind"] == "sweep"
    assert report["settings"]["rtt_ms"] == [0.0, 3.0] and report["settings"]["concurrency"] == [1, 2]
    assert report["settings"]["mesh_parallel"] == 2  # the mesh decodes as many replies as the sweep sends at once
    runnable = ["off", "auto"] if speculation_support() else ["off"]
    if not speculation_support():
        assert report["skipped"] == [{"speculative": "auto",
                                      "reason": "this build's mesh has no speculative decoding yet"}]
    rows = report["rtt_sweep"]
    assert [(r["rtt_ms"], r["prompts"], r["speculative"]) for r in rows] == [
        (rtt, prompts, mode) for rtt in (0.0, 3.0) for prompts in ("copy", "free") for mode in runnable]
    for row in rows:
        assert set(row["stage_ping_ms"]) == {"lab1", "lab2"}
        assert row["decode_tokens_per_second"] > 0 and row["generated_tokens"] > 0
        assert len(row["replies"]) == 1 and row["replies"][0]["tokens"] >= 2
        if row["speculative"] == "off":  # a token per step at most: every step is a round trip of every stage
            assert 0 < row["tokens_per_round_trip"] <= 1.0, row["tokens_per_round_trip"]
        if row["rtt_ms"] == 3.0:  # through the relay: 1.5 ms each way is a floor
            assert min(row["stage_ping_ms"].values()) >= 3.0, row["stage_ping_ms"]
    conc = report["concurrency_sweep"]
    assert [(r["rtt_ms"], r["concurrency"]) for r in conc] == [(0.0, 1), (0.0, 2), (3.0, 1), (3.0, 2)]
    for row in conc:
        assert 1 <= row["max_in_flight"] <= row["concurrency"]
        assert len(row["replies"]) == len(row["agreement_with_alone"]) == row["concurrency"]
        assert row["aggregate_decode_tokens_per_second"] > 0 and row["ttft_seconds"]["max"] > 0
        late = row["late_arrival"]
        if row["concurrency"] == 1:
            assert late is None
        else:
            assert late["ttft_seconds"] > 0 and late["idle_ttft_seconds"] > 0
            assert late["over_idle"] == pytest.approx(late["ttft_seconds"] / late["idle_ttft_seconds"])
    assert json.loads((out / "bench.json").read_text()) == report
    svg = ET.parse(out / "bench.svg").getroot()
    assert len(svg.findall(f".//{SVG}polyline")) == 2 * len(runnable) + 2 * 2  # rtt lines; conc lines per rtt

    table = meshtui("bench", "--lab-hosts", "1", "--rtt", "1", "--prompts", "1", "--max-tokens", "3", timeout=600)
    assert table.returncode == 0, table.stderr[-2000:]
    lines = table.stdout.splitlines()
    assert lines[2] == "link: one relay process on 127.0.0.1 in front of each host's sshd; 0 ms = no delay added"
    assert lines[4] == ("decode tok/s against the round trip of every link "
                        "(ping: the slowest stage's, through its agent)")
    assert lines[5].split() == ["rtt", "ms", "ping", "ms", "copy", "off", "free", "off"]
    assert lines[6].split()[0] == "1" and float(lines[6].split()[1]) >= 1.0


def _row(rtt: float, prompts: str, mode: str, tps: float, agreement: list[dict[str, object]] | None = None
         ) -> dict[str, object]:
    row: dict[str, object] = {"rtt_ms": rtt, "prompts": prompts, "speculative": mode,
                              "stage_ping_ms": {"h1": rtt + 0.25, "h2": rtt + 0.5},
                              "decode_tokens_per_second": tps, "speculation": None}
    if agreement is not None:
        row["agreement_with_off"] = agreement
    return row


def test_sweep_table_and_plot_from_fixed_numbers() -> None:
    same = token_agreement([1, 2, 3], [1, 2, 3])
    parted = token_agreement([1, 2, 3, 4], [1, 2, 9])
    assert same == {"identical": True, "common_prefix": 3, "parted_at": None}
    assert parted == {"identical": False, "common_prefix": 2, "parted_at": 2}
    rows = [_row(0, "copy", "off", 40.0), _row(0, "copy", "auto", 80.0, [same]),
            _row(0, "free", "off", 40.0), _row(0, "free", "auto", 38.0, [same]),
            _row(2, "copy", "off", 20.0), _row(2, "copy", "auto", 60.0, [parted]),
            _row(2, "free", "off", 20.0), _row(2, "free", "auto", 19.0, [same])]
    report = {
        "kind": "sweep",
        "machine": {"cores": 2, "cpu": "AMD EPYC", "kernel": "Linux 6", "load_average": [1.5, 1.0, 1.0]},
        "model": {"name": "tiny", "file_bytes": 1024 * 1024, "n_layer": 4},
        "settings": {"max_tokens": 64, "link": "relays"},
        "skipped": [], "rtt_sweep": rows,
        "concurrency_sweep": [
            {"rtt_ms": 0, "concurrency": 1, "max_in_flight": 1, "aggregate_decode_tokens_per_second": 40.0,
             "all_decoding_tokens_per_second": 40.0, "end_to_end_tokens_per_second": 35.0,
             "per_request_decode_tokens_per_second": 40.0, "ttft_seconds": {"mean": 0.05, "max": 0.05},
             "agreement_with_alone": [same]},
            {"rtt_ms": 0, "concurrency": 4, "max_in_flight": 4, "aggregate_decode_tokens_per_second": 120.0,
             "per_request_decode_tokens_per_second": 30.0, "ttft_seconds": {"mean": 0.08, "max": 0.1},
             "agreement_with_alone": [same, same, parted, same],
             "late_arrival": {"ttft_seconds": 0.09, "idle_ttft_seconds": 0.04, "over_idle": 2.25}}],
    }
    assert render_sweep_table(report).splitlines() == [
        "tiny (1.00 MiB, 4 layers), chat prompts x 64 tokens, greedy",
        "machine: 2 cores, AMD EPYC, Linux 6; load average at start 1.50",
        "link: relays",
        "",
        "decode tok/s against the round trip of every link (ping: the slowest stage's, through its agent)",
        "rtt ms  ping ms     copy off    copy auto     free off    free auto    copy auto/off    free auto/off",
        "     0     0.50         40.0         80.0         40.0         38.0            2.00x            0.95x",
        "     2     2.50         20.0         60.0         20.0         19.0            3.00x            0.95x",
        "token agreement with off: 3 of 4 replies identical; auto copy at 2 ms parted at token 2",
        "",
        "decode tok/s against requests sent at once (at once: the most streaming at the same time; all decoding: "
        "while every request decoded; end to end: every token over the time from sending to the last token; late: "
        "one more request sent while the others decode, idle: the same request alone)",
        "rtt ms requests at once  aggregate  all decoding  end to end  per request  TTFT ms  TTFT max  agree  "
        "late TTFT ms  idle TTFT ms",
        "     0        1       1       40.0          40.0        35.0         40.0       50        50    1/1  "
        "           -             -",
        "     0        4       4      120.0             -           -         30.0       80       100    3/4  "
        "          90            40",
    ]
    assert speedups(rows) == [
        {"rtt_ms": 0, "prompts": "copy", "speculative": "auto", "over_off": 2.0},
        {"rtt_ms": 0, "prompts": "free", "speculative": "auto", "over_off": 0.95},
        {"rtt_ms": 2, "prompts": "copy", "speculative": "auto", "over_off": 3.0},
        {"rtt_ms": 2, "prompts": "free", "speculative": "auto", "over_off": 0.95}]
    svg = ET.fromstring(render_sweep_svg(report))
    labels = [t.text for t in svg.iter(f"{SVG}text")]
    legend = [label for label in labels if label and "," in label and "(" not in label]
    assert legend == ["copy, off", "copy, auto", "free, off", "free, auto", "0 ms, aggregate", "0 ms, per request"]
    assert len(svg.findall(f".//{SVG}polyline")) == 6


def test_sweep_flags_are_parsed_and_bad_ones_named() -> None:
    assert parse_rtt("0, 1,2,5") == (0.0, 1.0, 2.0, 5.0)
    assert parse_speculative("off,auto") == ("off", "auto")
    assert parse_concurrency("1,2,4,8") == (1, 2, 4, 8)
    for parse, flag, bad in ((parse_rtt, "--rtt", "1,x"), (parse_rtt, "--rtt", "-1"), (parse_rtt, "--rtt", "1,1"),
                             (parse_speculative, "--speculative", "on"), (parse_concurrency, "--concurrency", "0"),
                             (parse_concurrency, "--concurrency", "")):
        with pytest.raises(InventoryError, match=f"^{flag}: "):
            parse(bad)
    result = meshtui("bench", "--lab-hosts", "1", "--rtt", "1,fast")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "meshtui: error: --rtt: 'fast' is not valid (could not convert string to float: 'fast')"]
    result = meshtui("bench", "--lab-hosts", "1", "--rtt", "1", "--parallel", "0")
    assert result.stderr.strip().splitlines() == ["meshtui: error: --parallel: expected at least 1, not 0"]
    result = meshtui("bench", "--lab-hosts", "1", "--rtt", "1", "--tcp-stages", "lab1=127.0.0.1:9")
    assert result.returncode != 0
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("meshtui: error: tcp stage lab1 at 127.0.0.1:9 does not accept connections: "), line


def _inventory(tmp_path: Path, config: str, hosts: tuple[HostSpec, ...]) -> Inventory:
    path = tmp_path / "ssh_config"
    path.write_text(config)
    return Inventory("<test>", ModelSpec(path=None, name="smollm2"), HeadSpec(),
                     SSHSpec(known_hosts=tmp_path / "known_hosts", config_files=(path,)), hosts)


def test_relayed_hosts_keep_their_key_names_and_proxied_ones_are_refused(tmp_path: Path) -> None:
    inventory = _inventory(tmp_path, "Host box\n    HostName 198.51.100.12\n    Port 2222\n    User ann\n", (
        HostSpec("h1", "198.51.100.11", user="bob"), HostSpec("h2", "box")))
    targets = link_targets(inventory)
    assert [(t.host, t.address, t.port, t.key_name, t.user) for t in targets] == [
        ("h1", "198.51.100.11", 22, "198.51.100.11", "bob"), ("h2", "198.51.100.12", 2222, "[198.51.100.12]:2222",
                                                               "ann")]
    assert ssh_config_through(targets, [40001, 40002]) == (
        "Host meshtui-link-h1\n    HostName 127.0.0.1\n    Port 40001\n    HostKeyAlias 198.51.100.11\n    User bob\n"
        "\n"
        "Host meshtui-link-h2\n    HostName 127.0.0.1\n    Port 40002\n    HostKeyAlias [198.51.100.12]:2222\n"
        "    User ann\n")
    proxied = _inventory(tmp_path, "Host far\n    ProxyJump jump.example\n", (HostSpec("h3", "far"),))
    with pytest.raises(InventoryError, match="^h3: --rtt cannot put a slow link in front of a host reached through "
                                             "ProxyJump or ProxyCommand$"):
        link_targets(proxied)


def test_speculation_reports_are_summed_with_each_replys_own_steps() -> None:
    copied = ReplyTiming("a", 0.0, token_ids=list(range(30)), speculative={
        "mode": "auto", "drafted": 40, "accepted": 20, "verify_steps": 8, "tokens_per_step": 3.0})
    plain = ReplyTiming("b", 0.0, token_ids=list(range(10)), speculative={
        "mode": "auto", "drafted": 0, "accepted": 0, "verify_steps": 0, "tokens_per_step": 1.0})
    assert speculation_totals([copied, plain]) == {"drafted": 40, "accepted": 20, "verify_steps": 8, "acceptance": 0.5,
                                                   "tokens_per_step": 2.0}  # 40 tokens in 10 + 10 steps
    assert speculation_totals([ReplyTiming("c", 0.0, token_ids=[1, 2])]) is None


def test_all_decoding_counts_the_window_every_request_decoded_and_end_to_end_counts_from_sending() -> None:
    a = ReplyTiming("a", requested_at=0.0, token_ids=list(range(6)), token_times=[0.2, 1.2, 1.4, 1.6, 1.8, 2.0])
    b = ReplyTiming("b", requested_at=0.0, token_ids=list(range(4)), token_times=[1.0, 1.2, 1.4, 1.6])
    # b's prompt was read while a decoded: the window is 1.0 to 1.6, holding a's 1.2, 1.4, 1.6 and b's 1.2 to 1.6.
    assert all_decoding_rate([a, b]) == pytest.approx(6 / 0.6)
    assert end_to_end_rate([a, b]) == pytest.approx(10 / 2.0)
    assert all_decoding_rate([a, ReplyTiming("c", requested_at=0.0)]) is None  # one never answered
    assert all_decoding_rate([a, ReplyTiming("d", requested_at=0.0, token_ids=[1], token_times=[2.5])]) is None
