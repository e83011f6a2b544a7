#!/usr/bin/env python3
"""Where a decode step's time goes: batched and verify steps of SmolLM2, timed in one process.

Every measurement builds the engine's own context (the parameters `meshtui.engine.worker` uses) and times
`llama_decode` on batches the step loop builds: N sequences one token each (decode of N replies at once), and
k positions of one sequence (a verify step of k-1 drafts), each from a steady state (every sequence holds the
same prefilled prompt; the step's positions leave the cache again so every repetition sees the same cache).
The setups of a comparison run in one process, alternating step by step, so a busy machine shifts them alike.

    .venv/bin/python bench/step_cost.py [--reps 30] [--json out.json]

Over the mesh (stages' round trips and bytes per step) see `--mesh`: the embedded 3-host lab, one reply at a
time and several at once, each step's decode time and every stage's round trip from its tunnel's meter.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshtui.models import builtin_model_path  # noqa: E402

PROMPT_TOKENS = 48
CONTEXT = 2048
_QUIET: Any = None


@dataclass(frozen=True)
class Setup:
    """One way to build the context."""

    label: str
    parallel: int = 8
    unified: bool = False
    threads: int = 1
    threads_batch: int = 1


class Bench:
    """A model, and contexts built for each setup, with a batch to fill."""

    def __init__(self, llama_cpp: Any, model: Any, setup: Setup) -> None:
        from llama_cpp import _internals as internals

        self.lib = llama_cpp
        self.setup = setup
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = CONTEXT * setup.parallel
        params.n_batch = params.n_ubatch = 512
        params.n_seq_max = setup.parallel
        params.n_threads = setup.threads
        params.n_threads_batch = setup.threads_batch
        params.kv_unified = setup.unified
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = internals.LlamaContext(model=model, params=params, verbose=False)
        self.batch = llama_cpp.llama_batch_init(512, 0, 1)
        prompt = [1 + (i * 37) % 4000 for i in range(PROMPT_TOKENS)]
        for seq in range(setup.parallel):
            self._fill([(t, i, seq, i == PROMPT_TOKENS - 1) for i, t in enumerate(prompt)])
            self._decode()

    def _fill(self, rows: list[tuple[int, int, int, bool]]) -> None:
        batch = self.batch
        for n, (token, pos, seq, logits) in enumerate(rows):
            batch.token[n] = token
            batch.pos[n] = pos
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = seq
            batch.logits[n] = logits
        batch.n_tokens = len(rows)

    def _decode(self) -> float:
        """The step's CPU time in ms (one thread computes: the wall clock of a shared machine adds the others')."""
        started = time.thread_time()
        if self.lib.llama_decode(self.ctx.ctx, self.batch) != 0:
            raise RuntimeError("llama_decode failed")
        self.lib.llama_synchronize(self.ctx.ctx)  # llama_decode may return before its results are in place
        return (time.thread_time() - started) * 1000.0

    def step(self, sequences: int, positions: int, all_logits: bool = True) -> float:
        """One step: `positions` tokens for each of `sequences` sequences; then they leave the cache again."""
        rows = [(100 + i, PROMPT_TOKENS + i, seq, all_logits or i == positions - 1)
                for seq in range(sequences) for i in range(positions)]
        self._fill(rows)
        ms = self._decode()
        for seq in range(sequences):
            self.lib.llama_memory_seq_rm(self.ctx.memory, seq, PROMPT_TOKENS, -1)
        return ms


def alternate(benches: list[tuple[str, Callable[[], float]]], reps: int) -> dict[str, float]:
    """Median ms of each, the calls interleaved so the machine's load falls on all alike."""
    for _, call in benches:
        call()
        call()
    samples: dict[str, list[float]] = {name: [] for name, _ in benches}
    for _ in range(reps):
        for name, call in benches:
            samples[name].append(call())
    return {name: statistics.median(values) for name, values in samples.items()}


def sampler_cost(llama_cpp: Any, model: Any, bench: Bench, reps: int) -> float:
    """ms of one `llama_sampler_sample` with the engine's greedy chain (penalties + greedy)."""
    lib = llama_cpp
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_penalties(lib.llama_vocab_n_tokens(model.vocab),
                                                                        64, 1.0, 0.0, 0.0))
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
    bench.step(1, 1)
    started = time.perf_counter()
    bench._fill([(100, PROMPT_TOKENS, 0, True)])
    bench._decode()
    started = time.perf_counter()
    for _ in range(reps):
        lib.llama_sampler_sample(chain, bench.ctx.ctx, 0)
    ms = (time.perf_counter() - started) * 1000.0 / reps
    lib.llama_memory_seq_rm(bench.ctx.memory, 0, PROMPT_TOKENS, -1)
    lib.llama_sampler_free(chain)
    return ms


def graph_reuse(llama_cpp: Any, bench: Bench, order: list[int]) -> int:
    """Of 10 decode steps of the sequences in `order` (one token each), how many reused the step before's graph
    (llama.cpp's own count): a graph not reused is built again, and over RPC sent whole to every stage."""
    before = llama_cpp.llama_perf_context(bench.ctx.ctx).n_reused
    for _ in range(10):
        bench._fill([(100, PROMPT_TOKENS, seq, True) for seq in order])
        bench._decode()
        for seq in order:
            bench.lib.llama_memory_seq_rm(bench.ctx.memory, seq, PROMPT_TOKENS, -1)
    return int(llama_cpp.llama_perf_context(bench.ctx.ctx).n_reused - before)


def in_process(reps: int) -> dict[str, Any]:
    import llama_cpp
    from llama_cpp import _internals as internals

    llama_cpp.llama_backend_init()
    global _QUIET
    _QUIET = llama_cpp.llama_log_callback(lambda *_: None)  # kept alive: llama.cpp calls it later
    llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p(0))
    params = llama_cpp.llama_model_default_params()
    model = internals.LlamaModel(path_model=str(builtin_model_path("smollm2")), params=params, verbose=False)
    setups = [
        Setup("engine today (parallel 8, per-sequence KV, 1 thread / batch 1)", 8, False, 1, 1),
        Setup("parallel 8, unified KV", 8, True, 1, 1),
        Setup("parallel 1", 1, False, 1, 1),
    ]
    benches = {s.label: Bench(llama_cpp, model, s) for s in setups}
    result: dict[str, Any] = {"reps": reps, "cpu_count": os.cpu_count(), "load_average": os.getloadavg()}
    today, unified, single = (benches[s.label] for s in setups)

    # Decode of N sequences at once: per-sequence KV (today) against a unified cache.
    calls: list[tuple[str, Callable[[], float]]] = []
    for n in (1, 2, 4, 8):
        calls.append((f"decode {n} today", lambda n=n: today.step(n, 1)))
        calls.append((f"decode {n} unified", lambda n=n: unified.step(n, 1)))
    decode = alternate(calls, reps)
    # A verify step of k positions of one sequence, every logit as today or only the last.
    calls = []
    for k in range(1, 11):
        calls.append((f"verify {k} today", lambda k=k: today.step(1, k)))
        calls.append((f"verify {k} parallel1", lambda k=k: single.step(1, k)))
    verify = alternate(calls, reps)
    result["decode_ms"] = decode
    result["verify_ms"] = verify
    result["graph_reused_of_10"] = {str(order): graph_reuse(llama_cpp, today, order)
                                    for order in ([0, 1, 2, 3, 4, 5, 6, 7], [4, 5, 6, 7, 0, 1, 2, 3])}
    result["sample_ms"] = sampler_cost(llama_cpp, model, single, 200)
    return result


COPY_PROMPT = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
               "upsilon phi chi psi omega. ") * 4
FREE_PROMPTS = ("The history of the bicycle", "Rivers of South America", "How bread rises",
                "The rules of chess", "Why the sky is blue", "A short guide to knots", "Volcanoes",
                "The life of bees")


async def mesh_steps(reps: int, model: Path | None = None) -> dict[str, Any]:
    """Steps over the embedded 3-host lab: per step the engine's decode time and each stage's round trip and bytes
    (from its tunnel's meter, one round per stage per step)."""
    from meshtui.engine.protocol import Generate, Started, Token
    from meshtui.inventory import ModelSpec
    from meshtui.lab import EmbeddedLab
    from meshtui.mesh import Mesh
    from meshtui.runtime import weight_repack_wanted

    lab = EmbeddedLab(3)
    await lab.start()
    spec = ModelSpec(path=model.resolve() if model else None, name=None if model else "smollm2", context=1024)
    mesh = Mesh(lab.inventory(spec), parallel=8, speculative="off")
    result: dict[str, Any] = {"load_average": os.getloadavg(), "model": model.name if model else "smollm2",
                              "weight_repack": weight_repack_wanted()}
    try:
        await mesh.up()
        plan = mesh.plan
        assert plan is not None and mesh.engine is not None
        engine = mesh.engine
        tunnels = {a.name: mesh.stages[a.name].tunnel for a in plan.remote}
        result["plan"] = {a.name: [a.start, a.end] for a in plan.assignments if a.n_layers}
        result["repacked"] = {name: load.repacked for name, load in mesh.host_loads.items()}
        next_id = iter(range(1_000_000, 2_000_000))

        async def run(requests: list[Generate]) -> list[dict[str, Any]]:
            for tunnel in tunnels.values():
                assert tunnel is not None
                tunnel.meter.reset_rounds()
            first = engine_steps_before = None
            tokens: dict[int, list[Token]] = {}
            arrived: dict[int, float] = {}  # when a step's first token reached the orchestrator

            async def one(request: Generate) -> None:
                async for event in engine.generate(request):
                    if isinstance(event, Token) and event.token_id >= 0:
                        tokens.setdefault(event.decode_call, []).append(event)
                        arrived.setdefault(event.decode_call, time.perf_counter())

            await asyncio.gather(*(one(r) for r in requests))
            first = min(tokens)
            del engine_steps_before
            steps = []
            for call, produced in sorted(tokens.items()):
                row: dict[str, Any] = {"step": call - first, "requests": len({t.id for t in produced}),
                                       "tokens": len(produced), "decode_ms": produced[0].decode_ms}
                if call - 1 in arrived:  # the whole step as the orchestrator sees it: decode, sampling, events
                    row["wall_ms"] = (arrived[call] - arrived[call - 1]) * 1e3
                for name, tunnel in tunnels.items():
                    assert tunnel is not None
                    rounds = list(tunnel.meter.rounds)
                    # the meters count from the reset; the first step with a token is the last prefill one
                    index = len(rounds) - (max(tokens) - call) - 1
                    if 0 <= index < len(rounds):
                        r = rounds[index]
                        row[name] = {"ms": r.ms, "bytes_up": r.bytes_up, "bytes_down": r.bytes_down}
                steps.append(row)
            return steps

        def generate(prompt: str, **kw: Any) -> Generate:
            return Generate(id=next(next_id), prompt=prompt, raw=True, max_tokens=reps, temperature=0.0, **kw)

        result["decode"] = {}
        for n in (1, 2, 4, 8):
            steps = await run([generate(FREE_PROMPTS[i], speculative="off") for i in range(n)])
            # decode-only steady state: every request produced one token in the step, no prompt was read
            result["decode"][n] = [s for s in steps if s["requests"] == n and s["tokens"] == n][2:]
        result["verify"] = {}
        for k in (1, 2, 4, 6, 9):
            steps = await run([generate(COPY_PROMPT, speculative="ngram", draft_length=k)])
            result["verify"][k] = steps[2:]
        # a long prompt read alone: the time from the request to its first token, and the prompt's tokens
        result["prefill"] = []
        for _ in range(5):
            started, prompt_tokens, first = time.perf_counter(), 0, None
            async for event in engine.generate(Generate(id=next(next_id), prompt=" ".join([COPY_PROMPT] * 6),
                                                        raw=True, max_tokens=1, temperature=0.0,
                                                        speculative="off")):
                if isinstance(event, Started):
                    prompt_tokens = event.prompt_tokens
                elif isinstance(event, Token) and first is None:
                    first = (time.perf_counter() - started) * 1e3
            result["prefill"].append({"tokens": prompt_tokens, "ms": first})
    finally:
        await mesh.close()
        await lab.close()
    return result


def summarise_mesh(result: dict[str, Any]) -> None:
    stages = sorted(result["plan"])
    remote = [name for name in stages if name != "head"]
    print(f"mesh (embedded lab, {result.get('model')}, plan {result['plan']}, weights repacked "
          f"{result.get('repacked')}), medians over decode-only steps; load {result['load_average']}")
    print("| step | steps | step wall ms | decode ms | " + " | ".join(f"{n} ms / bytes up" for n in remote) +
          " | head ms |")
    print("|---|---|---|---|" + "---|" * len(remote) + "---|")

    def row(label: str, steps: list[dict[str, Any]]) -> None:
        steps = [s for s in steps if all(n in s for n in remote)]
        if not steps:
            print(f"| {label} | 0 |")
            return
        decode = statistics.median(s["decode_ms"] for s in steps)
        walls = [s["wall_ms"] for s in steps if "wall_ms" in s]
        wall = f"{statistics.median(walls):.2f}" if walls else "-"
        cells = [f"{statistics.median(s[n]['ms'] for s in steps):.2f} / "
                 f"{statistics.median(s[n]['bytes_up'] for s in steps):.0f}" for n in remote]
        head = statistics.median(s["decode_ms"] - sum(s[n]["ms"] for n in remote) for s in steps)
        print(f"| {label} | {len(steps)} | {wall} | {decode:.2f} | " + " | ".join(cells) + f" | {head:.2f} |")

    if result.get("prefill"):
        ms = statistics.median(p["ms"] for p in result["prefill"])
        tokens = result["prefill"][0]["tokens"]
        print(f"prefill of {tokens} tokens alone: median {ms:.1f} ms ({tokens / ms * 1e3:.0f} tokens/s)")
    for n, steps in result["decode"].items():
        row(f"decode {n} seq", steps)
    for k, steps in result["verify"].items():
        by_bytes: dict[int, list[dict[str, Any]]] = {}
        for s in steps:
            if remote and remote[0] in s:
                by_bytes.setdefault(s[remote[0]]["bytes_up"], []).append(s)
        for size, group in sorted(by_bytes.items()):
            if len(group) >= 3:
                row(f"ngram k={k} ({size} B up)", group)


def print_table(result: dict[str, Any]) -> None:
    decode, verify = result["decode_ms"], result["verify_ms"]
    base = decode["decode 1 today"]
    print(f"load average {result['load_average']}, median of {result['reps']} steps each (ms, and x one step)")
    print("| sequences | per-sequence KV (today) | unified KV |")
    print("|---|---|---|")
    for n in (1, 2, 4, 8):
        t, u = decode[f"decode {n} today"], decode[f"decode {n} unified"]
        print(f"| {n} | {t:.2f} ({t / base:.2f}x) | {u:.2f} ({u / base:.2f}x) |")
    print("| positions | parallel 8 (today) | parallel 1 |")
    print("|---|---|---|")
    vbase = verify["verify 1 today"]
    for k in range(1, 11):
        t, s = verify[f"verify {k} today"], verify[f"verify {k} parallel1"]
        print(f"| {k} | {t:.2f} ({t / vbase:.2f}x) | {s:.2f} ({s / vbase:.2f}x) |")
    print(f"one greedy sample (penalties + greedy over the vocabulary): {result['sample_ms']:.3f} ms")
    for order, reused in result["graph_reused_of_10"].items():
        print(f"8 sequences in the batch as {order}: the graph reused on {reused} of 10 steps")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--mesh", action="store_true", help="over the embedded 3-host lab instead")
    parser.add_argument("--model", type=Path, help="with --mesh: this GGUF instead of SmolLM2 (e.g. a Q4_0 copy)")
    args = parser.parse_args()
    if args.mesh:
        result = asyncio.run(mesh_steps(max(args.reps, 24), args.model))
        summarise_mesh(result)
    else:
        result = in_process(args.reps)
        print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
