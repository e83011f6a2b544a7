#!/usr/bin/env python3
"""What `--speculative auto` costs where there is nothing to copy: decode speed against `off`, in one run.

The engine on the head alone (SmolLM2, one thread), greedy, prompts with nothing to copy; the modes take each
prompt in turns. Decode only (first token to last: the prompt's prefill apart), as wall-clock tok/s and as
tokens per CPU second of the engine process (the steady measure on a shared machine: the head alone has no
round trips, so its CPU time is its decode time). Also what auto did: drafts sent, drafts kept, verify steps.

    .venv/bin/python bench/auto_vs_off.py [--rounds 3] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshtui.engine import protocol as p  # noqa: E402
from meshtui.engine.client import EngineProcess  # noqa: E402
from meshtui.models import builtin_model_path  # noqa: E402

FREE_PROMPTS = ("Write a short story about a lighthouse keeper.", "Explain how a refrigerator works.",
                "What should I pack for a week of hiking in the mountains?", "Describe the taste of coffee.")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def reply(engine: EngineProcess, request_id: int, prompt: str, mode: str, max_tokens: int
                ) -> tuple[float, float, int, p.Done]:
    """Decode seconds (first token to last), the engine's CPU seconds over them, tokens, and the Done."""
    stamps: list[float] = []
    cpu = 0.0
    async for event in engine.generate(p.Generate(id=request_id, prompt=prompt, max_tokens=max_tokens,
                                                  temperature=0.0, speculative=mode)):
        if isinstance(event, p.Token) and event.token_id >= 0:
            stamps.append(time.perf_counter())
            if len(stamps) == 1:
                cpu = cpu_seconds(engine.pid)
        elif isinstance(event, p.Done):
            return stamps[-1] - stamps[0], cpu_seconds(engine.pid) - cpu, len(stamps), event
    raise RuntimeError("no Done")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()
    engine = EngineProcess()
    await engine.start()
    ratios: list[float] = []
    cpu_ratios: list[float] = []
    position_ratios: list[float] = []
    try:
        await engine.load(p.Load(model=str(builtin_model_path("smollm2")), context=1024, threads=1))
        request_id = 0
        for _ in range(args.rounds):
            for prompt in FREE_PROMPTS:
                runs = {}
                for mode in ("off", "auto"):
                    request_id += 1
                    runs[mode] = await reply(engine, request_id, prompt, mode, args.max_tokens)
                (off_s, off_cpu, off_n, _), (auto_s, auto_cpu, auto_n, done) = runs["off"], runs["auto"]
                ratio = (auto_n / auto_s) / (off_n / off_s)
                cpu_ratio = (auto_n / auto_cpu) / (off_n / off_cpu)
                ratios.append(ratio)
                cpu_ratios.append(cpu_ratio)
                # Positions computed: off one a token; auto one a step plus each draft. Where a position costs
                # what a step costs (CPU stages, bench/step_cost.py), their ratio is the speed ratio to expect.
                positions = off_n / (auto_n - done.accepted + done.drafted)
                position_ratios.append(positions)
                print(f"{prompt[:36]:36} wall {ratio:.2f}x  per CPU second {cpu_ratio:.2f}x  positions {positions:.3f}x"
                      f"  drafted {done.drafted} kept {done.accepted} in {done.verify_steps} verify steps of "
                      f"{auto_n} tokens", flush=True)
    finally:
        await engine.close()
    print(f"auto / off over {len(ratios)} replies: wall median {statistics.median(ratios):.3f}x; "
          f"per CPU second median {statistics.median(cpu_ratios):.3f}x, "
          f"mean {statistics.fmean(cpu_ratios):.3f}x; positions computed, mean "
          f"{statistics.fmean(position_ratios):.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
