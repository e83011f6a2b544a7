"""Before the engine loads, push each host the weight tensors its cache lacks: all hosts at once, one stream each.

llama.cpp loads tensors in file order, one host after the other, and offers each by hash and waits for the
answer before it sends the bytes; a cold load through it moved weights at about half of OpenSSH's rate. The
head knows the plan, so it knows each host's tensors: it asks each host's agent which it holds (`meshtui_agent.py
put`, one exec channel in the host's SSH connection) and streams the others back to back; the agent checks each
entry's hash and writes it atomically. The engine's load then finds every tensor cached. A push cut midway keeps
what arrived whole, so a load started again sends only the rest.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import shlex
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import asyncssh

from meshtui.agentproc import Agent
from meshtui.errors import HostError
from meshtui.text import one_line
from meshtui.weights import PushCounts

CHUNK = 4 * 1024 * 1024  # bytes handed to the channel at a time (it splits them into SSH packets)
HEADER = struct.Struct("<QQ")  # an entry's content hash and size, as the agent reads them
ANSWER_TIMEOUT = 60.0  # seconds for the agent to start and say which tensors it lacks


@dataclass(frozen=True)
class Offer:
    """One tensor a host needs: its content hash and where its bytes lie in the model file."""

    hash: int
    offset: int
    size: int


@dataclass
class PushMeter:
    """One host's push as it goes (the load's progress reads it); only the push writes it."""

    offered: int = 0
    offered_bytes: int = 0
    present: int = 0
    present_bytes: int = 0  # weights the host held already
    pushed: int = 0
    pushed_bytes: int = 0  # weights written into the channel
    bytes_sent: int = 0  # everything written into the channel (offers, headers, weights)
    stored: int = 0  # entries the agent wrote (their hash checked)
    rejected: int = 0  # entries whose bytes did not have their hash (never written)
    seconds: float = 0.0

    def counts(self) -> PushCounts:
        return PushCounts(self.bytes_sent, self.pushed_bytes, self.pushed, self.present_bytes, self.present,
                          self.rejected, self.seconds)


def host_offers(hashes: Mapping[tuple[int, int], int], regions: Sequence[tuple[int, int]],
                threshold: int) -> list[Offer]:
    """The tensors of these regions that the host's cache would hold (from `threshold` bytes), each hash once,
    in file order."""
    offers: dict[int, Offer] = {}
    for offset, size in sorted(regions):
        if size >= threshold and (offset, size) in hashes:
            offers.setdefault(hashes[(offset, size)], Offer(hashes[(offset, size)], offset, size))
    return list(offers.values())


def put_command(agent: Agent) -> str:
    return (f"{shlex.quote(agent.host.python)} {agent.runtime_dir}/meshtui_agent.py put "
            f"--runtime {agent.runtime_dir} --cache {shlex.quote(agent.cache_dir or '')}")


async def push_weights(conn: asyncssh.SSHClientConnection, agent: Agent, model_path: Path,
                       offers: Sequence[Offer], meter: PushMeter) -> PushMeter:
    """Stream the host the offered tensors its cache lacks; `meter` counts as it goes and is returned."""
    name = agent.host.name
    started = time.perf_counter()
    meter.offered, meter.offered_bytes = len(offers), sum(o.size for o in offers)
    try:
        process = await conn.create_process(put_command(agent), encoding=None)
    except (OSError, asyncssh.Error) as err:
        raise HostError(f"cannot start pushing weights: {one_line(err)}", host=name) from err
    try:
        request = json.dumps({"offers": [[f"{o.hash:016x}", o.size] for o in offers]}).encode() + b"\n"
        process.stdin.write(request)
        meter.bytes_sent += len(request)
        answer = await _answer(process, name, "missing")
        missing = _missing(answer, offers, name)
        meter.present = len(offers) - len(missing)
        meter.present_bytes = meter.offered_bytes - sum(o.size for o in missing)
        await _stream(process, model_path, missing, meter)
        process.stdin.write_eof()
        done = await _answer(process, name, "stored")
        meter.stored, meter.rejected = int(done.get("stored", 0)), int(done.get("rejected", 0))
    except (OSError, asyncssh.Error) as err:
        raise HostError(f"pushing weights failed: {one_line(err)}", host=name) from err
    finally:
        process.close()
        meter.seconds = time.perf_counter() - started
    return meter


async def _answer(process: asyncssh.SSHClientProcess[bytes], host: str, event: str) -> dict[str, Any]:
    try:
        line = await asyncio.wait_for(process.stdout.readline(), ANSWER_TIMEOUT)
    except asyncio.TimeoutError as err:
        raise HostError(f"the agent did not answer the weights push within {ANSWER_TIMEOUT:.0f}s",
                        host=host) from err
    try:
        msg = json.loads(line)
    except ValueError:
        msg = None
    if not isinstance(msg, dict) or msg.get("event") != event:
        detail = msg.get("reason") if isinstance(msg, dict) else line.decode(errors="replace") or "no answer"
        raise HostError(f"the agent refused the weights push: {one_line(detail)}", host=host)
    return msg


def _missing(answer: Mapping[str, Any], offers: Sequence[Offer], host: str) -> list[Offer]:
    by_name = {(f"{o.hash:016x}", o.size): o for o in offers}
    entries = answer.get("entries")
    if not isinstance(entries, list):
        raise HostError("the agent's answer to the weights push lacks its entries", host=host)
    missing = []
    for entry in entries:
        offer = by_name.get(tuple(entry)) if isinstance(entry, list) and len(entry) == 2 else None
        if offer is None:
            raise HostError(f"the agent asked for a tensor it was not offered: {one_line(repr(entry))}", host=host)
        missing.append(offer)
    return missing


async def _stream(process: asyncssh.SSHClientProcess[bytes], model_path: Path, missing: Sequence[Offer],
                  meter: PushMeter) -> None:
    if not missing:
        return
    with model_path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped, \
            memoryview(mapped) as view:
        for offer in missing:
            header = HEADER.pack(offer.hash, offer.size)
            process.stdin.write(header)
            meter.bytes_sent += len(header)
            for start in range(offer.offset, offer.offset + offer.size, CHUNK):
                end = min(start + CHUNK, offer.offset + offer.size)
                # A view, not a slice of the map: asyncssh copies what it is given once, a slice is one more copy.
                process.stdin.write(cast(bytes, view[start:end]))
                await process.stdin.drain()
                meter.bytes_sent += end - start
                meter.pushed_bytes += end - start
            meter.pushed += 1


async def push_all(pushes: Mapping[str, tuple[asyncssh.SSHClientConnection, Agent, Sequence[Offer]]],
                   model_path: Path, meters: Mapping[str, PushMeter],
                   log: Callable[[str, str, str], None]) -> None:
    """Push every host its missing tensors at once. A host whose push fails is logged and left to the load,
    which sends it whatever its cache still lacks."""

    async def one(name: str, conn: asyncssh.SSHClientConnection, agent: Agent, offers: Sequence[Offer]) -> None:
        try:
            await push_weights(conn, agent, model_path, offers, meters[name])
        except HostError as err:
            log(name, f"{err.reason}; the load sends what its cache lacks", "warning")

    await asyncio.gather(*(one(name, *item) for name, item in pushes.items()))
