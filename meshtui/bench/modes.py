"""The ways `meshtui bench` reaches the layers, each measured the same way.

- "single" and "ssh" are `Mesh`es: connect, plan, launch, load and stream exactly as `meshtui up` does. "single"
  is the mesh of the head alone (no hosts: the whole model in one engine process, no RPC device); "ssh" is the
  inventory's mesh, its stages reached through the SSH tunnels.
- "tcp" is llama.cpp's own manual setup, the baseline the tunnels are measured against: the "ssh" mesh's plan
  (`tensor_split`, `n_gpu_layers`, the head's local output stage) loaded into an engine pointed straight at plain
  TCP ggml RPC servers the caller started (`--tcp-stages`). Never a mode of the agent, which listens on a
  private Unix socket only; nothing sits in its path, so its bytes come from the kernel's counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from meshtui import events as ev
from meshtui.bench.tcpstats import check_reachable, resolve_endpoint, tcp_counters
from meshtui.bench.timing import ReplyTiming, stage_row, summarise_replies, timed_reply
from meshtui.capacity import HEAD_NAME
from meshtui.engine.client import EngineProcess
from meshtui.engine.protocol import Generate, Token
from meshtui.inventory import HeadSpec, Inventory
from meshtui.loading import LoadRequest, device_order, ensure_local_stage, load_split
from meshtui.localstage import LocalStage
from meshtui.mesh import Mesh
from meshtui.node import NodeSink
from meshtui.placement import expected_placement
from meshtui.planner import Plan
from meshtui.streaming import ReplyFold
from meshtui.tunnels import StageTunnel
from meshtui.units import format_size

# Generated once per engine before the timed prompts: graph allocation and first-touch costs stay out.
WARMUP_PROMPT = "Hello"
WARMUP_TOKENS = 4

Progress = Callable[[str], None]


@dataclass
class BenchContext:
    inventory: Inventory
    model_path: Path
    max_tokens: int
    progress: Progress
    on_engine_log: Callable[[str], None]
    accept_new: bool = False
    listener: ev.Listener = lambda event: None


def head_alone(inventory: Inventory) -> Inventory:
    """The inventory of the "single" mode: no hosts, and the head may use all its memory, as `up` would."""
    return replace(inventory, hosts=(), head=HeadSpec(compute=True, threads=inventory.head.threads))


def layers_of(plan: Plan | None, name: str) -> list[int] | None:
    for a in plan.assignments if plan else ():
        if a.name == name:
            return [a.start, a.end] if a.n_layers else None
    return None


def head_share(decode_tps: float | None, stage_ms: list[float | None]) -> float | None:
    """Token interval minus the stages' round trips: the head's layers, sampling and the pipes to the engine."""
    if not decode_tps or any(ms is None for ms in stage_ms):
        return None
    return 1000.0 / decode_tps - sum(ms or 0.0 for ms in stage_ms)


class MeshMode:
    """A mode that is a `Mesh` brought up as `meshtui up` does, measured from its own events and RPC meters."""

    def __init__(self, ctx: BenchContext, mode: str, inventory: Inventory, **mesh_options: Any) -> None:
        self.ctx = ctx
        self.mode = mode
        self.mesh = Mesh(inventory, accept_new=ctx.accept_new, listener=ctx.listener, **mesh_options)
        self.plan: Plan | None = None
        self.replies: list[ReplyTiming] = []
        self.samples: dict[str, list[ev.StageLatencyMeasured]] = {}
        self.rounds: dict[str, int] = {}
        self.frames: dict[str, list[int]] = {}
        self.reply_bytes: dict[str, list[int]] = {}
        self.load_sent: dict[str, int] = {}
        self.rtt: dict[str, float | None] = {}
        self.up_seconds = 0.0

    async def open(self) -> None:
        self.ctx.progress(f"{self.mode}: bringing the mesh up" + (" through SSH tunnels" if self.mesh.hosts else
                                                                  " (the head alone)"))
        started = time.perf_counter()
        await self.mesh.up()
        self.up_seconds = time.perf_counter() - started
        self.plan = self.mesh.plan
        self.load_sent = {name: t.meter.bytes_up for name, t in self.tunnels().items()}
        self.ctx.progress(f"{self.mode}: loaded in {self.mesh.load_seconds:.2f}s, "
                          f"{format_size(self.mesh.load_bytes_sent)} sent")
        await self.generate(WARMUP_PROMPT, WARMUP_TOKENS)

    def tunnels(self) -> dict[str, StageTunnel]:
        """The open tunnels of the plan's stages, by node name."""
        tunnels = {a.name: self.mesh.stages[a.name].tunnel for a in self.plan.remote} if self.plan else {}
        return {name: t for name, t in tunnels.items() if t is not None}

    async def generate(self, prompt: str, max_tokens: int, samples: dict[str, list[ev.StageLatencyMeasured]]
                       | None = None, **params: Any) -> ReplyTiming:
        return await timed_reply(self.mesh.stream(prompt=prompt, raw=True, max_tokens=max_tokens, temperature=0.0,
                                                  seed=0, **params), prompt, samples=samples)

    async def reply(self, prompt: str) -> None:
        tunnels = self.tunnels()
        before = {name: (t.meter.bytes_up, t.meter.bytes_down) for name, t in tunnels.items()}
        self.replies.append(await self.generate(prompt, self.ctx.max_tokens, self.samples))
        for name, tunnel in tunnels.items():
            meter = tunnel.meter
            self.rounds[name] = self.rounds.get(name, 0) + meter.rounds_since_reset
            self.frames.setdefault(name, []).extend(r.frames for r in meter.rounds)
            up, down = self.reply_bytes.get(name, [0, 0])
            self.reply_bytes[name] = [up + meter.bytes_up - before[name][0],
                                      down + meter.bytes_down - before[name][1]]
            self.rtt[name] = self.mesh.node(name).rtt_ms

    async def close(self) -> None:
        await self.mesh.close()

    def result(self) -> dict[str, Any]:
        run: dict[str, Any] = {"mode": self.mode, "load_seconds": self.mesh.load_seconds,
                               "load_bytes_sent": self.mesh.load_bytes_sent, "up_seconds": self.up_seconds,
                               "placement": dict(self.mesh.placement), **summarise_replies(self.replies),
                               "load_by_host": {name: load.to_json() for name, load in self.mesh.host_loads.items()},
                               "step_costs_ms": list(self.mesh.step_costs)}
        decode = run["decode_tokens_per_second"]
        if self.plan is None or not self.plan.remote:
            run["nodes"] = [{"name": HEAD_NAME, "layers": layers_of(self.plan, HEAD_NAME),
                             "head_ms_per_token": 1000.0 / decode if decode else None}]
            return run
        tokens = max(1, run["generated_tokens"])
        decode_calls = max(1, sum(r.decode_calls for r in self.replies))
        nodes: list[dict[str, Any]] = [{"name": HEAD_NAME, "layers": layers_of(self.plan, HEAD_NAME)}]
        for name in (a.name for a in self.plan.remote):
            up, down = self.reply_bytes.get(name, [0, 0])
            frames = self.frames.get(name)
            nodes.append({"name": name, "layers": layers_of(self.plan, name),
                          "load_bytes_sent": self.load_sent.get(name), "ping_rtt_ms": self.rtt.get(name),
                          **stage_row(self.samples.get(name, [])),
                          "round_trips_per_token": self.rounds.get(name, 0) / decode_calls,
                          "frames_per_token": sum(frames) / len(frames) if frames else None,
                          "reply_bytes_per_token": {"up": up / tokens, "down": down / tokens}})
        stage_means = [(row.get("latency_ms") or {}).get("mean") for row in nodes[1:]]
        nodes[0]["head_ms_per_token"] = head_share(decode, stage_means)
        run["nodes"] = nodes
        return run


class TcpMode:
    """The "ssh" mesh's plan on plain TCP stage servers: one engine process, llama.cpp's manual setup."""

    mode = "tcp"

    def __init__(self, ctx: BenchContext, plan: Plan, stages: Mapping[str, str]) -> None:
        self.ctx, self.plan = ctx, plan
        self.names = [a.name for a in plan.remote]
        self.endpoints = [stages[n] for n in self.names]
        self.peers: list[str] = []
        self.engine: EngineProcess | None = None
        self.replies: list[ReplyTiming] = []
        self.load_seconds = 0.0
        self.placement: dict[str, list[int]] = {}
        self.after_load: dict[str, tuple[int, int]] | None = None
        self.reply_bytes: dict[str, list[int]] = {}
        self.counted = True
        self.local_stage: LocalStage | None = None  # the head's output stage, as the mesh has it
        self.requests = 0

    async def open(self) -> None:
        for name, endpoint in zip(self.names, self.endpoints, strict=True):
            check_reachable(name, endpoint)
        self.peers = [resolve_endpoint(e) for e in self.endpoints]
        self.reply_bytes = {p: [0, 0] for p in self.peers}
        self.ctx.progress("tcp: the same split, the engine straight to plain TCP stage servers")
        self.engine = EngineProcess(on_log=self.ctx.on_engine_log)
        await self.engine.start()
        # `up`'s own steps: the head's output stage as planned, then the one load (one device per plain server).
        inventory = self.ctx.inventory
        self.local_stage = await ensure_local_stage(self.plan, None, inventory.head.threads,
                                                    NodeSink(self.ctx.listener))
        devices = device_order(list(zip(self.endpoints, self.names, strict=True)), self.plan, self.local_stage)
        started = time.perf_counter()
        self.placement = await load_split(self.engine, LoadRequest(
            self.ctx.model_path, inventory.model.context, inventory.head.threads, self.plan, self.plan.parallel),
            devices)
        self.load_seconds = time.perf_counter() - started
        self.after_load = await tcp_counters(self.engine.pid)
        await self._engine_reply(0, WARMUP_PROMPT, WARMUP_TOKENS)

    async def _engine_reply(self, request_id: int, prompt: str, max_tokens: int, *, chat: bool = False
                            ) -> ReplyTiming:
        """One reply straight from the engine, folded into the core's events as `Mesh.stream` folds it."""
        assert self.engine is not None
        timing = ReplyTiming(prompt, time.perf_counter())
        # llama.cpp's manual setup decodes one token per step: no drafts (Generate's default is "auto").
        command = (Generate(id=request_id, messages=({"role": "user", "content": prompt},), max_tokens=max_tokens,
                            temperature=0.0, seed=0, speculative="off") if chat else
                   Generate(id=request_id, prompt=prompt, raw=True, max_tokens=max_tokens, temperature=0.0, seed=0,
                            speculative="off"))
        fold = ReplyFold(request_id, timing.requested_at)
        async for event in self.engine.generate(command):
            now = time.perf_counter()
            told = fold.token(event, now)[0] if isinstance(event, Token) else fold.other(event)
            if told is not None:
                timing.fold(told, now)
        timing.fold(fold.finished(time.perf_counter()), time.perf_counter())
        return timing

    async def chat(self, prompt: str, max_tokens: int) -> ReplyTiming:
        """One user turn with the model's chat template, as `Mesh.stream(messages=...)` sends it."""
        self.requests += 1
        return await self._engine_reply(1000 + self.requests, prompt, max_tokens, chat=True)

    async def reply(self, prompt: str) -> None:
        assert self.engine is not None
        before = await tcp_counters(self.engine.pid)
        self.replies.append(await self._engine_reply(len(self.replies) + 1, prompt, self.ctx.max_tokens))
        after = await tcp_counters(self.engine.pid)
        if before is None or after is None:
            self.counted = False
            return
        for p in self.peers:
            delta = [after.get(p, (0, 0))[k] - before.get(p, (0, 0))[k] for k in (0, 1)]
            self.counted = self.counted and min(delta) >= 0  # a reconnect resets the kernel's counters
            self.reply_bytes[p] = [self.reply_bytes[p][0] + delta[0], self.reply_bytes[p][1] + delta[1]]

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.close()
        if self.local_stage is not None:
            await self.local_stage.close()

    def result(self) -> dict[str, Any]:
        run: dict[str, Any] = {"mode": self.mode, "load_seconds": self.load_seconds, **summarise_replies(self.replies)}
        after_load = self.after_load
        run["load_bytes_sent"] = sum(after_load.get(p, (0, 0))[0] for p in self.peers) if after_load else None
        placement = self.placement
        run.update({"placement": placement, "placement_matches_plan": placement == expected_placement(self.plan),
                    "bytes_source": "kernel TCP counters (ss -ti); no proxy in the path, so per-stage latency "
                                    "and round trips are not measured"})
        tokens = max(1, run["generated_tokens"])
        nodes: list[dict[str, Any]] = [{"name": HEAD_NAME, "layers": layers_of(self.plan, HEAD_NAME),
                                        "head_ms_per_token": None}]
        for name, endpoint, peer in zip(self.names, self.endpoints, self.peers, strict=True):
            up, down = self.reply_bytes[peer]
            nodes.append({
                "name": name, "endpoint": endpoint, "layers": layers_of(self.plan, name),
                "load_bytes_sent": after_load.get(peer, (0, 0))[0] if after_load else None,
                "latency_ms": None, "compute_ms": None, "network_ms": None, "round_trips_per_token": None,
                "reply_bytes_per_token": {"up": up / tokens, "down": down / tokens} if self.counted else None,
            })
        run["nodes"] = nodes
        return run
