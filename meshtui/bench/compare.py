"""`meshtui bench` without sweeps: one fixed prompt set, greedy, through every mode in one run, side by side."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshtui import events as ev
from meshtui.bench.modes import BenchContext, MeshMode, TcpMode, head_alone
from meshtui.bench.timing import machine_facts, mem_available, warm_page_cache
from meshtui.capacity import HEAD_RESERVE_BYTES
from meshtui.errors import InventoryError, PlanError
from meshtui.gguf_facts import ModelFacts, read_model_facts
from meshtui.inventory import Inventory
from meshtui.mesh import Mesh
from meshtui.models import resolve_model_path
from meshtui.placement import engine_split
from meshtui.planner import Plan

# Raw prompts (no chat template), short and fixed, so runs on different days compare.
PROMPTS: tuple[str, ...] = (
    "The three primary colors are",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The capital of France is Paris. The capital of Italy is",
    "A list of the planets of the solar system, in order from the sun:",
)

Mode = MeshMode | TcpMode


@dataclass(frozen=True)
class BenchOptions:
    prompts: int = 3
    max_tokens: int = 48
    tcp_stages: Mapping[str, str] = field(default_factory=dict)  # node name -> "host:port"
    parallel: int | None = None  # Mesh(parallel=N); None: up's default

    def mesh_options(self) -> dict[str, Any]:
        return {"parallel": self.parallel} if self.parallel is not None else {}


def check_counts(prompts: int, available: int, max_tokens: int) -> None:
    if not 1 <= prompts <= available:
        raise InventoryError(f"--prompts: expected 1 to {available}")
    if max_tokens < 2:
        raise InventoryError("--max-tokens: expected at least 2 (decode speed needs two tokens)")


def check_tcp_stages(plan: Plan, tcp_stages: Mapping[str, str]) -> None:
    names = [a.name for a in plan.remote]
    missing = [n for n in names if n not in tcp_stages]
    unknown = sorted(set(tcp_stages) - set(names))
    if missing or unknown:
        raise InventoryError(f"--tcp-stages must name exactly the stages of the plan ({', '.join(names)})"
                             + (f"; missing {', '.join(missing)}" if missing else "")
                             + (f"; not stages: {', '.join(unknown)}" if unknown else ""))


def can_hold(model: ModelFacts, copies: int) -> bool:
    """Whether `copies` loaded copies of the model (with the page cache's) fit this machine at once.

    Modes held at once take prompts in turns, so a busy machine's drift hits every mode alike; a lab's stages
    share the head's machine, so every copy counts.
    """
    return (copies + 1) * model.file_size + HEAD_RESERVE_BYTES < mem_available()


def bench_header(inventory: Inventory, model_path: Any, facts: ModelFacts) -> dict[str, Any]:
    return {"machine": machine_facts(),
            "model": {"name": facts.name, "path": str(model_path), "file_bytes": facts.file_size,
                      "n_layer": facts.n_layer, "context": inventory.model.context}}


async def run_bench(inventory: Inventory, options: BenchOptions, *, accept_new: bool = False,
                    listener: ev.Listener = lambda event: None, progress: Callable[[str], None] = lambda line: None,
                    on_engine_log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Load every mode (never two loads at once), run the prompts, then a second load over SSH."""
    check_counts(options.prompts, len(PROMPTS), options.max_tokens)
    model_path = resolve_model_path(inventory.model)
    facts = read_model_facts(model_path)
    warm_page_cache(model_path)
    prompts = PROMPTS[:options.prompts]
    ctx = BenchContext(inventory, model_path, options.max_tokens, progress, on_engine_log, accept_new, listener)
    interleaved = can_hold(facts, 3 if options.tcp_stages else 2)
    report: dict[str, Any] = {
        **bench_header(inventory, model_path, facts),
        "settings": {"prompts": list(prompts), "max_tokens": ctx.max_tokens, "temperature": 0.0,
                     "parallel": options.parallel,
                     "warmup": {"prompt": "Hello", "tokens": 4},
                     "schedule": "interleaved" if interleaved else "sequential",
                     "head_threads": inventory.head.threads,
                     "host_threads": {h.name: h.threads for h in inventory.hosts}},
        "runs": [], "skipped": [],
    }
    if not options.tcp_stages:
        report["skipped"].append({"mode": "tcp", "reason": "no --tcp-stages given"})
    single = MeshMode(ctx, "single", head_alone(inventory), **options.mesh_options())
    mesh_mode = MeshMode(ctx, "ssh", inventory, **options.mesh_options())
    modes: list[Mode] = [single, mesh_mode]
    opened: list[Mode] = []
    try:
        index = 0
        while index < len(modes):  # "tcp" joins once the mesh has a plan
            mode = modes[index]
            index += 1
            try:
                await mode.open()
            except PlanError as err:
                if mode is not single:
                    raise
                report["skipped"].insert(0, {"mode": "single", "reason": str(err)})
                continue
            opened.append(mode)
            if not interleaved:
                await _run_prompts([mode], prompts, ctx)
                await mode.close()
            if mode is mesh_mode and options.tcp_stages:
                assert mesh_mode.plan is not None
                check_tcp_stages(mesh_mode.plan, options.tcp_stages)
                modes.append(TcpMode(ctx, mesh_mode.plan, options.tcp_stages))
        if interleaved:
            await _run_prompts(opened, prompts, ctx)
    finally:
        for mode in modes:
            await mode.close()
    assert mesh_mode.plan is not None
    plan = mesh_mode.plan
    report["runs"] = [mode.result() for mode in opened]
    report["plan"] = {"assignments": plan.to_json(), "n_gpu_layers": plan.n_gpu_layers,
                      "tensor_split": list(engine_split(plan).tensor_split)}
    report.update(await _reload_over_ssh(ctx, plan, options.mesh_options()))
    by_mode = {run["mode"]: run for run in report["runs"]}
    ssh_tps = by_mode["ssh"]["decode_tokens_per_second"]
    tcp_tps = by_mode.get("tcp", {}).get("decode_tokens_per_second")
    report["ssh_over_tcp_decode_ratio"] = ssh_tps / tcp_tps if ssh_tps and tcp_tps else None
    single_tps = by_mode.get("single", {}).get("decode_tokens_per_second")
    report["ssh_over_single_decode_ratio"] = ssh_tps / single_tps if ssh_tps and single_tps else None
    outputs = [[r.token_ids for r in mode.replies] for mode in opened]
    report["outputs_identical"] = all(o == outputs[0] for o in outputs)
    return report


async def _reload_over_ssh(ctx: BenchContext, plan: Plan, mesh_options: dict[str, Any]) -> dict[str, Any]:
    """A second mesh on the same hosts: their weights cache spares every tensor from 64 KiB (docs/architecture.md)."""
    ctx.progress("ssh: second load on the same hosts (hosts keep the weights they were sent)")
    mesh = Mesh(ctx.inventory, accept_new=ctx.accept_new, listener=ctx.listener, **mesh_options)
    try:
        await mesh.up()
        same_plan = mesh.plan is not None and mesh.plan.assignments == plan.assignments
        return {"reload_bytes_sent": mesh.load_bytes_sent, "reload_seconds": mesh.load_seconds,
                "reload_same_plan": same_plan,
                "reload_by_host": {name: load.to_json() for name, load in mesh.host_loads.items()}}
    finally:
        await mesh.close()


async def _run_prompts(modes: Sequence[Mode], prompts: Sequence[str], ctx: BenchContext) -> None:
    """Each prompt through every mode, the order rotating from prompt to prompt."""
    for i, prompt in enumerate(prompts):
        turn = [modes[(i + k) % len(modes)] for k in range(len(modes))]
        for mode in turn:
            await mode.reply(prompt)
        ctx.progress(f"prompt {i + 1}/{len(prompts)} done ({', '.join(m.mode for m in turn)})")
