"""The orchestrator: connect, probe, plan, push, launch, tunnel, load, generate, tear down.

Decisions are made by pure functions (the planner); this module performs them and reports every step as
an event. It never imports the UI.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncssh

from meshtui import capacity
from meshtui import events as ev
from meshtui.capacity import HEAD_NAME, ProbedHost, gpu_verdict
from meshtui.engine.client import EngineDied, EngineProcess
from meshtui.engine.protocol import Done, Generate, Load, Started, Token
from meshtui.errors import EngineError, HostError, InventoryError, MeshError, PlanError
from meshtui.gguf_facts import ModelFacts, read_model_facts
from meshtui.hosts import Agent, HostFacts
from meshtui.inventory import HostSpec, Inventory
from meshtui.localstage import LocalStage
from meshtui.models import resolve_model_path
from meshtui.placement import check_placement, engine_split, placement_by_node
from meshtui.planner import NodeCapacity, Plan, plan_layer_split
from meshtui.predict import Prediction, predict_decode
from meshtui.rejoin import RejoinPolicy
from meshtui.runtime import (
    RuntimeBundle,
    agent_source_path,
    expected_rpc_protocol,
    load_file_module,
    local_runtime_bundle,
)
from meshtui.stage import Stage, StageReport
from meshtui.stats import p95
from meshtui.tunnels import StageTunnel
from meshtui.watchdog import StageClock, StallPolicy, Verdict, judge

LATENCY_HISTORY = 256
DEFAULT_PARALLEL = 4  # replies decoded together unless --parallel says otherwise


@dataclass
class Node:
    """What is known of one node (the head or a host): plain data, mutated only by the orchestrator. A host's
    live connection, agent and tunnel are its `Stage` (`Mesh.stages`)."""

    name: str
    address: str
    is_head: bool = False
    spec: HostSpec | None = None
    status: str = "pending"
    reason: str = ""
    facts: HostFacts | None = None
    layers: tuple[int, int] | None = None
    usable_bytes: int = 0
    planned_bytes: int = 0
    device: str = "cpu"  # what holds its layers, as planned: "cpu" or the GPU's name
    rtt_ms: float | None = None  # its stage's round trip (the minimum of recent pings)
    latencies: deque[ev.StageLatencyMeasured] = field(default_factory=lambda: deque(maxlen=LATENCY_HISTORY))
    lost_reason: str = ""  # the step watchdog declared it lost; the failure path takes it from here
    stalled_seconds: float | None = None  # how long its stall lasted before it was declared lost

    def latency_summary(self) -> dict[str, float | None]:
        values = [x.total_ms for x in self.latencies]
        if not values:
            return {"last": None, "mean": None, "p95": None, "network": self.rtt_ms}
        return {
            "last": self.latencies[-1].total_ms,
            "mean": statistics.fmean(values),
            "p95": p95(values),
            "network": self.rtt_ms,
        }


@dataclass(frozen=True)
class Recovery:
    """A stage lost mid-run and the mesh rebuilt without it."""

    node: str
    token_index: int  # tokens of the reply already generated when it happened
    seconds: float  # from noticing the loss to the engine loaded again
    stalled_seconds: float | None = None  # how long the stage was stalled before the watchdog declared it lost

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "token_index": self.token_index, "seconds": self.seconds,
                "stalled_seconds": self.stalled_seconds}


@dataclass(frozen=True)
class Reply:
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    seconds: float
    tokens_per_second: float
    stop_reason: str


class Mesh:
    def __init__(self, inventory: Inventory, *, accept_new: bool = False,
                 listener: ev.Listener = lambda event: None, output_on_head: bool = True,
                 weight_by_speed: bool = False, stall_policy: StallPolicy | None = None,
                 parallel: int = DEFAULT_PARALLEL) -> None:
        if parallel < 1:
            raise InventoryError(f"--parallel: expected at least 1, not {parallel}")
        self.inventory = inventory
        self.parallel = parallel  # replies in flight at once, each a sequence the engine decodes with the others
        self.accept_new = accept_new
        self.output_on_head = output_on_head
        self.weight_by_speed = weight_by_speed
        self.local_stage: LocalStage | None = None
        self.listener = listener
        self.head = Node(name=HEAD_NAME, address="127.0.0.1", is_head=True)
        self.hosts = [Node(name=h.name, address=h.address, spec=h) for h in inventory.hosts]
        self.stages = {h.name: Stage(h, inventory.ssh, self._stage_report(h.name)) for h in inventory.hosts}
        self.model_path: Path | None = None
        self.model: ModelFacts | None = None
        self.plan: Plan | None = None
        self.engine: EngineProcess | None = None
        self.load_seconds = 0.0
        self.load_bytes_sent = 0
        self.placement: dict[str, list[int]] = {}
        self._request_ids = 0
        self.recoveries: list[Recovery] = []
        self.rejoin_policy: RejoinPolicy | None = None
        self._rejoin_task: asyncio.Task[None] | None = None
        self._rejoinable: set[str] = set()
        self._streaming_request: int | None = None
        self._recovering = False
        self._rtt_task: asyncio.Task[None] | None = None
        self.stall_policy = stall_policy or StallPolicy()
        self._stall_task: asyncio.Task[None] | None = None
        self._loading = False
        self._loaded = False  # the engine holds the model as planned (set once a load checked out)
        self._losses: dict[str, list[float]] = {}  # monotonic times each host was lost, for the flap hold-out
        self._closed = False

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def nodes(self) -> list[Node]:
        return [self.head, *self.hosts]

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def _emit(self, event: ev.Event) -> None:
        self.listener(event)

    def _stage_report(self, name: str) -> StageReport:
        return StageReport(
            phase=lambda phase, detail: self._phase(self.node(name), phase, detail),
            log=lambda message, level: self._log(name, message, level),
            progress=lambda done, total: self._emit(ev.TransferProgressed(name, "push", done, total)),
        )

    def _log(self, source: str, message: str, level: str = "info") -> None:
        self._emit(ev.LogRecorded(source=source, message=message, level=level))

    def _phase(self, node: Node, phase: str, detail: str = "") -> None:
        node.status = phase
        self._emit(ev.HostPhaseChanged(node.name, phase, detail))

    def _fail(self, node: Node, phase: str, reason: str) -> None:
        node.status = "failed"
        node.reason = reason
        self._emit(ev.HostFailed(node.name, phase, reason))

    # -- step 1: model and hosts -----------------------------------------------------------------
    def read_model(self) -> ModelFacts:
        self.model_path = resolve_model_path(self.inventory.model)
        self.model = read_model_facts(self.model_path)
        self._log("model", f"{self.model.name}: {self.model.n_layer} layers, {self.model.file_size} bytes")
        return self.model

    async def connect_and_probe(self) -> None:
        """Connect to every host and probe it, concurrently. Any failure is fatal and named."""
        self.head.facts = HostFacts.from_json(_probe_head())
        self._emit(ev.HostProbed(HEAD_NAME, self.head.facts.to_json()))
        _raise_first(await asyncio.gather(*(self._connect_one(n) for n in self.hosts), return_exceptions=True))

    async def _connect_one(self, node: Node, *, rejoining: bool = False) -> None:
        assert node.spec is not None
        try:
            # --accept-new applies when the mesh starts; a rejoin takes only the key accepted then.
            node.facts = await self.stages[node.name].connect_and_probe(accept_new=self.accept_new and not rejoining)
        except HostError as err:
            self._fail(node, node.status, err.reason)
            raise
        self._emit(ev.HostProbed(node.name, node.facts.to_json()))
        verdict = gpu_verdict(node.spec, node.facts)
        if node.facts.gpus and not verdict.serves:
            self._log(node.name, f"its GPU is not used: {verdict.why_not}; its layers go to the CPU", "warning")

    # -- step 2: plan (pure) ---------------------------------------------------------------------
    def _probed_hosts(self) -> list[ProbedHost]:
        """The hosts still in the mesh, as the capacity rule needs them."""
        hosts = []
        for node in self.hosts:
            if node.status == "failed":
                continue
            assert node.facts is not None and node.spec is not None
            hosts.append(ProbedHost(node.spec, node.facts))
        return hosts

    def _serves_gpu(self, node: Node) -> bool:
        return node.spec is not None and node.facts is not None and gpu_verdict(node.spec, node.facts).serves

    def _speeds(self, capacities: Sequence[NodeCapacity]) -> list[float] | None:
        """Each planned node's probed memory bandwidth, when the split is to follow speed."""
        if not self.weight_by_speed:
            return None
        speeds = []
        for cap in capacities:
            facts = self.node(cap.name).facts
            if facts is None or not facts.mem_bandwidth:
                self._log(cap.name, "no speed measurement: splitting by memory only", "warning")
                return None
            speeds.append(float(facts.mem_bandwidth))
        return speeds

    def make_plan(self) -> Plan:
        assert self.model is not None and self.head.facts is not None
        capacities = capacity.capacities(self.model, self.inventory.head, self.head.facts, self._probed_hosts())
        self.plan = plan_layer_split(self.model, capacities, self.inventory.model.context,
                                     output_on_head=self.output_on_head, speeds=self._speeds(capacities),
                                     parallel=self.parallel)
        for assignment in self.plan.assignments:
            node = self.node(assignment.name)
            node.usable_bytes = assignment.usable_bytes
            node.planned_bytes = assignment.used_bytes
            node.device = assignment.device
            node.layers = (assignment.start, assignment.end) if assignment.n_layers else None
        self._emit(ev.PlanComputed(self.plan))
        return self.plan

    # -- step 3: launch --------------------------------------------------------------------------
    async def launch(self) -> None:
        """Push and start agents on the nodes that hold layers, open tunnels, load the model."""
        assert self.plan is not None and self.model_path is not None
        remote = [self.node(a.name) for a in self.plan.remote]
        for node in self.hosts:
            if node not in remote:
                node.status = "idle"
                self._emit(ev.HostPhaseChanged(node.name, "idle", "holds no layers"))
        bundle = local_runtime_bundle()
        _raise_first(await asyncio.gather(*(self._start_stage(n, bundle) for n in remote), return_exceptions=True))
        self._stall_task = asyncio.create_task(self._watch_stalls())
        await self._load_engine(remote)
        self._rtt_task = asyncio.create_task(self._measure_rtt_forever())

    async def _start_stage(self, node: Node, bundle: RuntimeBundle) -> None:
        stage = self.stages[node.name]
        try:
            await stage.start(bundle, gpu=self._serves_gpu(node))
        except HostError as err:
            self._fail(node, node.status, err.reason)
            raise
        agent = stage.running_agent()
        devices = tuple(d.get("description") or d.get("name", "") for d in agent.devices)
        self._emit(ev.AgentLaunched(node.name, agent.socket_path, agent.pid, devices))
        await stage.open_tunnel()
        node.rtt_ms = stage.rtt_ms

    async def _check_protocols(self, remote: Sequence[Node]) -> None:
        """Every stage must speak the head's RPC protocol: ggml aborts on a mismatch, so ask first."""
        expected = expected_rpc_protocol()
        for node in remote:
            await self.stages[node.name].check_protocol(expected)

    async def _ensure_local_stage(self) -> None:
        """Start (or stop) the head's local output stage as the plan says."""
        assert self.plan is not None
        if self.plan.output_on_head and (self.local_stage is None or not self.local_stage.alive):
            self.local_stage = LocalStage(local_runtime_bundle(), threads=self.inventory.head.threads)
            await self.local_stage.start()
            self._log(HEAD_NAME, f"local output stage on {self.local_stage.endpoint}")
        elif not self.plan.output_on_head and self.local_stage is not None:
            await self.local_stage.close()
            self.local_stage = None

    def _endpoints(self, remote: Sequence[Node]) -> list[str]:
        """RPC devices in llama.cpp's order: the remote stages, then the head's local output stage."""
        endpoints = [t.endpoint for t in self._tunnels(remote).values()]
        if self.plan is not None and self.plan.output_on_head and self.local_stage is not None:
            endpoints.append(self.local_stage.endpoint)
        return endpoints

    async def _load_engine(self, remote: Sequence[Node]) -> None:
        assert self.plan is not None and self.model_path is not None
        await self._check_protocols(remote)
        await self._ensure_local_stage()
        self._loaded = False
        self.engine = EngineProcess(on_log=lambda line: self._log("engine", line, "debug"))
        await self.engine.start()
        for node in remote:
            self._phase(node, "load")
        self._phase(self.head, "load")
        progress = asyncio.create_task(self._report_load_progress(remote))
        started = time.perf_counter()
        split = engine_split(self.plan, self._device_memory())
        self._loading = True
        try:
            loaded = await self.engine.load(Load(
                model=str(self.model_path),
                context=self.inventory.model.context,
                endpoints=tuple(self._endpoints(remote)),
                tensor_split=split.tensor_split,
                n_gpu_layers=split.n_gpu_layers,
                threads=self.inventory.head.threads,
                parallel=self.parallel,
            ))
        except EngineError as err:
            failed = await self._find_failed_stage()
            if failed is not None:
                raise HostError(f"stage failed while loading: {failed.reason}", host=failed.name) from err
            raise
        finally:
            self._loading = False
            progress.cancel()
        self.load_seconds = time.perf_counter() - started
        tunnels = self._tunnels(remote)
        self.load_bytes_sent = sum(t.meter.bytes_up for t in tunnels.values())
        endpoint_names = {t.endpoint: name for name, t in tunnels.items()}
        if self.local_stage is not None and self.plan.output_on_head:
            endpoint_names[self.local_stage.endpoint] = HEAD_NAME
        self.placement = placement_by_node(loaded.placement, loaded.device_endpoints, endpoint_names)
        check_placement(self.placement, self.plan)
        for name, tunnel in tunnels.items():
            self._emit(ev.TransferProgressed(name, "load", tunnel.meter.bytes_up, None))
        self._emit(ev.ModelLoaded(self.load_seconds, self.load_bytes_sent, dict(self.placement)))
        self._loaded = True
        for node in [self.head, *remote]:
            self._phase(node, "ready")
        self._emit(ev.MeshReady())

    def _device_memory(self) -> dict[str, list[int]]:
        """Each remote stage's devices' free memory: a host serving several GPUs shares its layers by it."""
        return {name: [int(d.get("memory_free") or 0) for d in stage.agent.devices]
                for name, stage in self.stages.items() if stage.agent is not None}

    def _tunnels(self, nodes: Sequence[Node]) -> dict[str, StageTunnel]:
        """The open tunnels of these nodes' stages, in their order."""
        tunnels = {n.name: self.stages[n.name].tunnel for n in nodes if n.name in self.stages}
        return {name: t for name, t in tunnels.items() if t is not None}

    async def _report_load_progress(self, remote: Sequence[Node]) -> None:
        while True:
            await asyncio.sleep(0.25)
            for node in remote:
                tunnel = self.stages[node.name].tunnel
                if tunnel is not None:
                    self._emit(ev.TransferProgressed(node.name, "load", tunnel.meter.bytes_up,
                                                     node.planned_bytes or None))

    async def _measure_rtt_forever(self, interval: float = 2.0) -> None:
        while True:
            for node in self.hosts:
                stage = self.stages[node.name]
                await stage.ping()
                node.rtt_ms = stage.rtt_ms
            await asyncio.sleep(interval)

    # -- the step watchdog -----------------------------------------------------------------------
    async def _watch_stalls(self) -> None:
        """Notice a stage that stopped answering (frozen process, silent link) in about a second.

        The decisions are `meshtui.watchdog.judge`'s; this loop feeds it each stage's clock from its tunnel,
        asks the agent for a pong when a step is overdue, and declares the stage lost when none comes.
        """
        policy = self.stall_policy
        probes: dict[str, asyncio.Task[None]] = {}
        last_pong: dict[str, float] = {}
        while True:
            await asyncio.sleep(policy.tick)
            now = time.perf_counter()
            for node in self.hosts:
                stage = self.stages[node.name]
                agent = stage.agent
                if stage.tunnel is None or agent is None or node.lost_reason or node.status == "failed":
                    continue
                waiting_since = stage.waiting_since()
                if waiting_since is None:
                    last_pong.pop(node.name, None)  # each stall starts with no pong
                    if node.status == "stalled":
                        self._stall_ended(node)
                    continue
                deadline = (policy.load_deadline if self._loading
                            else policy.step_deadline([x.total_ms for x in list(node.latencies)[-64:]]))
                probe = probes.get(node.name)
                clock = StageClock(waiting_since, deadline, probing=probe is not None and not probe.done(),
                                   last_pong=last_pong.get(node.name))
                verdict = judge(policy, clock, now)
                if verdict is Verdict.PROBE:
                    if node.status != "stalled":
                        node.status = "stalled"
                        self._emit(ev.StageStalled(node.name, now - waiting_since))
                        self._log(node.name, f"no answer to {self._awaited()} for {now - waiting_since:.2f}s "
                                             f"(deadline {deadline:.2f}s); asking its agent", "warning")
                    probes[node.name] = asyncio.create_task(
                        self._probe_stalled(node, agent, waiting_since, last_pong))
                elif verdict is Verdict.LOST:
                    self._declare_lost(node, waiting_since,
                                       f"answers pings but not its step for {now - waiting_since:.0f}s")

    async def _probe_stalled(self, node: Node, agent: Agent, waiting_since: float,
                             last_pong: dict[str, float]) -> None:
        timeout = self.stall_policy.probe_timeout(node.rtt_ms)
        try:
            await agent.ping(timeout=timeout)
        except asyncio.CancelledError:
            if agent.alive:
                raise  # the watchdog itself is stopping
            return  # the agent exited: the ordinary failure path names why
        except (asyncio.TimeoutError, OSError, asyncssh.Error):
            if self.stages[node.name].agent is agent and not node.lost_reason:
                stalled = time.perf_counter() - waiting_since
                self._declare_lost(node, waiting_since,
                                   f"lost after a {stalled:.1f}s stall: no answer to {self._awaited()}, "
                                   f"nor to a ping within {timeout:.1f}s")
            return
        last_pong[node.name] = time.perf_counter()
        self._log(node.name, "its agent answers: the stage is slow, not lost", "debug")

    def _awaited(self) -> str:
        """What a stalled stage owes the engine, in the words of its log lines and its reason."""
        return "the model load" if self._loading else "its step"

    def _stall_ended(self, node: Node) -> None:
        node.status = "load" if self._loading else "ready"
        self._emit(ev.StageResponsive(node.name))
        self._log(node.name, "answered its step again", "info")

    def _declare_lost(self, node: Node, waiting_since: float, reason: str) -> None:
        """Take the stalled stage out: the engine (blocked on it inside ggml) is stopped and the mesh recovers."""
        node.lost_reason = reason
        node.stalled_seconds = time.perf_counter() - waiting_since
        self._log(node.name, reason, "error")
        self.stages[node.name].abort()
        if self.engine is not None:
            self.engine.kill()

    # -- all of it -------------------------------------------------------------------------------
    async def up(self) -> None:
        """Everything up to a loaded model; on failure, everything started so far is torn down."""
        try:
            self.read_model()
            await self.connect_and_probe()
            self.make_plan()
            await self.launch()
        except BaseException:
            await self.close()
            raise

    # -- generation ------------------------------------------------------------------------------
    async def stream(
        self,
        *,
        prompt: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        raw: bool = False,
        max_tokens: int = 256,
        temperature: float = 0.7,
        seed: int = 0,
    ) -> AsyncIterator[ev.Event]:
        """Yields ReplyStarted, TokenGenerated and StageLatencyMeasured events, then ReplyFinished.

        If a stage is lost mid-reply, the mesh is re-planned on the survivors, the engine restarts, the
        conversation and the reply so far are replayed to rebuild the KV cache, and the reply continues.
        """
        if self._rejoinable:
            await self._rejoin_ready_hosts()
        if self.engine is None:
            raise EngineError("the mesh is not up")
        self._request_ids += 1
        request_id = self._request_ids
        self._streaming_request = request_id
        command = Generate(id=request_id, prompt=None if messages is not None else prompt or "",
                           messages=tuple(messages) if messages is not None else None, raw=raw,
                           max_tokens=max_tokens, temperature=temperature, seed=seed)
        started = time.perf_counter()
        first_token_at: float | None = None
        last_token_at = started
        generated: list[int] = []
        text_parts: list[str] = []
        stop_reason = "length"
        announced = False
        while True:
            remote = [n for n in self.hosts if self.stages[n.name].tunnel is not None and n.layers is not None]
            for tunnel in self._tunnels(remote).values():
                tunnel.meter.reset_rounds()
            first_of_attempt = True
            try:
                assert self.engine is not None
                async for event in self.engine.generate(replace(command, resume_tokens=tuple(generated))):
                    if isinstance(event, Started) and not announced:
                        announced = True
                        yield self._emitted(ev.ReplyStarted(request_id, event.prompt_tokens))
                    elif isinstance(event, Token):
                        token_id, index = event.token_id, event.index
                        if token_id >= 0:
                            now = time.perf_counter()
                            first_token_at = first_token_at or now
                            last_token_at = now
                            generated.append(token_id)
                        text_parts.append(event.text)
                        yield self._emitted(ev.TokenGenerated(request_id, index, token_id, event.text))
                        # The first token of an attempt comes out of the prompt's prefill, not a decode.
                        if token_id >= 0 and not first_of_attempt:
                            for measured in self._stage_latencies(remote, event):
                                yield self._emitted(measured)
                        first_of_attempt = first_of_attempt and token_id < 0
                    elif isinstance(event, Done):
                        stop_reason = event.stop_reason
                break
            except EngineDied as err:
                failed = await self._wait_for_failed_stage()
                if failed is None:
                    raise
                await self._recover(failed, token_index=len(generated), cause=err)
        span = last_token_at - (first_token_at or last_token_at)
        tps = (len(generated) - 1) / span if len(generated) > 1 and span > 0 else 0.0
        yield self._emitted(ev.ReplyFinished(request_id, "".join(text_parts), tuple(generated),
                                             time.perf_counter() - started, tps, stop_reason))

    async def _wait_for_failed_stage(self, timeout: float = 10.0) -> Node | None:
        """The engine died: give the stage's own signals (channel closed, agent exited) a moment to arrive."""
        deadline = time.monotonic() + timeout
        while True:
            failed = await self._find_failed_stage()
            if failed is not None or time.monotonic() > deadline:
                return failed
            await asyncio.sleep(0.1)

    async def _recover(self, failed: Node, *, token_index: int, cause: BaseException) -> None:
        """Drop the failed node, re-plan on the survivors, restart the engine on the new split."""
        started = time.perf_counter()
        stalled_seconds = failed.stalled_seconds
        self._losses.setdefault(failed.name, []).append(time.monotonic())
        self._recovering = True
        try:
            self._emit(ev.MeshRecovering(failed.name, failed.reason))
            self._log("mesh", f"{failed.name} lost ({failed.reason}); re-planning on the survivors", "warning")
            await self._drop_node(failed)
            try:
                await self._replan_and_reload()  # closes the dead engine first
            except PlanError as err:
                raise MeshError(f"{failed.name} was lost ({failed.reason}) and the remaining nodes cannot hold the "
                                f"model: {err}") from cause
        finally:
            self._recovering = False
        recovery = Recovery(failed.name, token_index, time.perf_counter() - started, stalled_seconds)
        self.recoveries.append(recovery)
        self._emit(ev.MeshRecovered(failed.name, token_index, recovery.seconds, stalled_seconds))

    async def _replan_and_reload(self) -> None:
        """Plan over the nodes that are not failed, start agents where needed, load a fresh engine."""
        if self.engine is not None:
            with contextlib.suppress(MeshError, OSError):
                await self.engine.close()
            self.engine = None
        self.make_plan()
        remote = [self.node(a.name) for a in self.plan.remote] if self.plan else []
        newcomers = [n for n in remote if not self.stages[n.name].serving]
        _raise_first(await asyncio.gather(*(self._start_stage(n, local_runtime_bundle()) for n in newcomers),
                                          return_exceptions=True))
        await self._load_engine(remote)

    # -- rejoin ----------------------------------------------------------------------------------
    async def rejoin(self, name: str) -> None:
        """Bring a failed host back (between replies): reconnect, probe, re-plan with it, reload."""
        node = self.node(name)
        if node.is_head or node.status != "failed":
            raise MeshError(f"{name} has not failed; nothing to rejoin")
        await self._drop_node(node)
        await self._connect_one(node, rejoining=True)  # marks the node failed again, with the reason, if it can't
        node.reason = ""
        self._log("mesh", f"{name} is reachable again; re-planning with it", "warning")
        await self._replan_and_reload()
        self._emit(ev.HostRejoined(name))

    def enable_auto_rejoin(self, policy: RejoinPolicy | None = None) -> None:
        """Keep retrying failed hosts in the background; a reachable one rejoins before the next reply."""
        self.rejoin_policy = policy or RejoinPolicy()
        if self._rejoin_task is None:
            self._rejoin_task = asyncio.create_task(self._watch_failed_hosts())

    async def _watch_failed_hosts(self) -> None:
        assert self.rejoin_policy is not None
        policy = self.rejoin_policy
        attempts: dict[str, int] = {}
        next_try: dict[str, float] = {}
        while True:
            await asyncio.sleep(policy.poll_seconds)
            for node in self.hosts:
                if node.status != "failed" or node.name in self._rejoinable:
                    attempts.pop(node.name, None)
                    next_try.pop(node.name, None)
                    continue
                now = time.monotonic()
                if node.name not in next_try:
                    losses = self._losses.get(node.name, [])
                    hold = policy.hold_out(losses, now)
                    next_try[node.name] = (losses[-1] if losses else now) + hold
                    if hold > policy.first_delay:
                        recent = policy.recent_losses(losses, now)
                        self._log(node.name, f"lost {recent} times lately: held out for {hold:.0f}s", "warning")
                    continue
                if now < next_try[node.name]:
                    continue
                count = attempts[node.name] = attempts.get(node.name, 0) + 1
                if policy.max_attempts is not None and count > policy.max_attempts:
                    continue
                err = await self.stages[node.name].unreachable()
                if err is not None:
                    delay = policy.retry_delay(count)
                    next_try[node.name] = time.monotonic() + delay
                    self._log(node.name, f"rejoin attempt {count} failed: {err}; next in {delay:.0f}s", "debug")
                    continue
                self._rejoinable.add(node.name)
                self._log(node.name, "reachable again; it rejoins before the next reply", "warning")

    async def _rejoin_ready_hosts(self) -> None:
        for name in sorted(self._rejoinable):
            self._rejoinable.discard(name)
            try:
                await self.rejoin(name)
            except MeshError as err:
                self._log(name, f"rejoin failed: {err}", "warning")
                if self.engine is None:  # the failed rejoin took the engine down: rebuild without it
                    await self._replan_and_reload()

    async def _drop_node(self, node: Node) -> None:
        node.layers = None
        await self.stages[node.name].drop(stalled=bool(node.lost_reason))
        node.lost_reason = ""
        node.stalled_seconds = None

    def _emitted(self, event: ev.Event) -> ev.Event:
        self._emit(event)
        return event

    def _stage_latencies(self, remote: Sequence[Node], token: Token) -> list[ev.StageLatencyMeasured]:
        """Each stage's round trip for the decode call that produced `token`, from its tunnel's meter; then the
        head's share: the decode call's time less every stage's round trip (its layers, the output layer on its
        local stage), when every stage's round trip is known."""
        measured = []
        tunnels = self._tunnels(remote)
        for node in remote:
            meter = tunnels[node.name].meter
            rounds = meter.rounds
            if token.decode_call >= len(rounds) or meter.rounds_since_reset != len(rounds):
                continue
            r = rounds[token.decode_call]
            sample = ev.StageLatencyMeasured(
                node.name, token.index, r.ms, min(node.rtt_ms or 0.0, r.ms), r.bytes_up, r.bytes_down)
            node.latencies.append(sample)
            measured.append(sample)
        head_holds_layers = self.plan is not None and (self.plan.head.n_layers > 0 or self.plan.output_on_head)
        if head_holds_layers and token.decode_ms > 0 and len(measured) == len(remote):
            head_ms = max(0.0, token.decode_ms - sum(s.total_ms for s in measured))
            sample = ev.StageLatencyMeasured(HEAD_NAME, token.index, head_ms, 0.0, 0, 0)
            self.head.latencies.append(sample)
            measured.append(sample)
        return measured

    async def generate(self, **kwargs: Any) -> Reply:
        prompt_tokens = 0
        async for event in self.stream(**kwargs):
            if isinstance(event, ev.ReplyStarted):
                prompt_tokens = event.prompt_tokens
            if isinstance(event, ev.ReplyFinished):
                return Reply(event.text, event.token_ids, prompt_tokens, event.seconds,
                             event.tokens_per_second, event.stop_reason)
        raise EngineError("the engine ended the reply without finishing it")

    def cancel(self, request_id: int | None = None) -> None:
        """Stop a reply (its stream then ends with stop_reason "cancelled"): that request's, or the one under way."""
        if self.engine is not None:
            self.engine.cancel(request_id if request_id is not None else self._streaming_request)

    @property
    def ready(self) -> bool:
        """Whether a reply can start now: the model is loaded and no recovery is under way."""
        return self.engine is not None and self.engine.alive and self._loaded and not self._recovering

    async def _find_failed_stage(self) -> Node | None:
        """After the engine died: which stage took it down, and why, in words a user can act on."""
        for node in self.hosts:
            if node.layers is None or node.status == "failed":
                continue
            reason = node.lost_reason or await self.stages[node.name].cause_of_loss()
            if reason:
                self._fail(node, "serve", reason)
                self._emit(ev.StageFailed(node.name, reason))
                return node
        return None

    # -- reporting -------------------------------------------------------------------------------
    def predict(self) -> Prediction | None:
        """Predicted decode speed of the current plan from probed bandwidth and measured round trips."""
        if self.plan is None or self.model is None:
            return None
        bandwidth = {n.name: (n.facts.mem_bandwidth if n.facts else None) for n in self.nodes}
        return predict_decode(self.plan, self.model, bandwidth, {n.name: n.rtt_ms for n in self.nodes})

    def summary(self) -> list[dict[str, Any]]:
        rows = []
        for node in self.nodes:
            lat = node.latency_summary()
            rows.append({
                "name": node.name,
                "address": node.address,
                "status": node.status,
                "reason": node.reason or None,
                "layers": list(node.layers) if node.layers else None,
                "usable_bytes": node.usable_bytes,
                "planned_bytes": node.planned_bytes,
                "device": node.device,
                "latency_ms": {"last": lat["last"], "mean": lat["mean"], "p95": lat["p95"]},
                "network_rtt_ms": lat["network"],
                "bytes_per_token": (statistics.fmean(x.bytes_up + x.bytes_down for x in node.latencies)
                                    if node.latencies else None),
            })
        return rows

    # -- teardown --------------------------------------------------------------------------------
    async def close(self) -> None:
        """Stop the engine, the tunnels, the agents and the connections. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for task in (self._rtt_task, self._rejoin_task, self._stall_task):
            if task is not None:
                task.cancel()
        if self.engine is not None:
            with contextlib.suppress(MeshError, OSError):
                await self.engine.close()
        if self.local_stage is not None:
            await self.local_stage.close()
        await asyncio.gather(*(stage.close() for stage in self.stages.values()), return_exceptions=True)
        for node in self.nodes:
            if node.status not in ("failed",):
                node.status = "stopped"


def _raise_first(results: Sequence[object]) -> None:
    """After a gather across hosts: a bug (not a MeshError) wins, else the first host's failure."""
    errors = [r for r in results if isinstance(r, BaseException)]
    for err in errors:
        if not isinstance(err, MeshError):
            raise err
    if errors:
        raise errors[0]


def _probe_head() -> dict[str, Any]:
    """The head is probed by the same code as the hosts, run in-process."""
    result: dict[str, Any] = load_file_module(agent_source_path(), "meshtui_agent_local").probe()
    return result
