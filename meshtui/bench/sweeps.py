"""The bench's sweeps: decode speed against round-trip time, with and without speculation, and against the
number of requests in flight.

One run, one set of meshes: every host is reached through a slow-link relay (`meshtui/slowlink.py`, one process)
whose round trip is changed between measurements while the meshes stay up, so the ratios compare like with like.
"0 ms" is the relay with no delay added. Each speculation mode is a `Mesh` brought up as `meshtui up` does; the
modes take prompts in turns. Concurrency sends N requests at once through the reply queue the API and the chat
pane share (`meshtui/replies.py`): where the mesh serves one reply at a time they are served one after another,
and `max_in_flight` says so.
"""

from __future__ import annotations

import asyncio
import inspect
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshtui import events as ev
from meshtui.bench.compare import bench_header, can_hold, check_counts, check_tcp_stages
from meshtui.bench.links import slow_links
from meshtui.bench.modes import WARMUP_TOKENS, BenchContext, MeshMode, TcpMode
from meshtui.bench.prompts import COPY_PROMPTS, FREE_PROMPTS, PROMPT_SETS
from meshtui.bench.rates import (
    all_decoding_rate,
    decode_rate,
    end_to_end_rate,
    speculation_totals,
    speedups,
    tokens_per_round_trip,
)
from meshtui.bench.tcpstats import check_reachable
from meshtui.bench.timing import ReplyTiming, timed_reply, token_agreement, warm_page_cache
from meshtui.errors import InventoryError
from meshtui.gguf_facts import read_model_facts
from meshtui.inventory import Inventory
from meshtui.mesh import Mesh
from meshtui.models import resolve_model_path
from meshtui.placement import engine_split
from meshtui.replies import ReplyQueue
from meshtui.slowlink import LinkProcess, parse_target

PING_ROUNDS = 5
FORGET_PROMPT = "Hi"


@dataclass(frozen=True)
class SweepOptions:
    rtt_ms: tuple[float, ...] = (0.0,)
    speculative: tuple[str, ...] = ("off",)
    concurrency: tuple[int, ...] = ()
    prompts: int = 3  # of each set
    max_tokens: int = 64
    tcp_stages: Mapping[str, str] = field(default_factory=dict)  # node name -> "host:port", relayed too
    parallel: int | None = None  # Mesh(parallel=N); None: the most requests sent at once, else up's default


def speculation_support() -> str | None:
    """Where this build's mesh takes a speculation mode: "stream" (per reply), "mesh" (per mesh), or None."""
    if "speculative" in inspect.signature(Mesh.stream).parameters:
        return "stream"
    if "speculative" in inspect.signature(Mesh).parameters:
        return "mesh"
    return None


@dataclass
class SweepMode:
    """One speculation mode, on its own mesh or sharing one (when the mode goes with each reply)."""

    mesh: MeshMode
    speculative: str
    per_reply: dict[str, Any]
    path = "ssh"

    @property
    def key(self) -> str:
        return self.speculative

    async def chat(self, prompt: str, max_tokens: int) -> ReplyTiming:
        stream = self.mesh.mesh.stream(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                       temperature=0.0, seed=0, **self.per_reply)
        timing = await timed_reply(stream, prompt)
        meters = [t.meter for t in self.mesh.tunnels().values()]  # the mesh counts each reply's from its start
        timing.round_trips = max((m.rounds_since_reset for m in meters), default=None)
        return timing

    async def pings(self) -> dict[str, float | None]:
        """Each stage's round trip now: the least of a few pings through its agent's channel (the relay's path)."""
        measured: dict[str, float | None] = {}
        for name, stage in self.mesh.mesh.stages.items():
            agent = stage.agent
            if agent is None or not agent.alive:
                measured[name] = None
                continue
            times = [await agent.ping() for _ in range(PING_ROUNDS)]
            measured[name] = 1000.0 * min(times)
        return measured


class TcpSweepMode:
    """The "off" mesh's plan on plain TCP stage servers behind the same relays: llama.cpp's manual setup."""

    path = "tcp"
    key = "tcp"
    speculative = "off"

    def __init__(self, tcp: TcpMode) -> None:
        self.tcp = tcp

    async def chat(self, prompt: str, max_tokens: int) -> ReplyTiming:
        return await self.tcp.chat(prompt, max_tokens)

    async def pings(self) -> dict[str, float | None]:
        return {}  # no agent behind a plain TCP stage to ask


SweepTarget = SweepMode | TcpSweepMode


def parallel_option(options: SweepOptions) -> dict[str, int]:
    """`Mesh(parallel=N)`: as given, else the most requests the sweep sends at once (else up's default)."""
    if options.parallel is not None:
        return {"parallel": options.parallel}
    return {"parallel": max(options.concurrency)} if options.concurrency else {}


def sweep_modes(ctx: BenchContext, inventory: Inventory, wanted: Sequence[str], support: str | None,
                options: dict[str, Any]) -> list[SweepMode]:
    """A mesh per mode when the mesh takes the mode at start; one mesh for all when it takes it per reply."""
    if support == "mesh":
        return [SweepMode(MeshMode(ctx, f"ssh/{m}", inventory, speculative=m, **options), m, {}) for m in wanted]
    shared = MeshMode(ctx, "ssh", inventory, **options)
    return [SweepMode(shared, m, {"speculative": m} if support == "stream" else {}) for m in wanted]


async def _rtt_sweep(modes: Sequence[SweepTarget], links: LinkProcess, options: SweepOptions,
                     ctx: BenchContext) -> list[dict[str, Any]]:
    for mode in modes:  # one chat reply each, untimed: the chat template's first prefill stays out
        await mode.chat(COPY_PROMPTS[0], WARMUP_TOKENS)
    rows: list[dict[str, Any]] = []
    for rtt in options.rtt_ms:
        links.set_rtt(rtt)
        pings = {mode.key: await mode.pings() for mode in modes}
        for set_name, prompts in PROMPT_SETS.items():
            replies: dict[str, list[ReplyTiming]] = {mode.key: [] for mode in modes}
            for i, prompt in enumerate(prompts[:options.prompts]):
                for k in range(len(modes)):  # the order rotates from prompt to prompt
                    mode = modes[(i + k) % len(modes)]
                    replies[mode.key].append(await mode.chat(prompt, options.max_tokens))
            reference = replies.get("off")
            for mode in modes:
                got = replies[mode.key]
                row: dict[str, Any] = {
                    "rtt_ms": rtt, "prompts": set_name, "path": mode.path, "speculative": mode.speculative,
                    "stage_ping_ms": pings[mode.key],
                    "decode_tokens_per_second": decode_rate(got),
                    "ttft_seconds": statistics.fmean(r.ttft for r in got if r.ttft is not None)
                    if any(r.ttft is not None for r in got) else None,
                    "generated_tokens": sum(len(r.token_ids) for r in got),
                    "speculation": speculation_totals(got),
                    "tokens_per_round_trip": tokens_per_round_trip(got),
                    "replies": [r.to_json() for r in got],
                }
                if reference is not None and mode.key != "off":
                    row["agreement_with_off"] = [token_agreement(a.token_ids, b.token_ids)
                                                 for a, b in zip(reference, got, strict=True)]
                rows.append(row)
                ctx.progress(f"rtt {rtt:g} ms, {set_name} prompts, {mode.path} speculative {mode.speculative}: "
                             f"{row['decode_tokens_per_second'] or 0:.1f} tok/s")
    return rows


async def _concurrent(queue: ReplyQueue, prompts: Sequence[str], max_tokens: int, params: dict[str, Any],
                      late: str | None = None) -> tuple[list[ReplyTiming], int]:
    """Send every prompt at once (and `late` once the others decode); the replies, and the most that were
    streaming tokens at the same time.

    `late` is sent when every other request has a token, or as soon as one of them has finished (where the
    mesh serves one reply at a time, the others never decode together).
    """
    streaming = 0
    most = 0
    decoding = asyncio.Event()

    async def one(index: int, prompt: str) -> ReplyTiming:
        nonlocal streaming, most
        timing = ReplyTiming(prompt, time.perf_counter())
        async for event in queue.stream(source=f"bench-{index}", messages=[{"role": "user", "content": prompt}],
                                        max_tokens=max_tokens, temperature=0.0, seed=0, **params):
            had_tokens = bool(timing.token_ids)
            timing.fold(event, time.perf_counter())
            if timing.token_ids and not had_tokens:
                streaming += 1
                most = max(most, streaming)
                if streaming >= len(prompts):
                    decoding.set()
            if isinstance(event, ev.ReplyFinished):
                decoding.set()
                if timing.token_ids:
                    streaming -= 1
        return timing

    async def arriving(prompt: str) -> ReplyTiming:
        await decoding.wait()
        return await one(len(prompts), prompt)

    tasks = [one(i, p) for i, p in enumerate(prompts)] + ([arriving(late)] if late is not None else [])
    replies = await asyncio.gather(*tasks)
    return list(replies), most


async def _forget(mode: SweepMode) -> None:
    """A short unrelated reply, so the next prompt finds no prefix of its own in the KV cache (llama.cpp reuses the
    previous reply's): times to first token then compare like with like."""
    await mode.chat(FORGET_PROMPT, 2)


async def _concurrency_sweep(mode: SweepMode, links: LinkProcess, options: SweepOptions,
                             ctx: BenchContext) -> list[dict[str, Any]]:
    pool = [*FREE_PROMPTS, *COPY_PROMPTS]
    prompts = [pool[i % len(pool)] + ("" if i < len(pool) else f" (request {i + 1})")
               for i in range(max(options.concurrency))]
    queue = ReplyQueue(mode.mesh.mesh, slots=mode.mesh.mesh.parallel)  # as many in flight as the mesh decodes
    alone: dict[str, list[int]] = {}
    rows: list[dict[str, Any]] = []
    for rtt in options.rtt_ms:
        links.set_rtt(rtt)
        for count in options.concurrency:
            batch = prompts[:count]
            for prompt in batch:  # each request alone first: what a batched reply is compared with
                if prompt not in alone:
                    alone[prompt] = (await mode.chat(prompt, options.max_tokens)).token_ids
            await _forget(mode)
            started = time.perf_counter()
            replies, most = await _concurrent(queue, batch, options.max_tokens, mode.per_reply)
            late = None
            if count > 1:  # one more request arriving while count - 1 others decode, against an idle mesh
                await _forget(mode)
                idle = (await mode.chat(batch[-1], options.max_tokens)).ttft
                arrived = (await _concurrent(queue, batch[:-1], options.max_tokens, mode.per_reply,
                                             late=batch[-1]))[0][-1]
                late = {"ttft_seconds": arrived.ttft, "idle_ttft_seconds": idle,
                        "over_idle": arrived.ttft / idle if arrived.ttft and idle else None}
            firsts = [r.token_times[0] for r in replies if r.token_times]
            lasts = [r.token_times[-1] for r in replies if r.token_times]
            decode_tokens = sum(r.decode_tokens for r in replies)
            span = max(lasts) - min(firsts) if firsts else 0.0
            per_request = [r.decode_tokens_per_second for r in replies if r.decode_tokens_per_second]
            ttfts = [r.ttft for r in replies if r.ttft is not None]
            rows.append({
                "rtt_ms": rtt, "concurrency": count, "speculative": mode.speculative, "max_in_flight": most,
                "wall_seconds": time.perf_counter() - started,
                "generated_tokens": sum(len(r.token_ids) for r in replies),
                "aggregate_decode_tokens_per_second": decode_tokens / span if span > 0 else None,
                "all_decoding_tokens_per_second": all_decoding_rate(replies),
                "end_to_end_tokens_per_second": end_to_end_rate(replies),
                "per_request_decode_tokens_per_second": statistics.fmean(per_request) if per_request else None,
                "ttft_seconds": {"mean": statistics.fmean(ttfts), "max": max(ttfts)} if ttfts else None,
                "agreement_with_alone": [token_agreement(alone[r.prompt], r.token_ids) for r in replies],
                "late_arrival": late,
                "replies": [r.to_json() for r in replies],
            })
            ctx.progress(f"rtt {rtt:g} ms, {count} concurrent: aggregate "
                         f"{rows[-1]['aggregate_decode_tokens_per_second'] or 0:.1f} tok/s, all decoding "
                         f"{rows[-1]['all_decoding_tokens_per_second'] or 0:.1f}, end to end "
                         f"{rows[-1]['end_to_end_tokens_per_second'] or 0:.1f}, at most {most} at once")
    return rows


async def run_sweeps(inventory: Inventory, options: SweepOptions, *, accept_new: bool = False,
                     listener: ev.Listener = lambda event: None,
                     progress: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Bring the meshes up behind the relays, sweep, tear down; the report as one JSON object."""
    if not inventory.hosts:
        raise InventoryError("--rtt, --speculative and --concurrency need hosts: the links are in front of them")
    check_counts(options.prompts, min(len(p) for p in PROMPT_SETS.values()), options.max_tokens)
    model_path = resolve_model_path(inventory.model)
    ctx = BenchContext(inventory, model_path, options.max_tokens, progress, lambda line: None, accept_new, listener)
    facts = read_model_facts(model_path)
    warm_page_cache(model_path)
    support = speculation_support()
    wanted = list(options.speculative)
    skipped = [{"speculative": m, "reason": "this build's mesh has no speculative decoding yet"}
               for m in wanted if m != "off" and support is None]
    runnable = [m for m in wanted if support is not None or m == "off"]
    if not runnable:
        raise InventoryError("--speculative: no mode this build can run (only off is available)")
    report: dict[str, Any] = {
        "kind": "sweep", **bench_header(inventory, model_path, facts),
        "settings": {"rtt_ms": list(options.rtt_ms), "speculative": wanted, "concurrency": list(options.concurrency),
                     "max_tokens": options.max_tokens, "temperature": 0.0, "chat": True,
                     "prompt_sets": {k: list(v[:options.prompts]) for k, v in PROMPT_SETS.items()},
                     "speculation_support": support,
                     "mesh_parallel": parallel_option(options).get("parallel"),
                     "link": "one relay process on 127.0.0.1 in front of each host's sshd; 0 ms = no delay added",
                     "head_threads": inventory.head.threads,
                     "host_threads": {h.name: h.threads for h in inventory.hosts}},
        "skipped": skipped,
    }
    if support == "mesh" and len(runnable) > 1 and not can_hold(facts, len(runnable)):
        raise InventoryError(f"--speculative: {len(runnable)} meshes of this model do not fit this machine at once")
    for name, endpoint in options.tcp_stages.items():  # before the relays, which accept any connection
        check_reachable(name, endpoint)
    tcp_names = list(options.tcp_stages)
    tcp_targets = [parse_target(options.tcp_stages[n]) for n in tcp_names]
    with tempfile.TemporaryDirectory(prefix="meshtui-bench-") as folder, \
            slow_links(inventory, Path(folder), options.rtt_ms[0], tcp_targets) as (through, links, tcp_ports):
        modes = sweep_modes(ctx, through, runnable, support, parallel_option(options))
        meshes = list({id(m.mesh): m.mesh for m in modes}.values())
        tcp: TcpMode | None = None
        try:
            for mesh in meshes:
                await mesh.open()
            plan = meshes[0].plan
            assert plan is not None
            report["plan"] = {"assignments": plan.to_json(), "n_gpu_layers": plan.n_gpu_layers,
                              "tensor_split": list(engine_split(plan).tensor_split)}
            targets: list[SweepTarget] = list(modes)
            if options.tcp_stages:
                check_tcp_stages(plan, options.tcp_stages)
                tcp = TcpMode(ctx, plan, {n: f"127.0.0.1:{port}" for n, port in zip(tcp_names, tcp_ports,
                                                                                     strict=True)})
                await tcp.open()
                targets.append(TcpSweepMode(tcp))
            report["rtt_sweep"] = await _rtt_sweep(targets, links, options, ctx)
            if options.concurrency:
                report["concurrency_sweep"] = await _concurrency_sweep(modes[0], links, options, ctx)
        finally:
            if tcp is not None:
                await tcp.close()
            for mesh in meshes:
                await mesh.close()
    report["speedups"] = speedups(report["rtt_sweep"])
    return report
