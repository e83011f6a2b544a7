"""Weights cross once, on real OpenSSH hosts: a second load sends almost nothing, a damaged cache entry is never
used (its tensor is sent again), and a host whose cache is full evicts the least recently used and still loads.
Every load's greedy reply equals the single-process reference."""

from __future__ import annotations

import asyncio
import functools
import os
import time
from pathlib import Path

import pytest
from helpers import SMOLLM2
from reference import reference_greedy

from meshtui.errors import MeshError
from meshtui.gguf_facts import ModelFacts, read_model_facts, tensor_regions
from meshtui.inventory import load_inventory
from meshtui.mesh import Mesh
from meshtui.runtime import agent_source_path, load_file_module
from meshtui.weights import HostLoad

PROMPT = "The three primary colors are"
MAX_TOKENS = 24
MiB = 1024 * 1024

pytestmark = [pytest.mark.lab, pytest.mark.slow]
agent = load_file_module(agent_source_path(), "meshtui_agent_cache_lab")


def cache_of(lab, name: str) -> Path:
    return lab.host(name).home / ".cache/meshtui/rpc-cache"


def entries(folder: Path) -> dict[str, int]:
    if not folder.is_dir():
        return {}
    return {p.name: p.stat().st_size for p in folder.iterdir() if agent.is_cache_entry(p.name)}


def empty_caches(lab) -> None:
    for host in lab.hosts:
        for path in entries(cache_of(lab, host.name)):
            (cache_of(lab, host.name) / path).unlink()


async def up_and_reply(inventory_file: Path) -> tuple[dict[str, HostLoad], list[int], str]:
    loads, tokens, text, _ = await up_and_reply_placed(inventory_file)
    return loads, tokens, text


async def up_and_reply_placed(inventory_file: Path) -> tuple[dict[str, HostLoad], list[int], str,
                                                              dict[str, list[int]]]:
    mesh = Mesh(load_inventory(inventory_file))
    try:
        await mesh.up()
        reply = await mesh.generate(prompt=PROMPT, raw=True, max_tokens=MAX_TOKENS, temperature=0.0)
        return dict(mesh.host_loads), list(reply.token_ids), reply.text, dict(mesh.placement)
    finally:
        await mesh.close()


@functools.cache
def smollm2_facts() -> ModelFacts:
    return read_model_facts(SMOLLM2)


def small_tensor_bytes(layers: list[int]) -> int:
    """Bytes of the tensors of these layers under ggml's hash threshold: they are always sent (norms)."""
    return sum(size for _, size in tensor_regions(smollm2_facts(), layers) if size < 64 * 1024)


@pytest.fixture(scope="module")
def expected() -> dict[str, object]:
    return reference_greedy(SMOLLM2, PROMPT, MAX_TOKENS, context=512)


async def test_second_load_sends_under_one_percent_and_damaged_entries_are_sent_again(
        lab, tmp_path: Path, expected: dict[str, object]) -> None:
    inventory_file = tmp_path / "inventory.toml"
    inventory_file.write_text(lab.inventory_toml('name = "smollm2"'))
    empty_caches(lab)

    cold, tokens, text, cold_placement = await up_and_reply_placed(inventory_file)
    assert (tokens, text) == (expected["tokens"], expected["text"])
    assert set(cold) == {"h1", "h2"}
    for name, load in cold.items():
        # The push before the load sent every tensor of the host's share from 64 KiB; the engine's load then
        # found each one in the host's cache and sent only the small ones.
        assert load.push.tensors_pushed > 10 and load.push.tensors_present == 0, (name, load)
        assert load.counts.hash_hits == load.counts.hash_offers == load.push.tensors_pushed, (name, load)
        assert load.counts.weights_cached == load.push.weights_pushed
        assert load.counts.weights_sent == small_tensor_bytes(cold_placement[name])
        # Every tensor pushed is now an entry of exactly its size on the host.
        assert sum(entries(cache_of(lab, name)).values()) == load.push.weights_pushed

    warm, tokens, text = await up_and_reply(inventory_file)
    assert (tokens, text) == (expected["tokens"], expected["text"])
    for name, load in warm.items():
        weights = load.placed_bytes
        assert weights == cold[name].placed_bytes
        assert load.push.tensors_pushed == 0 and load.push.tensors_present == cold[name].push.tensors_pushed
        assert load.counts.hash_hits == load.counts.hash_offers == cold[name].counts.hash_offers
        assert load.sent_bytes < 0.01 * weights, (name, load.sent_bytes, weights)
        print(f"{name}: warm load sent {load.sent_bytes} of {weights} weight bytes "
              f"({100 * load.sent_bytes / weights:.2f}%); cold sent {cold[name].sent_bytes}")

    # Damage one entry on each host: h1's altered in place (same size), h2's cut short.
    altered_name, altered_size = min(entries(cache_of(lab, "h1")).items(), key=lambda kv: kv[1])
    altered = cache_of(lab, "h1") / altered_name
    original = altered.read_bytes()
    with altered.open("r+b") as f:
        f.seek(len(original) // 2)
        f.write(bytes([original[len(original) // 2] ^ 0xFF]))
    cut_name, cut_size = min(entries(cache_of(lab, "h2")).items(), key=lambda kv: kv[1])
    cut = cache_of(lab, "h2") / cut_name
    cut_original = cut.read_bytes()
    os.truncate(cut, cut_size // 2)

    repaired, tokens, text = await up_and_reply(inventory_file)
    assert (tokens, text) == (expected["tokens"], expected["text"])
    # Exactly the damaged tensor was sent again (with the small tensors every load sends), and its entry holds
    # the right bytes once more. The one cut short has the wrong size: the push sees it missing and sends it. The
    # one altered in place looks whole to the push; the host's check of its hash when the load uses it finds it
    # wrong, removes it, and the load sends it through the tunnel.
    assert repaired["h1"].push.tensors_pushed == 0
    assert repaired["h1"].counts.weights_sent == warm["h1"].counts.weights_sent + altered_size
    assert repaired["h1"].counts.hash_hits == repaired["h1"].counts.hash_offers - 1
    assert repaired["h2"].push.tensors_pushed == 1 and repaired["h2"].push.weights_pushed == cut_size
    assert repaired["h2"].counts.weights_sent == warm["h2"].counts.weights_sent
    assert repaired["h2"].counts.hash_hits == repaired["h2"].counts.hash_offers
    assert altered.read_bytes() == original
    assert cut.read_bytes() == cut_original


async def wait_for(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.2)
    return condition()


async def test_a_full_cache_evicts_the_least_recently_used_and_still_loads(
        lab, tmp_path: Path, expected: dict[str, object]) -> None:
    h1 = lab.host("h1")
    limit = 24 * MiB
    inventory_file = tmp_path / "inventory.toml"
    inventory_file.write_text(lab.inventory_toml('name = "smollm2"', {"h1": {"cache_limit": limit}}))
    empty_caches(lab)
    # h1's cache is full of another model's tensors, last used long ago.
    folder = user_folder(lab, "h1", cache_of(lab, "h1"))
    owner = folder.stat()
    old = [folder / f"{0xfeed0000 + i:016x}" for i in range(8)]
    for i, path in enumerate(old):
        path.write_bytes(os.urandom(4 * MiB))
        os.chown(path, owner.st_uid, owner.st_gid)
        os.utime(path, (time.time() - 86400 + i, time.time() - 86400 + i))

    cold, tokens, text = await up_and_reply(inventory_file)
    assert (tokens, text) == (expected["tokens"], expected["text"])
    share = cold["h1"].placed_bytes
    assert 0 < share < limit  # the model's share fits; the old tensors must make room for it
    # The agent trims while it serves: under the limit, the oldest of the old gone first, this load's all kept.
    assert await wait_for(lambda: sum(entries(folder).values()) <= limit)
    left = entries(folder)
    survivors = [p for p in old if p.name in left]
    assert survivors == old[len(old) - len(survivors):]  # least recently used out first
    assert len(survivors) < len(old)

    warm, tokens, text = await up_and_reply(inventory_file)
    assert (tokens, text) == (expected["tokens"], expected["text"])
    assert warm["h1"].sent_bytes < 0.01 * warm["h1"].placed_bytes, h1.name


def user_folder(lab, host_name: str, folder: Path) -> Path:
    """`folder` in a host's home, made where missing as its user's own (the test runs as root; the agent does not,
    and must still write beside it: a fresh lab has no ~/.cache yet)."""
    import pwd

    host = lab.host(host_name)
    user = pwd.getpwnam(host.user)
    path = host.home
    for part in folder.relative_to(host.home).parts:
        path = path / part
        if not path.is_dir():
            path.mkdir()
            os.chown(path, user.pw_uid, user.pw_gid)
    return folder


def give_file(lab, host_name: str, source: Path, relative: str) -> Path:
    """Copy `source` into a host's home as its user's own file."""
    import pwd
    import shutil

    host = lab.host(host_name)
    user = pwd.getpwnam(host.user)
    target = user_folder(lab, host_name, (host.home / relative).parent) / Path(relative).name
    shutil.copyfile(source, target)
    os.chown(target, user.pw_uid, user.pw_gid)
    return target


async def test_hosts_with_their_own_copy_load_from_it_checked_by_content_not_name(
        lab, tmp_path: Path, expected: dict[str, object]) -> None:
    empty_caches(lab)
    give_file(lab, "h1", SMOLLM2, "models/smollm2.gguf")
    # h2's copy has the same name but one tensor of the last block differs: only that tensor may be sent.
    damaged = give_file(lab, "h2", SMOLLM2, "models/smollm2.gguf")
    facts = smollm2_facts()
    n_layer = facts.n_layer
    offset, size = min((r for r in tensor_regions(facts, [n_layer - 1]) if r[1] >= 64 * 1024),
                       key=lambda r: r[1])
    with damaged.open("r+b") as f:
        f.seek(offset + size // 2)
        byte = f.read(1)
        f.seek(offset + size // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    inventory_file = tmp_path / "inventory.toml"
    inventory_file.write_text(lab.inventory_toml('name = "smollm2"', {
        "h1": {"model_path": "~/models/smollm2.gguf"}, "h2": {"model_path": "~/models/smollm2.gguf"}}))

    loads, tokens, text, placement = await up_and_reply_placed(inventory_file)
    assert (tokens, text) == (expected["tokens"], expected["text"])
    h1, h2 = loads["h1"], loads["h2"]
    assert n_layer - 1 in placement["h2"]
    assert h1.counts.hash_hits == h1.counts.hash_offers > 10
    assert h1.counts.weights_sent == small_tensor_bytes(placement["h1"])
    assert h1.sent_bytes < 0.01 * h1.placed_bytes
    assert h1.push.tensors_pushed == 0
    # The one tensor that differs, and nothing else (besides the small tensors every load sends): the push finds
    # every other tensor in h2's cache (seeded from its file) and sends that one.
    assert h2.push.tensors_pushed == 1 and h2.push.weights_pushed == size
    assert h2.counts.hash_hits == h2.counts.hash_offers
    assert h2.counts.weights_sent == small_tensor_bytes(placement["h2"])


async def test_a_load_cut_midway_resumes_without_sending_again_what_arrived(
        lab_factory, tmp_path: Path, expected: dict[str, object]) -> None:
    from meshtui import events as ev

    lab = lab_factory(1)
    lab.cap_bandwidth("h1", "40mbit")  # about 5 MB/s: h1's share takes seconds to push, time to cut it midway
    inventory_file = tmp_path / "inventory.toml"
    inventory_file.write_text(lab.inventory_toml('name = "smollm2"'))
    mesh = Mesh(load_inventory(inventory_file))
    cut_at: list[int] = []

    def drop_the_link_midway(event: ev.Event) -> None:
        if (isinstance(event, ev.TransferProgressed) and event.phase == "load" and not cut_at
                and event.total_bytes and event.done_bytes > event.total_bytes // 3):
            cut_at.append(event.done_bytes)
            conn = mesh.stages["h1"].conn
            assert conn is not None
            conn.close()  # h1's SSH connection drops in the middle of its push

    mesh.listener = drop_the_link_midway
    try:
        with pytest.raises(MeshError):
            await mesh.up()
    finally:
        await mesh.close()
    assert cut_at, "the push ended before it could be cut"
    arrived = entries(cache_of(lab, "h1"))
    facts = smollm2_facts()

    loads, tokens, text, placement = await up_and_reply_placed(inventory_file)
    assert (tokens, text) == (expected["tokens"], expected["text"])
    h1 = loads["h1"]
    share = {size for _, size in tensor_regions(facts, placement["h1"]) if size >= 64 * 1024}
    share_bytes = sum(size for _, size in tensor_regions(facts, placement["h1"]) if size >= 64 * 1024)
    assert share and 0 < sum(arrived.values()) < share_bytes  # cut midway: some tensors whole on the host, not all
    # What had arrived is found and not sent again; exactly the rest is pushed; the load finds everything cached.
    assert h1.push.tensors_present == len(arrived) and h1.push.weights_present == sum(arrived.values())
    assert h1.push.weights_pushed == share_bytes - sum(arrived.values())
    assert h1.counts.hash_hits == h1.counts.hash_offers
    assert h1.counts.weights_sent == small_tensor_bytes(placement["h1"])
