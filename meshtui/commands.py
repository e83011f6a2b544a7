"""Each command's runner: up (the TUI, or one headless reply), serve, plan, bench, down.

`meshtui/cli.py` parses the arguments and hands them here; a runner returns the exit status or raises a
`MeshError` (one line). `up` is the one door from the core to the UI: it imports `meshtui.tui` lazily.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import AsyncIterator
from typing import Any, TextIO

from meshtui import events as ev
from meshtui.errors import InventoryError, MeshError
from meshtui.inventory import ModelSpec, load_inventory
from meshtui.lab import EmbeddedLab
from meshtui.mesh import Mesh
from meshtui.placement import engine_split
from meshtui.report import summary as node_summary
from meshtui.text import printable
from meshtui.units import format_size, load_done, load_transfer

HEADLESS_MAX_TOKENS = 128
TUI_MAX_TOKENS = 256


@contextlib.asynccontextmanager
async def _inventory_for(args: argparse.Namespace) -> AsyncIterator[Any]:
    """The inventory named on the command line, or an embedded lab's (started and stopped here)."""
    lab: EmbeddedLab | None = None
    try:
        if args.inventory is not None:
            inventory = load_inventory(args.inventory)
        else:
            if args.lab_hosts < 1:
                raise InventoryError("--lab-hosts: expected at least 1")
            lab = EmbeddedLab(n_hosts=args.lab_hosts)
            await lab.start()
            inventory = lab.inventory(ModelSpec(path=None, name="smollm2", context=2048))
        model = inventory.model
        if getattr(args, "model", None) is not None:
            model = dataclasses.replace(model, path=args.model.expanduser().resolve(), name=None)
        if getattr(args, "context", None) is not None:
            if args.context < 16:
                raise InventoryError("--context: expected at least 16")
            model = dataclasses.replace(model, context=args.context)
        yield dataclasses.replace(inventory, model=model)
    finally:
        if lab is not None:
            await lab.close()


LOAD_PROGRESS_EVERY = 1.0  # seconds between a host's load progress lines on stderr


def _stderr_listener(verbose: bool) -> ev.Listener:
    loads: dict[str, ev.TransferProgressed] = {}
    shown: dict[str, float] = {}

    def listen(event: ev.Event) -> None:
        if isinstance(event, ev.TransferProgressed) and event.phase == "load" and event.sent_bytes is not None:
            loads[event.host] = event
            now = time.monotonic()
            if now - shown.get(event.host, 0.0) >= LOAD_PROGRESS_EVERY and event.done_bytes:
                shown[event.host] = now
                text = load_transfer(event.done_bytes, event.total_bytes, event.sent_bytes, event.rate,
                                     event.eta_seconds)
                print(f"  {event.host}: loading {text}", file=sys.stderr)
        elif isinstance(event, ev.ModelLoaded):
            for host, last in loads.items():
                print(f"  {host}: loaded {load_done(last.done_bytes, last.sent_bytes)} in {event.seconds:.1f}s",
                      file=sys.stderr)
            loads.clear()
            shown.clear()
        elif isinstance(event, ev.HostPhaseChanged) and verbose:
            print(f"  {event.host}: {event.phase} {event.detail}".rstrip(), file=sys.stderr)
        elif isinstance(event, ev.MeshRecovered):
            stall = f" (noticed after a {event.stalled_seconds:.1f}s stall)" if event.stalled_seconds else ""
            print(f"  recovered from losing {event.host}{stall} at token {event.token_index} in {event.seconds:.1f}s",
                  file=sys.stderr)
        elif isinstance(event, ev.LogRecorded) and event.level in ("warning", "error"):
            print(f"  {event.source}: {event.message}", file=sys.stderr)

    return listen


def _print_plan(mesh: Mesh, out: TextIO) -> None:
    assert mesh.plan is not None and mesh.model is not None
    sequences = f", {mesh.plan.parallel} sequences at once" if mesh.plan.parallel > 1 else ""
    print(f"model {mesh.model.name}: {mesh.model.n_layer} layers + output, context {mesh.plan.context}{sequences}",
          file=out)
    for a in mesh.plan.assignments:
        node = mesh.node(a.name)
        holds_output = mesh.plan.n_layer in mesh.plan.layers_of(a.name)
        blocks = range(a.start, min(a.end, mesh.plan.n_layer))
        where = f"blocks {blocks.start:>3}-{blocks.stop - 1:<3}" if len(blocks) else "no blocks     "
        where += " +output" if holds_output else "        "
        print(f"  {a.name:<12} {node.address:<16} {where} {format_size(a.used_bytes):>10} of "
              f"{format_size(a.usable_bytes)} usable" + (f" on {a.device}" if a.device != "cpu" else ""), file=out)
    for reason in mesh.plan.reasons:
        print(f"  - {reason}", file=out)
    prediction = mesh.predict()
    if prediction is not None:
        parts = ", ".join(f"{n.name} {n.compute_ms:.1f} ms" + (f" + {n.network_ms:.1f} ms network" if n.network_ms
                                                               else "") for n in prediction.nodes)
        network_note = "" if any(n.network_ms for n in prediction.nodes) else " before network round trips"
        print(f"  predicted decode: {prediction.tokens_per_second:.1f} tok/s{network_note} ({parts})", file=out)


async def cmd_plan(args: argparse.Namespace) -> int:
    async with _inventory_for(args) as inventory:
        mesh = Mesh(inventory, accept_new=args.accept_new, listener=_stderr_listener(False),
                    weight_by_speed=args.weight_by_speed, parallel=args.parallel)
        try:
            mesh.read_model()
            await mesh.connect_and_probe()
            plan = mesh.make_plan()
        finally:
            await mesh.close()
        if args.json:
            print(json.dumps({"plan": plan.to_json(), "reasons": list(plan.reasons), "context": plan.context,
                              "parallel": plan.parallel,
                              "n_gpu_layers": plan.n_gpu_layers, "tensor_split": list(engine_split(plan).tensor_split),
                              "nodes": [{"name": n.name, "facts": n.facts.to_json() if n.facts else None}
                                        for n in mesh.nodes]}))
        else:
            _print_plan(mesh, sys.stdout)
    return 0


async def cmd_up(args: argparse.Namespace) -> int:
    if not args.headless:
        from meshtui.api_access import check_api_options, resolve_api_key
        from meshtui.tui.app import ApiOptions, run_tui  # the only place the CLI touches Textual

        api = None
        if args.api_port is not None:
            api_key = resolve_api_key(args.api_key, args.api_key_file)
            check_api_options(args.api_host, api_key)
            api = ApiOptions(args.api_host, args.api_port, api_key)
        async with _inventory_for(args) as inventory:
            return await run_tui(inventory, accept_new=args.accept_new, weight_by_speed=args.weight_by_speed,
                                 max_tokens=args.max_tokens or TUI_MAX_TOKENS, temperature=args.temperature,
                                 seed=args.seed, api=api, parallel=args.parallel,
                                 speculative=args.speculative)
    if args.prompt is None:
        raise InventoryError("--headless needs --prompt TEXT")
    async with _inventory_for(args) as inventory:
        mesh = Mesh(inventory, accept_new=args.accept_new, listener=_stderr_listener(args.verbose),
                    weight_by_speed=args.weight_by_speed, parallel=args.parallel, speculative=args.speculative)
        try:
            await mesh.up()
            mesh.enable_auto_rejoin()
            if not args.json:
                _print_plan(mesh, sys.stderr)
            finished: ev.ReplyFinished | None = None
            async for event in mesh.stream(prompt=args.prompt, raw=args.raw,
                                           max_tokens=args.max_tokens or HEADLESS_MAX_TOKENS,
                                           temperature=args.temperature, seed=args.seed):
                if isinstance(event, ev.TokenGenerated) and not args.json:
                    sys.stdout.write(printable(event.text, keep_newlines=True))
                    sys.stdout.flush()
                elif isinstance(event, ev.ReplyFinished):
                    finished = event
            assert finished is not None
            state = mesh.state  # what the events told, as it stood before the teardown
            prediction = mesh.predict()
        finally:
            await mesh.close()
    if args.json:
        assert state.plan is not None
        print(json.dumps({
            "text": finished.text,
            "tokens": list(finished.token_ids),
            "prompt_tokens": finished.prompt_tokens,
            "completion_tokens": len(finished.token_ids),
            "time_to_first_token_seconds": finished.first_token_seconds,
            "stop_reason": finished.stop_reason,
            "plan": state.plan.to_json(),
            "placement": {name: list(layers) for name, layers in state.placement.items()},
            "nodes": node_summary(state),
            "tokens_per_second": finished.tokens_per_second,
            "seconds": finished.seconds,
            "load_seconds": state.load_seconds,
            "load_bytes_sent": state.load_bytes_sent,
            "load_by_host": dict(state.load_by_host),
            "step_costs_ms": list(state.step_costs_ms),
            "recoveries": [r.to_json() for r in state.recoveries],
            "prediction": prediction.to_json() if prediction else None,
            "speculative": finished.speculative.to_json() if finished.speculative else None,
        }))
    else:
        print()
        predicted = f" (predicted {prediction.tokens_per_second:.1f})" if prediction else ""
        spec = finished.speculative
        drafts = (f", {spec.accepted}/{spec.drafted} drafts accepted, {spec.tokens_per_step:.2f} tokens per round trip"
                  if spec and spec.drafted and spec.tokens_per_step else "")
        print(f"{len(finished.token_ids)} tokens, {finished.tokens_per_second:.1f} tok/s{predicted}{drafts}",
              file=sys.stderr)
    return 0


async def cmd_down(args: argparse.Namespace) -> int:
    from meshtui.hosts import stop_leftover_agents
    from meshtui.ssh import connect_host

    inventory = load_inventory(args.inventory)

    async def one(host: Any) -> tuple[str, list[dict[str, Any]] | str]:
        try:
            conn = await connect_host(host, inventory.ssh, accept_new=args.accept_new)
        except MeshError as err:
            return host.name, str(err)
        try:
            return host.name, await stop_leftover_agents(conn, host)
        except MeshError as err:
            return host.name, str(err)
        finally:
            conn.close()

    results = await asyncio.gather(*(one(h) for h in inventory.hosts))
    failed = False
    report: dict[str, dict[str, Any]] = {}
    for name, result in results:
        if isinstance(result, str):
            failed = True
            report[name] = {"error": result}
            if not args.json:
                print(f"{result}", file=sys.stderr)
        else:
            report[name] = {"stopped": result}
            if not args.json:
                if result:
                    for item in result:
                        print(f"{name}: stopped agent pid {item['pid']}: {item['cmdline']}")
                else:
                    print(f"{name}: nothing to stop")
    if args.json:
        print(json.dumps(report))
    return 1 if failed else 0


async def cmd_serve(args: argparse.Namespace) -> int:
    from meshtui.api import check_api_options, request_logger, resolve_api_key, serve_forever

    api_key = resolve_api_key(args.api_key, args.api_key_file)
    check_api_options(args.api_host, api_key)
    async with _inventory_for(args) as inventory:
        listener = request_logger(_stderr_listener(args.verbose))
        mesh = Mesh(inventory, accept_new=args.accept_new, listener=listener, weight_by_speed=args.weight_by_speed,
                    parallel=args.parallel, speculative=args.speculative)
        try:
            await mesh.up()
            mesh.enable_auto_rejoin()
            await serve_forever(mesh, host=args.api_host, port=args.api_port, api_key=api_key)
        finally:
            await mesh.close()
    return 0


async def cmd_bench(args: argparse.Namespace) -> int:
    from meshtui import bench

    sweep = args.rtt is not None or args.speculative is not None or args.concurrency is not None
    if args.parallel is not None and args.parallel < 1:
        raise InventoryError(f"--parallel: expected at least 1, not {args.parallel}")
    options = bench.BenchOptions(prompts=args.prompts, max_tokens=args.max_tokens,
                                 tcp_stages=bench.parse_tcp_stages(args.tcp_stages) if args.tcp_stages else {},
                                 parallel=args.parallel)
    sweep_options = bench.SweepOptions(
        rtt_ms=bench.parse_rtt(args.rtt) if args.rtt is not None else (0.0,),
        speculative=bench.parse_speculative(args.speculative) if args.speculative is not None else ("off",),
        concurrency=bench.parse_concurrency(args.concurrency) if args.concurrency is not None else (),
        prompts=args.prompts, max_tokens=args.max_tokens, tcp_stages=options.tcp_stages, parallel=args.parallel)

    def progress(line: str) -> None:
        if args.verbose or not args.json:
            print(f"  bench: {line}", file=sys.stderr)

    async with _inventory_for(args) as inventory:
        if sweep:
            report = await bench.run_sweeps(inventory, sweep_options, accept_new=args.accept_new,
                                            listener=_stderr_listener(args.verbose), progress=progress)
        else:
            report = await bench.run_bench(inventory, options, accept_new=args.accept_new,
                                           listener=_stderr_listener(args.verbose), progress=progress)
    paths = bench.write_outputs(report, args.out) if args.out is not None else ()
    if args.json:
        print(json.dumps(report))
    else:
        print(bench.render_sweep_table(report) if sweep else bench.render_table(report))
        for path in paths:
            print(f"wrote {path}", file=sys.stderr)
    return 0
