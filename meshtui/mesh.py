"""The orchestrator: the sequence of a mesh's life (up, stream, recover, rejoin, close).

Decisions are made by pure functions (capacity, planner, placement, watchdog, rejoin policy); the steps are
performed by the modules that own them (`stage` per host, `loading` for the engine, `stallwatch` and
`rejoinwatch` in the background) and reported as events. It never imports the UI.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from pathlib import Path
from typing import Any

from meshtui import capacity
from meshtui import events as ev
from meshtui.capacity import HEAD_NAME, ProbedHost
from meshtui.engine.client import EngineDied, EngineProcess
from meshtui.engine.drafts import CALIBRATE_POSITIONS
from meshtui.engine.protocol import Generate
from meshtui.engineslot import EngineSlot
from meshtui.errors import EngineError, InventoryError, MeshError, PlanError, raise_first
from meshtui.gguf_facts import ModelFacts, read_model_facts
from meshtui.hosts import HostFacts
from meshtui.inflight import InFlight
from meshtui.inventory import Inventory
from meshtui.loading import LoadRequest, check_protocols, ensure_local_stage, load_engine, stage_tunnels
from meshtui.localstage import LocalStage
from meshtui.models import resolve_draft_path, resolve_model_path
from meshtui.node import Node, NodeSink, Recovery
from meshtui.planner import NodeCapacity, Plan, plan_layer_split
from meshtui.predict import Prediction
from meshtui.provision import connect_node, measure_rtt_forever, start_stage
from meshtui.recovery import drop_node, find_failed_stage, wait_for_failed_stage
from meshtui.rejoin import RejoinPolicy
from meshtui.rejoinwatch import RejoinWatch
from meshtui.replyloop import ReplyLoop, Route, check_speculative, collect_reply
from meshtui.report import predict, probe_head
from meshtui.runtime import local_runtime_bundle
from meshtui.stage import Stage, StageReport
from meshtui.stallwatch import StallWatch
from meshtui.state import MeshState, apply, initial_state, is_ready
from meshtui.streaming import Reply
from meshtui.watchdog import StallPolicy
from meshtui.weights import HostLoad

__all__ = ["Mesh", "Node", "Recovery", "RejoinPolicy", "Reply", "StallPolicy"]

DEFAULT_PARALLEL = 4  # replies decoded together unless --parallel says otherwise


class Mesh:
    def __init__(self, inventory: Inventory, *, accept_new: bool = False,
                 listener: ev.Listener = lambda event: None, output_on_head: bool = True,
                 weight_by_speed: bool = False, stall_policy: StallPolicy | None = None,
                 parallel: int = DEFAULT_PARALLEL, speculative: str = "auto") -> None:
        if parallel < 1:
            raise InventoryError(f"--parallel: expected at least 1, not {parallel}")
        check_speculative(speculative, "--speculative", InventoryError)
        if speculative == "draft" and inventory.model.draft is None:
            raise InventoryError(f"{inventory.source}: --speculative draft needs a draft model: set [model] draft "
                                 "to a builtin name or a GGUF path")
        self.speculative = speculative  # each reply's drafts, unless the reply asks otherwise
        self.inventory = inventory
        self.parallel = parallel  # replies in flight at once, each a sequence the engine decodes with the others
        self.accept_new = accept_new
        self.output_on_head = output_on_head
        self.weight_by_speed = weight_by_speed
        self.local_stage: LocalStage | None = None
        self.listener = listener
        self.sink = NodeSink(self._emit)
        self.head = Node(name=HEAD_NAME, address="127.0.0.1", is_head=True)
        self.hosts = [Node(name=h.name, address=h.address) for h in inventory.hosts]
        self.stages = {h.name: Stage(h, inventory.ssh, self._stage_report(h.name)) for h in inventory.hosts}
        self.model_path: Path | None = None
        self.draft_path: Path | None = None  # the inventory's draft model, when it names one
        self.model: ModelFacts | None = None
        self.plan: Plan | None = None
        self._engine = EngineSlot(self._emit, on_log=lambda line: self.sink.log("engine", line, "debug"))
        self.load_seconds = 0.0
        self.load_bytes_sent = 0
        self.host_loads: dict[str, HostLoad] = {}  # the last load, per host: bytes sent, weights found cached
        self.step_costs: tuple[float, ...] = ()  # the last load's calibration: a step of 1, 2, ... positions (ms)
        self.placement: dict[str, list[int]] = {}
        self._request_ids = 0
        self.recoveries: list[Recovery] = []
        self.rejoin_policy: RejoinPolicy | None = None
        self._rejoin_task: asyncio.Task[None] | None = None
        self._rejoinable: set[str] = set()
        self._flights = InFlight()  # the replies in flight, and the one recovery or rejoin at a time
        self._replies = ReplyLoop(self._flights, self._route, self._engine_died, self._emit)
        self._rtt_task: asyncio.Task[None] | None = None
        self.stall_policy = stall_policy or StallPolicy()
        self._stall_task: asyncio.Task[None] | None = None
        self._loading = False
        self._losses: dict[str, list[float]] = {}  # monotonic times each host was lost, for the flap hold-out
        self._closed = False
        # What the events told so far: what the views, `--json` and readiness read (see meshtui/state.py).
        self.state: MeshState = initial_state((h.name, h.address) for h in inventory.hosts)

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def engine(self) -> EngineProcess | None:
        """The engine process now (None between a stop and the next load)."""
        return self._engine.engine

    @property
    def nodes(self) -> list[Node]:
        return [self.head, *self.hosts]

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    @property
    def rejoin_pending(self) -> frozenset[str]:
        """Failed hosts found reachable again: they rejoin before the next reply."""
        return frozenset(self._rejoinable)

    def _emit(self, event: ev.Event) -> None:
        """Fold the event into `state`, then tell the listener."""
        self.state = apply(self.state, event)
        self.listener(event)

    def _stage_report(self, name: str) -> StageReport:
        return StageReport(
            phase=lambda phase, detail: self.sink.phase(self.node(name), phase, detail),
            build=lambda step: self.sink.phase(self.node(name), "push", step, building=True),
            log=lambda message, level: self.sink.log(name, message, level),
            progress=lambda done, total: self._emit(ev.TransferProgressed(name, "push", done, total)),
        )

    # -- step 1: model and hosts -----------------------------------------------------------------
    def read_model(self) -> ModelFacts:
        self.model_path = resolve_model_path(self.inventory.model)
        self.draft_path = resolve_draft_path(self.inventory.model)
        self.model = read_model_facts(self.model_path)
        self.sink.log("model", f"{self.model.name}: {self.model.n_layer} layers, {self.model.file_size} bytes")
        return self.model

    async def connect_and_probe(self) -> None:
        """Connect to every host and probe it, concurrently. Any failure is fatal and named."""
        self.head.facts = HostFacts.from_json(probe_head())
        self._emit(ev.HostProbed(HEAD_NAME, self.head.facts.to_json()))
        raise_first(await asyncio.gather(*(self._connect_one(n) for n in self.hosts), return_exceptions=True))

    async def _connect_one(self, node: Node, *, rejoining: bool = False) -> None:
        # --accept-new applies when the mesh starts; a rejoin takes only the key accepted then.
        await connect_node(node, self.stages[node.name], self.sink, accept_new=self.accept_new and not rejoining)

    # -- step 2: plan (pure) ---------------------------------------------------------------------
    def _probed_hosts(self) -> list[ProbedHost]:
        """The hosts still in the mesh (probed, not failed), as the capacity rule needs them."""
        return [ProbedHost(self.stages[n.name].spec, n.facts) for n in self.hosts
                if n.status != "failed" and n.facts is not None]

    def _speeds(self, capacities: Sequence[NodeCapacity]) -> list[float] | None:
        """Each planned node's probed memory bandwidth, when the split is to follow speed."""
        if not self.weight_by_speed:
            return None
        bandwidth = {n.name: n.facts.mem_bandwidth if n.facts else None for n in self.nodes}
        speeds, unmeasured = capacity.bandwidth_speeds([c.name for c in capacities], bandwidth)
        if speeds is None:
            self.sink.log(unmeasured, "no speed measurement: splitting by memory only", "warning")
        return speeds

    def make_plan(self) -> Plan:
        if self.model is None or self.head.facts is None:
            raise MeshError("the model and the head must be read before planning")
        capacities = capacity.capacities(self.model, self.inventory.head, self.head.facts, self._probed_hosts())
        self.plan = plan_layer_split(self.model, capacities, self.inventory.model.context,
                                     output_on_head=self.output_on_head, speeds=self._speeds(capacities),
                                     parallel=self.parallel)
        for a in self.plan.assignments:
            self.node(a.name).layers = (a.start, a.end) if a.n_layers else None
        self._emit(ev.PlanComputed(self.plan))
        return self.plan

    # -- step 3: launch --------------------------------------------------------------------------
    def _remote(self) -> list[Node]:
        """The hosts the plan gives layers to, in its order."""
        return [self.node(a.name) for a in self.plan.remote] if self.plan else []

    async def launch(self) -> None:
        """Push and start agents on the nodes that hold layers, open tunnels, load the model."""
        remote = self._remote()
        for node in self.hosts:
            if node not in remote:
                node.status = "idle"
                self._emit(ev.HostPhaseChanged(node.name, "idle", "holds no layers"))
        await self._start_stages(remote)
        watch = StallWatch(self.hosts, self.stages, self.stall_policy, self.sink,
                           loading=lambda: self._loading, on_lost=self._engine.kill,
                           step_times=lambda name: [x.total_ms for x in self.state.node(name).latencies])
        self._stall_task = asyncio.create_task(watch.run())
        await self._load_engine(remote)
        self._rtt_task = asyncio.create_task(measure_rtt_forever(self.hosts, self.stages, self.sink))

    async def _start_stages(self, nodes: Sequence[Node]) -> None:
        bundle = local_runtime_bundle()
        starts = (start_stage(n, self.stages[n.name], bundle, self.sink) for n in nodes)
        raise_first(await asyncio.gather(*starts, return_exceptions=True))

    async def _load_engine(self, remote: Sequence[Node]) -> None:
        if self.plan is None or self.model_path is None:
            raise MeshError("the model must be read and planned before loading")
        await check_protocols(self.stages, remote)
        self.local_stage = await ensure_local_stage(self.plan, self.local_stage, self.inventory.head.threads,
                                                    self.sink)
        engine = await self._engine.start()
        request = LoadRequest(self.model_path, self.inventory.model.context, self.inventory.head.threads, self.plan,
                              self.parallel, self.draft_path, self.model,
                              # Timed at the first load; a reload after a lost or rejoined node keeps those
                              # timings (a second of steps would lengthen every recovery).
                              calibrate=0 if self.speculative == "off" or self.step_costs else CALIBRATE_POSITIONS,
                              step_ms=self.step_costs)
        self._loading = True
        try:
            loaded = await load_engine(engine, request, head=self.head, remote=remote, stages=self.stages,
                                       local_stage=self.local_stage, sink=self.sink,
                                       failed_stage=self._find_failed_stage)
        finally:
            self._loading = False
        self.load_seconds, self.load_bytes_sent, self.placement = loaded.seconds, loaded.bytes_sent, loaded.placement
        self.host_loads = loaded.hosts
        self.step_costs = loaded.step_ms
        for node in [self.head, *remote]:
            self.sink.phase(node, "ready")
        self._emit(ev.MeshReady())

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
        speculative: str | None = None,
        source: str = "",
        sampling: Mapping[str, Any] | None = None,
    ) -> AsyncGenerator[ev.Event, None]:
        """Yields ReplyStarted, TokenGenerated and StageLatencyMeasured events, then DraftsVerified and
        ReplyFinished (or, when it cannot finish, raises after telling ReplyFailed). `speculative` overrides the
        mesh's mode for this reply; `source` says whose reply it is ("chat", "api"); `sampling`: more Generate fields.

        Several replies may stream at once (up to `parallel`: the `ReplyQueue` admits them), each a sequence the
        engine decodes with the others. If a stage is lost mid-reply, the mesh is re-planned on the survivors
        (once, however many replies saw it), the engine restarts, and every reply in flight replays its
        conversation and what it generated so far to rebuild its KV cache, and continues where it stopped.
        """
        await self._flights.settled()
        if self._rejoinable and not self._flights.replies:  # a rejoin reloads the engine: only between replies
            self._flights.change(self._rejoin_ready_hosts())
            await self._flights.settled()
        if self.engine is None:
            raise EngineError("the mesh is not up")
        self._request_ids += 1
        command = Generate(id=self._request_ids, prompt=None if messages is not None else prompt or "",
                           messages=tuple(messages) if messages is not None else None, raw=raw,
                           max_tokens=max_tokens, temperature=temperature, seed=seed,
                           speculative=speculative or self.speculative, **(sampling or {}))
        async with contextlib.aclosing(self._replies.stream(command, source)) as events:
            async for event in events:
                yield event

    def _route(self) -> Route:
        """What a reply's next attempt goes through: the engine now, the stages holding layers, their tunnels."""
        remote = [n for n in self.hosts if self.stages[n.name].tunnel is not None and n.layers is not None]
        return Route(self.engine, remote, stage_tunnels(self.stages, remote), self.plan)

    def _engine_died(self, engine: EngineProcess, cause: EngineDied, token_index: int) -> None:
        """A reply saw `engine` die: the first to see it starts the recovery, the others join it."""
        if self.engine is engine:
            self._flights.change(self._recover_from(cause, token_index=token_index))

    async def generate(self, **kwargs: Any) -> Reply:
        """The whole reply at once (`stream`'s arguments)."""
        return await collect_reply(self.stream(**kwargs))

    def cancel(self, request_id: int | None = None) -> None:
        """Stop a reply (its stream then ends with stop_reason "cancelled"): that request's, or every one in flight."""
        if self.engine is not None:
            for rid in [request_id] if request_id is not None else list(self._flights.replies):
                self.engine.cancel(rid)

    @property
    def ready(self) -> bool:
        """Whether a reply can start now: the model is loaded and no recovery is under way (`state.is_ready`)."""
        return is_ready(self.state)

    # -- recovery --------------------------------------------------------------------------------
    async def _find_failed_stage(self) -> Node | None:
        return await find_failed_stage(self.hosts, self.stages, self.sink)

    async def _recover_from(self, cause: EngineDied, *, token_index: int) -> None:
        """The engine died under the replies in flight: find the stage that took it down, then recover."""
        failed = await wait_for_failed_stage(self.hosts, self.stages, self.sink)
        if failed is None:
            raise cause
        await self._recover(failed, token_index=token_index, cause=cause)

    async def _recover(self, failed: Node, *, token_index: int, cause: BaseException) -> None:
        """Drop the failed node, re-plan on the survivors, restart the engine on the new split."""
        started = time.perf_counter()
        stalled_seconds = failed.stalled_seconds
        self._losses.setdefault(failed.name, []).append(time.monotonic())
        self._emit(ev.MeshRecovering(failed.name, failed.reason))
        try:
            self.sink.log("mesh", f"{failed.name} lost ({failed.reason}); re-planning on the survivors", "warning")
            await drop_node(failed, self.stages[failed.name])
            try:
                await self._replan_and_reload()  # closes the dead engine first
            except PlanError as err:
                raise MeshError(f"{failed.name} was lost ({failed.reason}) and the remaining nodes cannot hold the "
                                f"model: {err}") from cause
        except BaseException as err:  # told, then raised as it is: the reply (or the caller) reports it
            self._emit(ev.RecoveryFailed(failed.name, str(err) or type(err).__name__))
            raise
        recovery = Recovery(failed.name, token_index, time.perf_counter() - started, stalled_seconds)
        self.recoveries.append(recovery)
        self._emit(ev.MeshRecovered(failed.name, token_index, recovery.seconds, stalled_seconds))

    async def _replan_and_reload(self) -> None:
        """Plan over the nodes that are not failed, start agents where needed, load a fresh engine."""
        await self._engine.stop("reloading on a new plan")
        self.make_plan()
        remote = self._remote()
        newcomers = [n for n in remote if not self.stages[n.name].serving]
        await self._start_stages(newcomers)
        await self._load_engine(remote)

    # -- rejoin ----------------------------------------------------------------------------------
    async def rejoin(self, name: str) -> None:
        """Bring a failed host back (between replies): reconnect, probe, re-plan with it, reload."""
        node = self.node(name)
        if node.is_head or node.status != "failed":
            raise MeshError(f"{name} has not failed; nothing to rejoin")
        await drop_node(node, self.stages[name])
        await self._connect_one(node, rejoining=True)  # marks the node failed again, with the reason, if it can't
        node.reason = ""
        self.sink.log("mesh", f"{name} is reachable again; re-planning with it", "warning")
        await self._replan_and_reload()
        self._emit(ev.HostRejoined(name))

    def enable_auto_rejoin(self, policy: RejoinPolicy | None = None) -> None:
        """Keep retrying failed hosts in the background; a reachable one rejoins before the next reply."""
        self.rejoin_policy = policy or RejoinPolicy()
        if self._rejoin_task is None:
            watch = RejoinWatch(self.hosts, self.stages, self.rejoin_policy, self.sink,
                                losses=self._losses, rejoinable=self._rejoinable)
            self._rejoin_task = asyncio.create_task(watch.run())

    async def _rejoin_ready_hosts(self) -> None:
        for name in sorted(self._rejoinable):
            self._rejoinable.discard(name)
            try:
                await self.rejoin(name)
            except MeshError as err:
                self.sink.log(name, f"rejoin failed: {err}", "warning")
                if self.engine is None:  # the failed rejoin took the engine down: rebuild without it
                    await self._replan_and_reload()

    # -- reporting -------------------------------------------------------------------------------
    def predict(self) -> Prediction | None:
        """Predicted decode speed of the current plan from probed bandwidth and measured round trips."""
        return predict(self.state, self.model)

    # -- teardown --------------------------------------------------------------------------------
    async def close(self) -> None:
        """Stop the engine, the tunnels, the agents and the connections. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for task in (self._rtt_task, self._rejoin_task, self._stall_task):
            if task is not None:
                task.cancel()
        await self._flights.close()
        await self._engine.close("the mesh is closing")
        if self.local_stage is not None:
            await self.local_stage.close()
        await asyncio.gather(*(stage.close() for stage in self.stages.values()), return_exceptions=True)
        for node in self.nodes:
            if node.status not in ("failed",):
                node.status = "stopped"
        self._emit(ev.MeshClosed())
