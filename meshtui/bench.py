"""`meshtui bench`: one fixed prompt set, greedy, through every way the head can reach the layers, in one run.

Modes, each measured the same way (timestamps taken as the engine's events reach the orchestrator):

- "single": the whole model in one engine process on the head, no RPC devices (only when it fits the head);
- "ssh": the mesh itself, stages reached through the SSH tunnels (`Mesh.up()`, `Mesh.stream()`);
- "tcp": the engine pointed straight at plain TCP stage servers the caller started (`--tcp-stages`), with the
  same plan as "ssh". Never a mode of the agent: it is the baseline the tunnels are measured against.

Nothing sits between the engine and a "tcp" stage, so its timing is clean; its bytes come from the kernel's
own TCP counters (`ss -ti`), and per-stage latency and round trips are not observable there.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import socket
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from meshtui import events as ev
from meshtui.capacity import HEAD_NAME, HEAD_RESERVE_BYTES, head_capacity
from meshtui.engine.client import EngineProcess
from meshtui.engine.protocol import Done, Generate, Load, Loaded, Started, Token
from meshtui.errors import InventoryError, MeshError, PlanError
from meshtui.gguf_facts import ModelFacts, read_model_facts
from meshtui.inventory import HeadSpec, Inventory
from meshtui.localstage import LocalStage
from meshtui.mesh import Mesh
from meshtui.models import resolve_model_path
from meshtui.placement import engine_split, expected_placement, placement_by_node
from meshtui.planner import Plan, plan_layer_split
from meshtui.runtime import local_runtime_bundle
from meshtui.stats import p95
from meshtui.tunnels import StageTunnel
from meshtui.units import format_size

# Raw prompts (no chat template), short and fixed, so runs on different days compare.
PROMPTS: tuple[str, ...] = (
    "The three primary colors are",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The capital of France is Paris. The capital of Italy is",
    "A list of the planets of the solar system, in order from the sun:",
)
# Generated once per engine before the timed prompts: graph allocation and first-touch costs stay out.
WARMUP_PROMPT = "Hello"
WARMUP_TOKENS = 4

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BenchOptions:
    prompts: int = 3
    max_tokens: int = 48
    tcp_stages: Mapping[str, str] = field(default_factory=dict)  # node name -> "host:port"


def parse_tcp_stages(text: str) -> dict[str, str]:
    """`h1=10.0.0.2:50052,h2=10.0.0.3:50052` -> {"h1": "10.0.0.2:50052", ...}."""
    stages: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, endpoint = item.partition("=")
        host, colon, port = endpoint.rpartition(":")
        if not sep or not name or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InventoryError(f"--tcp-stages: expected NAME=HOST:PORT, got {item!r}")
        if name in stages:
            raise InventoryError(f"--tcp-stages: {name} given twice")
        stages[name] = f"{host}:{int(port)}"
    if not stages:
        raise InventoryError("--tcp-stages: expected NAME=HOST:PORT[,NAME=HOST:PORT...]")
    return stages


# -- measuring one reply ---------------------------------------------------------------------------


@dataclass
class ReplyTiming:
    """One prompt's reply as the orchestrator saw it arrive."""

    prompt: str
    requested_at: float
    prompt_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    stop_reason: str = "length"

    def token(self, token_id: int, now: float) -> None:
        if token_id >= 0:  # -1 carries only a UTF-8 tail
            self.token_ids.append(token_id)
            self.token_times.append(now)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.requested_at if self.token_times else None

    @property
    def decode_tokens(self) -> int:
        return max(0, len(self.token_times) - 1)

    @property
    def decode_seconds(self) -> float:
        return self.token_times[-1] - self.token_times[0] if self.token_times else 0.0

    @property
    def decode_calls(self) -> int:
        """llama_decode calls: the prompt's, one per later token, and one more that produced the EOS."""
        return len(self.token_ids) + (1 if self.stop_reason == "stop" else 0)


def summarise_replies(replies: Sequence[ReplyTiming]) -> dict[str, Any]:
    """Prefill tok/s = prompt tokens / TTFT; decode tok/s = (n - 1) / (t_last - t_first), pooled over prompts."""
    answered = [r for r in replies if r.ttft is not None]
    ttft = sum(r.ttft or 0.0 for r in answered)
    decode_seconds = sum(r.decode_seconds for r in answered)
    decode_tokens = sum(r.decode_tokens for r in answered)
    return {
        "prompts": len(replies),
        "prompt_tokens": sum(r.prompt_tokens for r in answered),
        "generated_tokens": sum(len(r.token_ids) for r in replies),
        "ttft_seconds": ttft / len(answered) if answered else None,
        "prefill_tokens_per_second": sum(r.prompt_tokens for r in answered) / ttft if ttft > 0 else None,
        "decode_tokens_per_second": decode_tokens / decode_seconds if decode_seconds > 0 else None,
        "replies": [{"prompt_tokens": r.prompt_tokens, "tokens": len(r.token_ids), "ttft_seconds": r.ttft,
                     "decode_seconds": r.decode_seconds, "stop_reason": r.stop_reason,
                     "token_ids": list(r.token_ids)} for r in replies],
    }


async def _engine_reply(engine: EngineProcess, request_id: int, prompt: str, max_tokens: int) -> ReplyTiming:
    timing = ReplyTiming(prompt, time.perf_counter())
    async for event in engine.generate(Generate(id=request_id, prompt=prompt, raw=True, max_tokens=max_tokens,
                                                temperature=0.0, seed=0)):
        if isinstance(event, Started):
            timing.prompt_tokens = event.prompt_tokens
        elif isinstance(event, Token):
            timing.token(event.token_id, time.perf_counter())
        elif isinstance(event, Done):
            timing.stop_reason = event.stop_reason
    return timing


async def _mesh_reply(mesh: Mesh, prompt: str, max_tokens: int,
                      samples: dict[str, list[ev.StageLatencyMeasured]] | None) -> ReplyTiming:
    timing = ReplyTiming(prompt, time.perf_counter())
    async for event in mesh.stream(prompt=prompt, raw=True, max_tokens=max_tokens, temperature=0.0, seed=0):
        if isinstance(event, ev.ReplyStarted):
            timing.prompt_tokens = event.prompt_tokens
        elif isinstance(event, ev.TokenGenerated):
            timing.token(event.token_id, time.perf_counter())
        elif isinstance(event, ev.StageLatencyMeasured) and samples is not None:
            samples.setdefault(event.host, []).append(event)
        elif isinstance(event, ev.ReplyFinished):
            timing.stop_reason = event.stop_reason
    return timing


# -- link counters for plain TCP stages -------------------------------------------------------------

_SS_BYTES = re.compile(r"\b(bytes_acked|bytes_received):(\d+)")


def parse_ss(text: str, pid: int) -> dict[str, tuple[int, int]]:
    """Peer "addr:port" -> (bytes sent and acked, bytes received), summed over `pid`'s sockets.

    `text` is the output of `ss -tinpH state established`: a socket line (Recv-Q, Send-Q, local, peer,
    users:(...)) followed by an indented line of TCP info.
    """
    counters: dict[str, tuple[int, int]] = {}
    peer: str | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            fields = line.split()
            peer = fields[3] if len(fields) > 4 and f"pid={pid}," in line else None
            continue
        if peer is None:
            continue
        found = dict(_SS_BYTES.findall(line))
        up, down = counters.get(peer, (0, 0))
        counters[peer] = (up + int(found.get("bytes_acked", 0)), down + int(found.get("bytes_received", 0)))
        peer = None
    return counters


async def _tcp_counters(pid: int) -> dict[str, tuple[int, int]] | None:
    if shutil.which("ss") is None:
        return None
    proc = await asyncio.create_subprocess_exec(
        "ss", "-tinpH", "state", "established",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await proc.communicate()
    return parse_ss(out.decode(errors="replace"), pid) if proc.returncode == 0 else None


def _resolve_endpoint(endpoint: str) -> str:
    """"host:port" as ss prints the peer: a numeric address."""
    host, _, port = endpoint.rpartition(":")
    try:
        info = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except OSError as err:
        raise MeshError(f"--tcp-stages: cannot resolve {host}: {err}") from err
    address = str(info[0][4][0])
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _check_reachable(name: str, endpoint: str, timeout: float = 5.0) -> None:
    host, _, port = endpoint.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise MeshError(f"tcp stage {name} at {endpoint} does not accept connections: {err}") from err


# -- the head and the machine -----------------------------------------------------------------------


def _mem_available() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def single_does_not_fit(model: ModelFacts, context: int) -> str | None:
    """Why the whole model cannot run on the head alone, or None when it can (the rules of `up`)."""
    try:
        plan_layer_split(model, [head_capacity(model, HeadSpec(), _mem_available())], context)
    except PlanError as err:
        return str(err)
    return None


def machine_facts() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_total = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    llama_version = None
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):  # metadata only: no native code loaded
        llama_version = importlib.metadata.version("llama-cpp-python")
    return {"cores": os.cpu_count(), "cpu": cpu, "kernel": f"{platform.system()} {platform.release()}",
            "memory_bytes": mem_total, "python": platform.python_version(), "llama_cpp_python": llama_version}


def _warm_page_cache(path: Path) -> None:
    """Read the model once so every mode's load time measures transfer, not the disk."""
    with open(path, "rb") as f:
        while f.read(16 * 1024**2):
            pass


# -- the modes ---------------------------------------------------------------------------------------


@dataclass
class _Context:
    inventory: Inventory
    model_path: Path
    max_tokens: int
    progress: Progress
    on_engine_log: Callable[[str], None]


def _stage_row(samples: Sequence[ev.StageLatencyMeasured]) -> dict[str, Any]:
    if not samples:
        return {"latency_ms": None, "compute_ms": None, "network_ms": None, "decode_bytes_per_token": None}
    totals = sorted(s.total_ms for s in samples)
    return {
        "latency_ms": {"mean": statistics.fmean(totals), "p50": statistics.median(totals),
                       "p95": p95(totals)},
        "compute_ms": statistics.fmean(s.compute_ms for s in samples),
        "network_ms": statistics.fmean(s.network_ms for s in samples),
        "decode_bytes_per_token": {"up": statistics.fmean(s.bytes_up for s in samples),
                                   "down": statistics.fmean(s.bytes_down for s in samples)},
    }


def _layers(plan: Plan | None, name: str) -> list[int] | None:
    for a in plan.assignments if plan else ():
        if a.name == name:
            return [a.start, a.end] if a.n_layers else None
    return None


def _head_share(decode_tps: float | None, stage_ms: Sequence[float | None]) -> float | None:
    """Token interval minus the stages' round trips: the head's layers, sampling and the pipes to the engine."""
    if not decode_tps or any(ms is None for ms in stage_ms):
        return None
    return 1000.0 / decode_tps - sum(ms or 0.0 for ms in stage_ms)


class _EngineMode:
    """"single" (no endpoints) or "tcp" (the plan's split on plain TCP stage servers): one engine process."""

    def __init__(self, ctx: _Context, mode: str, plan: Plan | None = None,
                 stages: Mapping[str, str] | None = None) -> None:
        self.ctx, self.mode, self.plan = ctx, mode, plan
        self.names = [a.name for a in plan.remote] if plan and stages is not None else []
        self.endpoints = [stages[n] for n in self.names] if stages is not None else []
        self.peers: list[str] = []
        self.engine: EngineProcess | None = None
        self.replies: list[ReplyTiming] = []
        self.load_seconds = 0.0
        self.loaded: Loaded | None = None
        self.after_load: dict[str, tuple[int, int]] | None = None
        self.reply_bytes: dict[str, list[int]] = {}
        self.counted = True
        self.local_stage: LocalStage | None = None  # the head's output stage, as the mesh has it

    async def open(self) -> None:
        if self.endpoints:
            for name, endpoint in zip(self.names, self.endpoints, strict=True):
                _check_reachable(name, endpoint)
            self.peers = [_resolve_endpoint(e) for e in self.endpoints]
            self.reply_bytes = {p: [0, 0] for p in self.peers}
            self.ctx.progress("tcp: the same split, the engine straight to plain TCP stage servers")
        else:
            self.ctx.progress("single: the whole model in one engine process on the head")
        self.engine = EngineProcess(on_log=self.ctx.on_engine_log)
        await self.engine.start()
        # Plain TCP stage servers: one device each.
        placed = engine_split(self.plan) if self.plan is not None else None
        endpoints = list(self.endpoints)
        if self.endpoints and self.plan is not None and self.plan.output_on_head:
            self.local_stage = LocalStage(local_runtime_bundle(), threads=self.ctx.inventory.head.threads)
            await self.local_stage.start()
            endpoints.append(self.local_stage.endpoint)
        started = time.perf_counter()
        self.loaded = await self.engine.load(Load(
            model=str(self.ctx.model_path), context=self.ctx.inventory.model.context, endpoints=tuple(endpoints),
            threads=self.ctx.inventory.head.threads, tensor_split=placed.tensor_split if placed else (),
            n_gpu_layers=placed.n_gpu_layers if placed else 0))
        self.load_seconds = time.perf_counter() - started
        if self.endpoints:
            self.after_load = await _tcp_counters(self.engine.pid)
        await _engine_reply(self.engine, 0, WARMUP_PROMPT, WARMUP_TOKENS)

    async def reply(self, prompt: str) -> None:
        assert self.engine is not None
        before = await _tcp_counters(self.engine.pid) if self.endpoints else None
        self.replies.append(await _engine_reply(self.engine, len(self.replies) + 1, prompt, self.ctx.max_tokens))
        if not self.endpoints:
            return
        after = await _tcp_counters(self.engine.pid)
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
        decode = run["decode_tokens_per_second"]
        if not self.endpoints:
            run["load_bytes_sent"] = 0
            run["nodes"] = [{"name": HEAD_NAME, "layers": None,
                             "head_ms_per_token": 1000.0 / decode if decode else None}]
            return run
        after_load = self.after_load
        run["load_bytes_sent"] = sum(after_load.get(p, (0, 0))[0] for p in self.peers) if after_load else None
        names = dict(zip(self.endpoints, self.names, strict=True))
        if self.local_stage is not None:
            names[self.local_stage.endpoint] = HEAD_NAME
        placement = (placement_by_node(self.loaded.placement, self.loaded.device_endpoints, names)
                     if self.loaded else {})
        expected = expected_placement(self.plan) if self.plan else {}
        run.update({"placement": placement, "placement_matches_plan": placement == expected,
                    "bytes_source": "kernel TCP counters (ss -ti); no proxy in the path, so per-stage latency "
                                    "and round trips are not measured"})
        tokens = max(1, run["generated_tokens"])
        nodes: list[dict[str, Any]] = [{"name": HEAD_NAME, "layers": _layers(self.plan, HEAD_NAME),
                                        "head_ms_per_token": None}]
        for name, endpoint, peer in zip(self.names, self.endpoints, self.peers, strict=True):
            up, down = self.reply_bytes[peer]
            nodes.append({
                "name": name, "endpoint": endpoint, "layers": _layers(self.plan, name),
                "load_bytes_sent": after_load.get(peer, (0, 0))[0] if after_load else None,
                "latency_ms": None, "compute_ms": None, "network_ms": None, "round_trips_per_token": None,
                "reply_bytes_per_token": {"up": up / tokens, "down": down / tokens} if self.counted else None,
            })
        run["nodes"] = nodes
        return run


class _MeshMode:
    """"ssh": the mesh itself, through its SSH tunnels, measured from its own events and RPC meters."""

    mode = "ssh"

    def __init__(self, ctx: _Context, accept_new: bool, listener: ev.Listener) -> None:
        self.ctx = ctx
        self.mesh = Mesh(ctx.inventory, accept_new=accept_new, listener=listener)
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
        self.ctx.progress("ssh: bringing the mesh up through SSH tunnels")
        started = time.perf_counter()
        await self.mesh.up()
        self.up_seconds = time.perf_counter() - started
        self.plan = self.mesh.plan
        self.load_sent = {name: t.meter.bytes_up for name, t in self._tunnels().items()}
        self.ctx.progress(f"ssh: loaded in {self.mesh.load_seconds:.2f}s, "
                          f"{format_size(self.mesh.load_bytes_sent)} sent")
        await _mesh_reply(self.mesh, WARMUP_PROMPT, WARMUP_TOKENS, None)

    def _tunnels(self) -> dict[str, StageTunnel]:
        """The open tunnels of the plan's stages, by node name."""
        tunnels = {a.name: self.mesh.stages[a.name].tunnel for a in self.plan.remote} if self.plan else {}
        return {name: t for name, t in tunnels.items() if t is not None}

    async def reply(self, prompt: str) -> None:
        tunnels = self._tunnels()
        before = {name: (t.meter.bytes_up, t.meter.bytes_down) for name, t in tunnels.items()}
        self.replies.append(await _mesh_reply(self.mesh, prompt, self.ctx.max_tokens, self.samples))
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
        run: dict[str, Any] = {"mode": "ssh", "load_seconds": self.mesh.load_seconds,
                               "load_bytes_sent": self.mesh.load_bytes_sent, "up_seconds": self.up_seconds,
                               "placement": dict(self.mesh.placement), **summarise_replies(self.replies)}
        tokens = max(1, run["generated_tokens"])
        decode_calls = max(1, sum(r.decode_calls for r in self.replies))
        nodes: list[dict[str, Any]] = [{"name": HEAD_NAME, "layers": _layers(self.plan, HEAD_NAME)}]
        for name in (a.name for a in self.plan.remote) if self.plan else ():
            up, down = self.reply_bytes.get(name, [0, 0])
            frames = self.frames.get(name)
            nodes.append({"name": name, "layers": _layers(self.plan, name),
                          "load_bytes_sent": self.load_sent.get(name), "ping_rtt_ms": self.rtt.get(name),
                          **_stage_row(self.samples.get(name, [])),
                          "round_trips_per_token": self.rounds.get(name, 0) / decode_calls,
                          "frames_per_token": statistics.fmean(frames) if frames else None,
                          "reply_bytes_per_token": {"up": up / tokens, "down": down / tokens}})
        stage_means = [(row.get("latency_ms") or {}).get("mean") for row in nodes[1:]]
        nodes[0]["head_ms_per_token"] = _head_share(run["decode_tokens_per_second"], stage_means)
        run["nodes"] = nodes
        return run


async def _reload_over_ssh(ctx: _Context, accept_new: bool, listener: ev.Listener, plan: Plan) -> dict[str, Any]:
    """A second mesh on the same hosts: the agents' RPC cache spares every tensor over ggml's 10 MB threshold."""
    ctx.progress("ssh: second load on the same hosts (agents keep ggml's RPC cache)")
    mesh = Mesh(ctx.inventory, accept_new=accept_new, listener=listener)
    try:
        await mesh.up()
        same_plan = mesh.plan is not None and mesh.plan.assignments == plan.assignments
        return {"reload_bytes_sent": mesh.load_bytes_sent, "reload_seconds": mesh.load_seconds,
                "reload_same_plan": same_plan}
    finally:
        await mesh.close()


def _check_tcp_stages(plan: Plan, tcp_stages: Mapping[str, str]) -> None:
    names = [a.name for a in plan.remote]
    missing = [n for n in names if n not in tcp_stages]
    unknown = sorted(set(tcp_stages) - set(names))
    if missing or unknown:
        raise InventoryError(f"--tcp-stages must name exactly the stages of the plan ({', '.join(names)})"
                             + (f"; missing {', '.join(missing)}" if missing else "")
                             + (f"; not stages: {', '.join(unknown)}" if unknown else ""))


def _can_interleave(model: ModelFacts, has_tcp: bool) -> bool:
    """All modes loaded at once, prompts taken in turns, so a busy machine's drift hits every mode alike.

    Needs room for every copy at once when the stages share the head's machine (as in a lab): the single
    engine's, the mesh's and the tcp split's. Otherwise modes run one after another.
    """
    copies = 3 if has_tcp else 2
    return (copies + 1) * model.file_size + HEAD_RESERVE_BYTES < _mem_available()


async def run_bench(inventory: Inventory, options: BenchOptions, *, accept_new: bool = False,
                    listener: ev.Listener = lambda event: None, progress: Progress = lambda line: None,
                    on_engine_log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Load every mode (never two loads at once), run the prompts, then a second load over SSH."""
    if not 1 <= options.prompts <= len(PROMPTS):
        raise InventoryError(f"--prompts: expected 1 to {len(PROMPTS)}")
    if options.max_tokens < 2:
        raise InventoryError("--max-tokens: expected at least 2 (decode speed needs two tokens)")
    model_path = resolve_model_path(inventory.model)
    facts = read_model_facts(model_path)
    _warm_page_cache(model_path)
    prompts = PROMPTS[:options.prompts]
    ctx = _Context(inventory, model_path, options.max_tokens, progress, on_engine_log)
    interleaved = _can_interleave(facts, bool(options.tcp_stages))
    report: dict[str, Any] = {
        "machine": machine_facts(),
        "model": {"name": facts.name, "path": str(model_path), "file_bytes": facts.file_size,
                  "n_layer": facts.n_layer, "context": inventory.model.context},
        "settings": {"prompts": list(prompts), "max_tokens": ctx.max_tokens, "temperature": 0.0,
                     "warmup": {"prompt": WARMUP_PROMPT, "tokens": WARMUP_TOKENS},
                     "schedule": "interleaved" if interleaved else "sequential",
                     "head_threads": inventory.head.threads,
                     "host_threads": {h.name: h.threads for h in inventory.hosts}},
        "runs": [], "skipped": [],
    }
    why_not = single_does_not_fit(facts, inventory.model.context)
    if why_not is not None:
        report["skipped"].append({"mode": "single", "reason": why_not})
    if not options.tcp_stages:
        report["skipped"].append({"mode": "tcp", "reason": "no --tcp-stages given"})
    mesh_mode = _MeshMode(ctx, accept_new, listener)
    modes: list[_EngineMode | _MeshMode] = [_EngineMode(ctx, "single")] if why_not is None else []
    modes.append(mesh_mode)
    try:
        index = 0
        while index < len(modes):  # "tcp" joins once the mesh has a plan
            mode = modes[index]
            index += 1
            await mode.open()
            if not interleaved:
                await _run_prompts([mode], prompts, ctx)
                await mode.close()
            if mode is mesh_mode and options.tcp_stages:
                assert mesh_mode.plan is not None
                _check_tcp_stages(mesh_mode.plan, options.tcp_stages)
                modes.append(_EngineMode(ctx, "tcp", mesh_mode.plan, options.tcp_stages))
        if interleaved:
            await _run_prompts(modes, prompts, ctx)
    finally:
        for mode in modes:
            await mode.close()
    assert mesh_mode.plan is not None
    plan = mesh_mode.plan
    report["runs"] = [mode.result() for mode in modes]
    report["plan"] = {"assignments": plan.to_json(), "n_gpu_layers": plan.n_gpu_layers,
                      "tensor_split": list(engine_split(plan).tensor_split)}
    report.update(await _reload_over_ssh(ctx, accept_new, listener, plan))
    by_mode = {run["mode"]: run for run in report["runs"]}
    ssh_tps = by_mode["ssh"]["decode_tokens_per_second"]
    tcp_tps = by_mode.get("tcp", {}).get("decode_tokens_per_second")
    report["ssh_over_tcp_decode_ratio"] = ssh_tps / tcp_tps if ssh_tps and tcp_tps else None
    single_tps = by_mode.get("single", {}).get("decode_tokens_per_second")
    report["ssh_over_single_decode_ratio"] = ssh_tps / single_tps if ssh_tps and single_tps else None
    outputs = [[r.token_ids for r in mode.replies] for mode in modes]
    report["outputs_identical"] = all(o == outputs[0] for o in outputs)
    return report


async def _run_prompts(modes: Sequence[_EngineMode | _MeshMode], prompts: Sequence[str], ctx: _Context) -> None:
    """Each prompt through every mode, the order rotating from prompt to prompt."""
    for i, prompt in enumerate(prompts):
        turn = [modes[(i + k) % len(modes)] for k in range(len(modes))]
        for mode in turn:
            await mode.reply(prompt)
        ctx.progress(f"prompt {i + 1}/{len(prompts)} done ({', '.join(m.mode for m in turn)})")


# -- rendering ---------------------------------------------------------------------------------------


def _num(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def _size(value: float | None) -> str:
    return "-" if value is None else format_size(int(value))


def _span(layers: list[int] | None) -> str:
    return "-" if not layers else f"{layers[0]}-{layers[1] - 1}"


def render_table(report: Mapping[str, Any]) -> str:
    m, model = report["machine"], report["model"]
    settings = report["settings"]
    lines = [
        f"{model['name']} ({format_size(model['file_bytes'])}, {model['n_layer']} layers), "
        f"{len(settings['prompts'])} prompt(s) x {settings['max_tokens']} tokens, greedy",
        f"machine: {m['cores']} cores, {m['cpu']}, {m['kernel']}",
        "",
        f"{'mode':<7} {'load s':>7} {'load sent':>10} {'TTFT ms':>8} {'prefill tok/s':>14} {'decode tok/s':>13}",
    ]
    for run in report["runs"]:
        sent = run["load_bytes_sent"]
        lines.append(f"{run['mode']:<7} {run['load_seconds']:>7.2f} {_size(sent):>10} {_ms(run['ttft_seconds']):>8} "
                     f"{_num(run['prefill_tokens_per_second']):>14} {_num(run['decode_tokens_per_second']):>13}")
    for skipped in report["skipped"]:
        lines.append(f"{skipped['mode']:<7} skipped: {skipped['reason']}")
    lines.append("")
    if report.get("ssh_over_tcp_decode_ratio") is not None:
        lines.append(f"ssh / tcp decode: {report['ssh_over_tcp_decode_ratio']:.2f}")
    if report.get("ssh_over_single_decode_ratio") is not None:
        lines.append(f"ssh / single decode: {report['ssh_over_single_decode_ratio']:.2f}")
    first = next(r for r in report["runs"] if r["mode"] == "ssh")["load_bytes_sent"]
    lines.append(f"ssh load: {format_size(first)} sent; second load on the same hosts: "
                 f"{format_size(report['reload_bytes_sent'])} in {report['reload_seconds']:.2f}s"
                 + ("" if report.get("reload_same_plan", True) else " (the plan changed)"))
    lines.append("greedy outputs identical across modes: " + ("yes" if report["outputs_identical"] else "NO"))
    for run in report["runs"]:
        if run["mode"] == "single":
            continue
        lines += ["", f"{run['mode']} per node, per decoded token:",
                  f"  {'node':<10} {'layers':>7} {'total ms':>9} {'compute':>8} {'network':>8} {'round trips':>12} "
                  f"{'up/token':>10} {'down/token':>11} {'load sent':>10}"]
        for node in run["nodes"]:
            if node["name"] == HEAD_NAME:
                lines.append(f"  {node['name']:<10} {_span(node['layers']):>7} "
                             f"{_num(node.get('head_ms_per_token'), '.2f'):>9}  (head's layers, sampling, pipes)")
                continue
            latency = node.get("latency_ms") or {}
            moved = node.get("reply_bytes_per_token") or {}
            lines.append(
                f"  {node['name']:<10} {_span(node['layers']):>7} {_num(latency.get('mean'), '.2f'):>9} "
                f"{_num(node.get('compute_ms'), '.2f'):>8} {_num(node.get('network_ms'), '.2f'):>8} "
                f"{_num(node.get('round_trips_per_token'), '.2f'):>12} {_size(moved.get('up')):>10} "
                f"{_size(moved.get('down')):>11} {_size(node.get('load_bytes_sent')):>10}")
        lines.append("  (bytes per token: each link's bytes during the replies / tokens generated, prefill included"
                     + (f"; {run['bytes_source']})" if run.get("bytes_source") else ")"))
    return "\n".join(lines)


_COLORS = {"single": "#4c78a8", "ssh": "#f58518", "tcp": "#54a24b", "compute": "#e45756", "network": "#72b7b2",
           "head": "#b279a2"}


def render_svg(report: Mapping[str, Any]) -> str:
    """Decode tok/s per mode, then each ssh stage's time per token split into compute and network."""
    width, left, bar_h, gap = 760, 150, 22, 8
    plot_w = width - left - 90
    parts: list[str] = []
    y = 30
    title = (f"meshtui bench: {report['model']['name']} on {report['machine']['cores']} cores "
             f"({report['machine']['cpu']})")
    parts.append(f'<text x="10" y="{y}" font-size="15" font-weight="bold">{escape(title)}</text>')
    y += 30
    parts.append(f'<text x="10" y="{y}" font-size="13">decode tokens per second (greedy, higher is better)</text>')
    y += 12
    runs = [r for r in report["runs"] if r.get("decode_tokens_per_second")]
    top = max((r["decode_tokens_per_second"] for r in runs), default=1.0)
    for run in runs:
        value = run["decode_tokens_per_second"]
        w = max(1.0, plot_w * value / top)
        parts.append(f'<text x="{left - 8}" y="{y + 16}" font-size="12" text-anchor="end">{escape(run["mode"])}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" '
                     f'fill="{_COLORS.get(run["mode"], "#888")}"/>')
        parts.append(f'<text x="{left + w + 6:.1f}" y="{y + 16}" font-size="12">{value:.1f}</text>')
        y += bar_h + gap
    ssh = next((r for r in report["runs"] if r["mode"] == "ssh"), None)
    rows: list[tuple[str, float, float, str]] = []  # label, first segment, second segment, kind
    if ssh is not None:
        for node in ssh["nodes"]:
            if node["name"] == HEAD_NAME:
                if node.get("head_ms_per_token") is not None:
                    rows.append((f"head {_span(node['layers'])}", max(0.0, node["head_ms_per_token"]), 0.0, "head"))
            elif node.get("latency_ms"):
                rows.append((f"{node['name']} {_span(node['layers'])}", node["compute_ms"], node["network_ms"],
                             "stage"))
    if rows:
        y += 22
        parts.append(f'<text x="10" y="{y}" font-size="13">ssh: milliseconds per decoded token, by node '
                     f'(<tspan fill="{_COLORS["compute"]}">compute</tspan>, '
                     f'<tspan fill="{_COLORS["network"]}">network</tspan>, '
                     f'<tspan fill="{_COLORS["head"]}">head and pipes</tspan>)</text>')
        y += 12
        top_ms = max(a + b for _, a, b, _ in rows) or 1.0
        for label, first, second, kind in rows:
            w1 = plot_w * first / top_ms
            w2 = plot_w * second / top_ms
            color = _COLORS["head"] if kind == "head" else _COLORS["compute"]
            parts.append(f'<text x="{left - 8}" y="{y + 16}" font-size="12" text-anchor="end">{escape(label)}</text>')
            parts.append(f'<rect x="{left}" y="{y}" width="{w1:.1f}" height="{bar_h}" fill="{color}"/>')
            if w2 > 0:
                parts.append(f'<rect x="{left + w1:.1f}" y="{y}" width="{w2:.1f}" height="{bar_h}" '
                             f'fill="{_COLORS["network"]}"/>')
            parts.append(f'<text x="{left + w1 + w2 + 6:.1f}" y="{y + 16}" font-size="12">{first + second:.2f}</text>')
            y += bar_h + gap
    y += 20
    notes = []
    if report.get("ssh_over_tcp_decode_ratio") is not None:
        notes.append(f"ssh/tcp decode {report['ssh_over_tcp_decode_ratio']:.2f}")
    notes.append(f"reload over ssh sent {format_size(report['reload_bytes_sent'])}")
    parts.append(f'<text x="10" y="{y}" font-size="12">{escape("; ".join(notes))}</text>')
    height = y + 16
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif">\n'
            f'<rect width="{width}" height="{height}" fill="white"/>\n' + "\n".join(parts) + "\n</svg>\n")


def write_outputs(report: Mapping[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, svg_path = out / "bench.json", out / "bench.svg"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    svg_path.write_text(render_svg(report))
    return json_path, svg_path

