"""Load the model into a started engine over the planned stages, and check where its layers went.

The orchestrator decides when (at start, after a recovery or a rejoin); this module performs one load: every
stage speaks the head's RPC protocol, the head's local output stage runs when the plan puts the output there,
the engine loads with the plan's device split, and the placement llama.cpp reports matches the plan.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from meshtui import events as ev
from meshtui.agentproc import Agent
from meshtui.capacity import HEAD_NAME
from meshtui.engine.client import EngineProcess
from meshtui.engine.protocol import Load
from meshtui.errors import EngineError, HostError
from meshtui.gguf_facts import ModelFacts, tensor_regions
from meshtui.localstage import LocalStage
from meshtui.node import Node, NodeSink
from meshtui.placement import check_placement, engine_split, placement_by_node
from meshtui.planner import Plan
from meshtui.pushweights import Offer, PushMeter, host_offers, push_all
from meshtui.runtime import expected_rpc_protocol, local_runtime_bundle
from meshtui.stage import Stage
from meshtui.tensorhashes import head_hasher, tensor_hashes
from meshtui.tunnels import StageTunnel
from meshtui.units import format_size
from meshtui.weights import HostFile, HostLoad, MeterCounts, PushCounts, load_progressed, seed_from_host_files

LOAD_PROGRESS_SECONDS = 0.25


@dataclass(frozen=True)
class LoadRequest:
    """What one load needs besides the live stages: the model, its context and the plan it follows."""

    model_path: Path
    context: int
    threads: int | None
    plan: Plan
    parallel: int = 1  # sequences the engine decodes together
    draft_model: Path | None = None  # drafts for speculative decoding, run by the engine on the head's CPU
    model: ModelFacts | None = None  # the model's header (where its tensors lie, for hosts with their own copy)
    calibrate: int = 0  # after loading, time steps of 1 to this many positions for the drafting policy (0: none)
    step_ms: tuple[float, ...] = ()  # else an earlier load's timings, given to the engine as they are


@dataclass(frozen=True)
class Loaded:
    seconds: float
    bytes_sent: int  # weights sent up the stages' tunnels
    placement: dict[str, list[int]]  # node name -> the layers llama.cpp put there
    hosts: dict[str, HostLoad] = field(default_factory=dict)  # per host: sent, found in its cache
    step_ms: tuple[float, ...] = ()  # a step of 1, 2, ... positions as the drafts price them (timed after this load
    # or an earlier one; none: speculation off at the first load)


def stage_tunnels(stages: Mapping[str, Stage], nodes: Sequence[Node]) -> dict[str, StageTunnel]:
    """The open tunnels of these nodes' stages, in their order."""
    tunnels = {n.name: stages[n.name].tunnel for n in nodes if n.name in stages}
    return {name: t for name, t in tunnels.items() if t is not None}


def device_memory(stages: Mapping[str, Stage]) -> dict[str, list[int]]:
    """Each remote stage's devices' free memory: a host serving several GPUs shares its layers by it."""
    return {name: [int(d.get("memory_free") or 0) for d in stage.agent.devices]
            for name, stage in stages.items() if stage.agent is not None}


async def check_protocols(stages: Mapping[str, Stage], remote: Sequence[Node]) -> None:
    """Every stage must speak the head's RPC protocol: ggml aborts on a mismatch, so ask first."""
    expected = expected_rpc_protocol()
    for node in remote:
        await stages[node.name].check_protocol(expected)


async def ensure_local_stage(plan: Plan, local_stage: LocalStage | None, threads: int | None,
                             sink: NodeSink) -> LocalStage | None:
    """Start (or stop) the head's local output stage as the plan says; returns the one now running, if any."""
    if plan.output_on_head and (local_stage is None or not local_stage.alive):
        local_stage = LocalStage(local_runtime_bundle(), threads=threads)
        await local_stage.start()
        sink.log(HEAD_NAME, f"local output stage on {local_stage.endpoint}")
    elif not plan.output_on_head and local_stage is not None:
        await local_stage.close()
        local_stage = None
    return local_stage


def device_order(remote: Sequence[tuple[str, str]], plan: Plan,
                 local_stage: LocalStage | None) -> list[tuple[str, str]]:
    """(endpoint, node name) of every RPC device in llama.cpp's order: the remote stages, then the head's local
    output stage when the plan puts the output there."""
    devices = list(remote)
    if plan.output_on_head and local_stage is not None:
        devices.append((local_stage.endpoint, HEAD_NAME))
    return devices


async def load_split(engine: EngineProcess, request: LoadRequest, devices: Sequence[tuple[str, str]],
                     memory: Mapping[str, Sequence[int]] | None = None) -> dict[str, list[int]]:
    """Load the model into `engine` over these RPC devices with the plan's split; returns where llama.cpp put
    the layers, by node name, once it is checked against the plan. The one load of `up` and of the bench's
    plain TCP baseline."""
    split = engine_split(request.plan, memory)
    loaded = await engine.load(Load(
        model=str(request.model_path),
        context=request.context,
        endpoints=tuple(endpoint for endpoint, _ in devices),
        tensor_split=split.tensor_split,
        n_gpu_layers=split.n_gpu_layers,
        threads=request.threads,
        parallel=request.parallel,
        draft_model=str(request.draft_model) if request.draft_model else None,
        step_ms=request.step_ms,
    ))
    placement = placement_by_node(loaded.placement, loaded.device_endpoints, dict(devices))
    check_placement(placement, request.plan)
    return placement


async def load_engine(engine: EngineProcess, request: LoadRequest, *, head: Node, remote: Sequence[Node],
                      stages: Mapping[str, Stage], local_stage: LocalStage | None, sink: NodeSink,
                      failed_stage: Callable[[], Awaitable[Node | None]]) -> Loaded:
    """Load the model into `engine` (started) over the remote stages and the local stage, as planned.

    A load that fails because a stage went away is reported as that stage's failure (`failed_stage` names it).
    """
    tunnels = stage_tunnels(stages, remote)
    devices = device_order([(t.endpoint, name) for name, t in tunnels.items()], request.plan, local_stage)
    if request.model is not None:
        await seed_from_host_files(host_files(stages, remote, request.plan), request.model, sink.log)
    for node in [*remote, head]:
        sink.phase(node, "load")
    started = time.perf_counter()
    starts = {name: MeterCounts.of(t.meter) for name, t in tunnels.items()}
    planned = {a.name: a.weight_bytes for a in request.plan.assignments}
    pushes = {name: PushMeter() for name in tunnels}
    progress = asyncio.create_task(_report_load_progress(tunnels, starts, pushes, planned, started, sink))
    try:
        async with _as_stage_failure(failed_stage):
            await push_missing_weights(request, stages, [n for n in remote if n.name in tunnels], pushes, sink)
            placement = await load_split(engine, request, devices, device_memory(stages))
    finally:
        progress.cancel()
    seconds = time.perf_counter() - started
    repacked = await repacked_weights(stages, list(tunnels), sink)
    if local_stage is not None and request.plan.output_on_head:
        count = await local_stage.repacked_weights()
        if count:
            sink.log(HEAD_NAME, f"{count} weight tensors of its output stage in this CPU's repacked layouts", "info")
    hosts = host_loads(tunnels, starts, pushes, planned, seconds, repacked)  # the load's traffic, read here
    costs = request.step_ms
    if request.calibrate:
        timing = time.perf_counter()
        async with _as_stage_failure(failed_stage):
            costs = await engine.calibrate(request.calibrate)
        sink.log(HEAD_NAME, describe_step_costs(costs, time.perf_counter() - timing))
    bytes_sent = sum(load.sent_bytes for load in hosts.values())
    for load in hosts.values():
        sink.emit(load_progressed(load))
    sink.emit(ev.ModelLoaded(seconds, bytes_sent, dict(placement), {n: load.to_json() for n, load in hosts.items()},
                             costs))
    return Loaded(seconds, bytes_sent, placement, hosts, costs)


@contextlib.asynccontextmanager
async def _as_stage_failure(failed_stage: Callable[[], Awaitable[Node | None]]) -> AsyncIterator[None]:
    """An engine error in the block, told as the failure of the stage that went away (when one did)."""
    try:
        yield
    except EngineError as err:
        failed = await failed_stage()
        if failed is None:
            raise
        raise HostError(f"stage failed while loading: {failed.reason}", host=failed.name) from err


def describe_step_costs(step_ms: Sequence[float], seconds: float) -> str:
    """The calibration's log line: what steps of several positions cost against one."""
    if not step_ms:
        return "step costs not measured (a calibration step failed): drafts follow the linear model"
    return (f"a step of 1 position {step_ms[0]:.1f} ms; of " +
            ", ".join(f"{n} {ms / step_ms[0]:.2f}x" for n, ms in enumerate(step_ms[1:], 2)) +
            f" (timed in {seconds:.1f} s; drafts are priced by this)")


def host_files(stages: Mapping[str, Stage], remote: Sequence[Node], plan: Plan) -> list[HostFile]:
    """The hosts that have their own copy of the model (inventory `model_path`) and a running agent."""
    files = []
    for node in remote:
        stage = stages.get(node.name)
        if stage is not None and stage.spec.model_path and stage.agent is not None:
            files.append(HostFile(node.name, stage.agent, stage.spec.model_path, plan.layers_of(node.name)))
    return files


async def push_missing_weights(request: LoadRequest, stages: Mapping[str, Stage], remote: Sequence[Node],
                               meters: Mapping[str, PushMeter], sink: NodeSink) -> None:
    """Push each remote host the tensors of its layers that its cache lacks, all hosts at once, so the engine's
    load finds them cached (meshtui/pushweights.py). Hosts without a verified cache, or whose share would not
    fit in it, are left to the load."""
    hasher = head_hasher() if request.model is not None else None
    if request.model is None or hasher is None:
        return
    regions = {n.name: tensor_regions(request.model, request.plan.layers_of(n.name)) for n in remote}
    wanted = sorted({r for rs in regions.values() for r in rs if r[1] >= hasher.threshold})
    hashes = await asyncio.to_thread(tensor_hashes, request.model_path, wanted, hasher.hash_fn)
    pushes: dict[str, tuple[asyncssh.SSHClientConnection, Agent, list[Offer]]] = {}
    for node in remote:
        stage = stages[node.name]
        agent, conn = stage.agent, stage.conn
        if agent is None or conn is None or agent.cache_dir is None:
            continue
        offers = host_offers(hashes.by_region, regions[node.name], hasher.threshold)
        share = sum(o.size for o in offers)
        if agent.cache_limit is not None and share > agent.cache_limit:
            sink.log(node.name, f"its share ({format_size(share)}) is over its cache limit "
                                f"({format_size(agent.cache_limit)}): the load sends it", "warning")
            continue
        pushes[node.name] = (conn, agent, offers)
    await push_all(pushes, request.model_path, meters, sink.log)
    for name, meter in meters.items():
        if name in pushes:
            sink.log(name, f"weights pushed: {format_size(meter.pushed_bytes)} in {meter.pushed} tensors, "
                           f"{format_size(meter.present_bytes)} in its cache already ({meter.seconds:.2f}s)", "info")


def host_loads(tunnels: Mapping[str, StageTunnel], starts: Mapping[str, MeterCounts],
               pushes: Mapping[str, PushMeter], planned: Mapping[str, int], seconds: float,
               repacked: Mapping[str, int | None] | None = None) -> dict[str, HostLoad]:
    """Each host's load since `starts`: weights placed (pushed, sent or found in its cache), bytes on the wire."""
    return {name: HostLoad(name, seconds, MeterCounts.of(t.meter).since(starts.get(name, MeterCounts())),
                           planned.get(name), pushes[name].counts() if name in pushes else PushCounts(),
                           (repacked or {}).get(name))
            for name, t in tunnels.items()}


async def repacked_weights(stages: Mapping[str, Stage], names: Sequence[str],
                           sink: NodeSink) -> dict[str, int | None]:
    """Ask each host's agent how many weight tensors its stage now holds in the CPU's repacked layouts (the fast
    kernels llama.cpp uses in one process; native/patches/ggml-rpc-weights-repack.patch), and say so in its log."""
    agents = {name: agent for name in names if name in stages and (agent := stages[name].agent) is not None}
    counts = await asyncio.gather(*(agent.repacked_weights() for agent in agents.values()))
    result = dict(zip(agents, counts, strict=True))
    for name, count in result.items():
        if count:
            sink.log(name, f"{count} weight tensors in this CPU's repacked layouts", "info")
    return result


async def _report_load_progress(tunnels: Mapping[str, StageTunnel], starts: Mapping[str, MeterCounts],
                                pushes: Mapping[str, PushMeter], planned: Mapping[str, int], started: float,
                                sink: NodeSink) -> None:
    while True:
        await asyncio.sleep(LOAD_PROGRESS_SECONDS)
        for load in host_loads(tunnels, starts, pushes, planned, time.perf_counter() - started).values():
            sink.emit(load_progressed(load))
