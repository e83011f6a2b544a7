"""Pushing weights before the load, on its own: the head's tensor hashes are computed once per file, the agent
writes only entries whose bytes have their hash, and a push cut midway keeps what arrived whole."""

from __future__ import annotations

import ctypes
import io
import os
import struct
from pathlib import Path

import pytest
from helpers import xxh64

from meshtui.pushweights import Offer, host_offers
from meshtui.runtime import agent_source_path, load_file_module
from meshtui.tensorhashes import head_hasher, tensor_hashes

agent = load_file_module(agent_source_path(), "meshtui_agent_push_test")



class CountingHash:
    """The content hash in Python, counting the regions it was asked to hash."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, address: int, length: int) -> int:
        self.calls += 1
        return xxh64(ctypes.string_at(address, length))


def test_the_heads_hash_is_the_patched_ggmls_content_hash_xxh64() -> None:
    hasher = head_hasher()
    assert hasher is not None and hasher.threshold == 64 * 1024
    assert (xxh64(b""), xxh64(b"abc")) == (0xEF46DB3751D8E999, 0x44BC2CF5AD770999)  # the specification's vectors
    for body in (b"", b"abc", bytes(range(256)) * 3, os.urandom(4099)):  # every tail: 8, 4 and 1-byte steps
        data = ctypes.create_string_buffer(body, max(len(body), 1))
        assert hasher.hash_fn(ctypes.addressof(data), len(body)) == xxh64(body)


def test_hashes_are_read_from_the_record_the_second_time_and_a_changed_file_is_hashed_again(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    data = os.urandom(8192)
    model.write_bytes(data)
    records = tmp_path / "records"
    regions = [(0, 4096), (4096, 2048), (6144, 2048)]
    counting = CountingHash()

    first = tensor_hashes(model, regions, counting, records)
    assert first.hashed == 3 and counting.calls == 3
    assert first.by_region == {(o, n): xxh64(data[o:o + n]) for o, n in regions}

    second = tensor_hashes(model, regions, counting, records)
    assert second == first.__class__(first.by_region, 0)
    assert counting.calls == 3  # read from the record: nothing hashed

    # A region not asked for before is hashed alone, and recorded with the others.
    more = tensor_hashes(model, [*regions, (0, 8192)], counting, records)
    assert more.hashed == 1 and more.by_region[(0, 8192)] == xxh64(data)
    assert tensor_hashes(model, [(0, 8192)], counting, records).hashed == 0

    # The same name with other bytes (a new mtime): every region is hashed again.
    changed = bytearray(data)
    changed[100] ^= 0xFF
    model.write_bytes(bytes(changed))
    stat = model.stat()
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    again = tensor_hashes(model, regions, counting, records)
    assert again.hashed == 3
    assert again.by_region[(0, 4096)] == xxh64(bytes(changed[:4096])) != first.by_region[(0, 4096)]
    assert len(list(records.iterdir())) == 1  # one record per file, no temporary left behind


def test_offers_are_the_hosts_tensors_from_the_threshold_each_content_once() -> None:
    hashes = {(0, 100): 7, (100, 5000): 8, (5100, 5000): 8, (10100, 6000): 9}
    offers = host_offers(hashes, [(10100, 6000), (100, 5000), (0, 100), (5100, 5000)], threshold=1000)
    assert offers == [Offer(8, 100, 5000), Offer(9, 10100, 6000)]


def pushed(entries: list[tuple[int, bytes]]) -> bytes:
    return b"".join(struct.pack("<QQ", digest, len(body)) + body for digest, body in entries)


def test_the_agent_stores_entries_whose_bytes_have_their_hash_and_keeps_them_when_the_push_is_cut(
        tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    good, bad, late = os.urandom(3000), os.urandom(2000), os.urandom(4000)
    (cache / f"{xxh64(late):016x}").write_bytes(late[:1000])  # cut short by an earlier write: not an entry
    offers = [[f"{xxh64(b):016x}", len(b)] for b in (good, bad, late)]
    missing = agent.missing_entries(str(cache), offers)
    assert missing == offers
    wanted = {name: size for name, size in missing}

    # The second entry's bytes are altered on the way; the stream is cut in the middle of the third.
    altered = bytes([bad[0] ^ 1]) + bad[1:]
    stream = pushed([(xxh64(good), good), (xxh64(bad), altered), (xxh64(late), late)])[:-1500]
    done = agent.store_pushed(CountingHash(), str(cache), io.BufferedReader(io.BytesIO(stream)), wanted)
    assert done == {"stored": 1, "stored_bytes": 3000, "rejected": 1}
    assert (cache / f"{xxh64(good):016x}").read_bytes() == good
    assert not (cache / f"{xxh64(bad):016x}").exists()
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]

    # Started again: only what did not arrive whole is asked for.
    assert agent.missing_entries(str(cache), offers) == offers[1:]


def test_the_agent_refuses_an_entry_it_did_not_ask_for(tmp_path: Path) -> None:
    body = os.urandom(100)
    stream = io.BufferedReader(io.BytesIO(pushed([(xxh64(body), body)])))
    with pytest.raises(ValueError, match="was not asked for"):
        agent.store_pushed(CountingHash(), str(tmp_path), stream, {})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overlap_limit", [None, 4000])
def test_entries_of_any_sizes_in_a_row_are_each_stored_whole_and_a_write_error_ends_the_push(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, overlap_limit: int | None) -> None:
    """The agent reads the next entry while it checks and writes the last one, in two buffers it reuses (entries
    over its limit one at a time, in one buffer): entries that grow and shrink in turn must each be written with
    exactly their own bytes."""
    if overlap_limit is not None:
        monkeypatch.setattr(agent, "OVERLAP_LIMIT", overlap_limit)
    bodies = [os.urandom(n) for n in (5000, 300, 9000, 9000, 1, 7000)]
    wanted = {f"{xxh64(b):016x}": len(b) for b in bodies}
    stream = pushed([(xxh64(b), b) for b in bodies])
    done = agent.store_pushed(CountingHash(), str(tmp_path), io.BufferedReader(io.BytesIO(stream)), wanted)
    assert done == {"stored": 6, "stored_bytes": sum(len(b) for b in bodies), "rejected": 0}
    assert all((tmp_path / f"{xxh64(b):016x}").read_bytes() == b for b in bodies)

    missing = tmp_path / "not-a-folder"
    with pytest.raises(FileNotFoundError):
        agent.store_pushed(CountingHash(), str(missing), io.BufferedReader(io.BytesIO(stream)), wanted)
    assert not missing.exists()


def test_the_agent_widens_the_pipe_it_reads_a_push_from_and_leaves_anything_else(tmp_path: Path) -> None:
    import fcntl

    get_size = getattr(fcntl, "F_GETPIPE_SZ", 1032)
    read_end, write_end = os.pipe()
    try:
        with os.fdopen(read_end, "rb") as stream:
            before = fcntl.fcntl(stream.fileno(), get_size)
            agent.widen_pipe(stream)
            assert (before, fcntl.fcntl(stream.fileno(), get_size)) == (65536, 1024 * 1024)
    finally:
        os.close(write_end)
    with (tmp_path / "file").open("wb+") as not_a_pipe:
        agent.widen_pipe(not_a_pipe)  # a file (or a socket) is left as it is, without an error
    agent.widen_pipe(io.BytesIO(b""))  # no descriptor at all


def test_a_writer_that_fails_in_any_way_ends_the_push_instead_of_hanging_it(tmp_path: Path) -> None:
    import threading

    def broken_hash(address: int, length: int) -> int:
        raise TypeError("not a hash")

    bodies = [os.urandom(100) for _ in range(5)]
    wanted = {f"{xxh64(b):016x}": len(b) for b in bodies}
    stream = io.BufferedReader(io.BytesIO(pushed([(xxh64(b), b) for b in bodies])))
    outcome: list[BaseException] = []

    def push() -> None:
        try:
            agent.store_pushed(broken_hash, str(tmp_path), stream, wanted)
        except BaseException as err:  # noqa: BLE001 (the test reads whatever ended it)
            outcome.append(err)

    thread = threading.Thread(target=push, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), "the push hung on a writer that had died"
    assert [type(e) for e in outcome] == [TypeError] and list(tmp_path.iterdir()) == []
