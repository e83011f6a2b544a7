"""The hosts' weights cache on its own: bounded, least recently used out; and how a load's progress reads."""

from __future__ import annotations

import os
from pathlib import Path

from helpers import xxh64

from meshtui.runtime import agent_source_path, load_file_module
from meshtui.units import load_done, load_transfer
from meshtui.weights import HostLoad, MeterCounts, load_progressed

agent = load_file_module(agent_source_path(), "meshtui_agent_cache_test")
KiB = 1024


def entry(folder: Path, name: str, size: int, used_at: float) -> Path:
    path = folder / name
    path.write_bytes(b"x" * size)
    os.utime(path, (used_at, used_at))
    return path


def test_trim_keeps_the_most_recently_used_entries_under_the_limit(tmp_path: Path) -> None:
    now = 1_000_000.0
    oldest = entry(tmp_path, "00000000000000a1", 40 * KiB, now - 300)
    middle = entry(tmp_path, "00000000000000b2", 40 * KiB, now - 200)
    newest = entry(tmp_path, "00000000000000c3", 40 * KiB, now - 100)
    kept, removed = agent.trim_cache(str(tmp_path), 100 * KiB, now=now)
    assert (kept, removed) == (80 * KiB, 40 * KiB)
    assert not oldest.exists() and middle.exists() and newest.exists()


def test_trim_leaves_other_files_alone_and_removes_only_stale_unfinished_writes(tmp_path: Path) -> None:
    now = 1_000_000.0
    notes = entry(tmp_path, "README", 500 * KiB, now - 10_000)  # not an entry's name: never touched
    upper = entry(tmp_path, "00000000000000A1", 500 * KiB, now - 10_000)  # ggml writes lower-case hex only
    stale = entry(tmp_path, "00000000000000d4.tmp-1-0", 10, now - agent.CACHE_TEMP_AGE - 1)
    writing = entry(tmp_path, "00000000000000d5.tmp-1-1", 10, now - 1)  # a write under way: kept
    (tmp_path / "0000000000000sub").mkdir()
    assert agent.trim_cache(str(tmp_path), 0, now=now) == (0, 0)
    assert notes.exists() and upper.exists() and writing.exists() and not stale.exists()


def test_trim_of_a_full_cache_empties_it_when_the_limit_is_zero(tmp_path: Path) -> None:
    for i in range(5):
        entry(tmp_path, f"{i:016x}", KiB, 1000.0 + i)
    assert agent.trim_cache(str(tmp_path), 0, now=2000.0) == (0, 5 * KiB)
    assert list(tmp_path.iterdir()) == []


def test_a_warm_load_reads_as_weights_in_place_with_little_sent() -> None:
    counts = MeterCounts(bytes_up=200 * KiB, weights_sent=150 * KiB, weights_cached=40 * 1024 * KiB,
                         hash_offers=270, hash_hits=268)
    load = HostLoad("h1", 2.0, counts, planned_bytes=80 * 1024 * KiB)
    assert load.placed_bytes == 150 * KiB + 40 * 1024 * KiB
    assert load.rate == 100 * KiB
    assert load.eta_seconds is not None and abs(load.eta_seconds - 2.0 * (80 * 1024 - 40 * 1024 - 150) /
                                                (40 * 1024 + 150)) < 1e-9
    event = load_progressed(load)
    assert (event.host, event.phase, event.done_bytes, event.total_bytes) == ("h1", "load", load.placed_bytes,
                                                                              80 * 1024 * KiB)
    text = load_transfer(event.done_bytes, event.total_bytes, event.sent_bytes, event.rate, event.eta_seconds)
    assert text == "40.1 MiB / 80.0 MiB 50% · 100 KiB/s · 2s left · 200 KiB sent"
    assert load_done(load.placed_bytes, load.sent_bytes) == "40.1 MiB (200 KiB sent)"
    assert load_done(load.placed_bytes, load.placed_bytes + 1) == "40.1 MiB"
    assert load.to_json() == {"seconds": 2.0, "bytes_sent": 200 * KiB, "weights_sent": 150 * KiB,
                              "bytes_pushed": 0, "weights_pushed": 0, "tensors_pushed": 0, "push_seconds": 0.0,
                              "weights_cached": 40 * 1024 * KiB, "tensors_offered": 270, "tensors_cached": 268,
                              "weights_repacked": None}


def test_progress_before_anything_arrived_has_no_rate_or_eta() -> None:
    load = HostLoad("h1", 0.0, MeterCounts(), planned_bytes=1000)
    assert (load.rate, load.eta_seconds, load.placed_bytes) == (None, None, 0)
    assert MeterCounts(10, 5, 3, 2, 1).since(MeterCounts(4, 1, 1, 1, 0)) == MeterCounts(6, 4, 2, 1, 1)



def test_seeding_names_each_region_by_the_hash_of_its_own_bytes(tmp_path: Path) -> None:
    import ctypes

    model = tmp_path / "model.gguf"
    model.write_bytes(bytes(range(256)) * 40)  # 10240 bytes
    cache = tmp_path / "cache"
    cache.mkdir()

    def hash_bytes(address: int, length: int) -> int:
        return xxh64(ctypes.string_at(address, length))

    regions = [[0, 2048], [2048, 1024], [100, 10], [10000, 1000]]  # too small; past the end of the file
    answer = agent.seed_cache(hash_bytes, str(cache), 1024, {"model": str(model), "regions": regions})
    assert answer == {"seeded": 2, "seeded_bytes": 3072, "present": 0, "present_bytes": 0, "skipped": 2}
    data = model.read_bytes()
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == {
        f"{xxh64(data[:2048]):016x}": data[:2048], f"{xxh64(data[2048:3072]):016x}": data[2048:3072]}
    again = agent.seed_cache(hash_bytes, str(cache), 1024, {"model": str(model), "regions": regions[:2]})
    assert again == {"seeded": 0, "seeded_bytes": 0, "present": 2, "present_bytes": 3072, "skipped": 0}


def test_tensor_regions_are_the_layers_tensors_in_the_file() -> None:
    from helpers import SMOLLM2

    from meshtui.gguf_facts import read_model_facts, tensor_regions

    facts = read_model_facts(SMOLLM2)
    blocks = tensor_regions(facts, [3, 4])
    assert sum(size for _, size in blocks) == facts.layer_weight_bytes[3] + facts.layer_weight_bytes[4]
    output = tensor_regions(facts, [facts.n_layer])
    assert sum(size for _, size in output) == facts.output_bytes  # tied: token_embd read again, and the norm
    assert all(offset + size <= facts.file_size for offset, size in blocks + output)
