#!/usr/bin/env python3
"""Drafting replayed offline: how many round trips n-gram drafts would save on fixed greedy replies.

With greedy decoding a verify step keeps exactly the drafts that equal the model's own next tokens, so the steps a
reply takes with drafts follow from the plain reply alone: replay the lookup and the engine's `DraftPolicy` over
it, charging each step what a step of that many positions costs, and compare with one step per token. Every
variant sees the same replies, so the differences are the drafting's own, not the machine's noise.

    .venv/bin/python bench/draft_replay.py [--model PATH] [--tokens 160] [--rtt-ms 0,2]

The replies are llama-cpp-python's, greedy, for the bench's prompts and a second set that the defaults were not
tuned on. Step costs are timed here in one process (steps of 1 to 8 positions, as the engine calibrates after a
load), plus `--stages` round trips of each `--rtt-ms`. What a mesh really gains also depends on how its numerics
round (batched verification can part from one-token steps at near ties): `bench/lab_bench.py --speculative`.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/step_cost.py: the engine's context, timed steps

from meshtui.bench.prompts import COPY_PROMPTS, FREE_PROMPTS  # noqa: E402
from meshtui.engine.drafts import CALIBRATE_POSITIONS, DraftPolicy, NgramIndex, step_shape  # noqa: E402
from meshtui.models import builtin_model_path  # noqa: E402

MORE_COPY = (
    "Repeat the following text exactly: Every morning the baker opened the shop before sunrise, lit the ovens, and "
    "set out the bread on the long wooden shelves. By seven the street smelled of warm loaves, and the first "
    "customers waited at the door with their baskets.",
    "Fix the spelling mistakes in this text and write it out again: The quick brwon fox jumpd over the lazy dog, "
    "and then it ran into the forrest to find its freinds.",
    "Copy this list of fruits, one per line:\napple\nbanana\ncherry\ndate\nelderberry\nfig\ngrape\nhoneydew",
    "Rewrite this paragraph, changing only the name Anna to Maria: Anna walked to the station every day. Anna "
    "liked to read on the train, and when Anna arrived at work she always made coffee for everyone in the office.",
    "Repeat this code exactly:\nfor i in range(10):\n    if i % 2 == 0:\n        print(i, 'is even')\n    else:\n"
    "        print(i, 'is odd')\n",
    "Extract the second sentence of this text and repeat it exactly: The river was calm. The boats moved slowly "
    "under the old stone bridge while the children waved from the bank. Night came early.",
    "Repeat the following text exactly: Water boils at one hundred degrees Celsius at sea level. At higher "
    "altitudes the air pressure is lower, so water boils at a lower temperature, which is why cooking pasta in "
    "the mountains takes longer.",
)
MORE_FREE = ("What is the capital of France? Answer in one sentence.", "Write a haiku about autumn leaves.",
             "Explain what a computer is to a child.", "List three benefits of regular exercise.",
             "Tell me a short story about a dragon who is afraid of the dark.", "What causes rain?")

# (name, max n-gram, min n-gram): where adaptive drafts come from. The engine's: meshtui.engine.decoder.
LOOKUPS = (("runs of 3 (before)", 3, 3), ("runs of 2-8 (engine)", 8, 2), ("runs of 3-8", 8, 3), ("runs of 1-8", 8, 1))
_QUIET: Any = None  # llama.cpp's log callback, kept alive: it logs again when the model and context are freed


def greedy_replies(model: Path, tokens: int) -> list[dict[str, Any]]:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = Llama(model_path=str(model), n_ctx=2048, n_threads=1, verbose=False)
    template = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token="<|im_end|>",
                                   bos_token="<|im_start|>", add_generation_prompt=True)
    replies = []
    sets = (("copy", COPY_PROMPTS + MORE_COPY), ("free", FREE_PROMPTS + MORE_FREE))
    for kind, prompts in sets:
        for prompt in prompts:
            text = template(messages=[{"role": "user", "content": prompt}]).prompt
            prompt_ids = llm.tokenize(text.encode(), add_bos=False, special=True)
            reply: list[int] = []
            for token in llm.generate(prompt_ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
                if llm.token_eos() == token or len(reply) >= tokens:
                    break
                reply.append(int(token))
            replies.append({"kind": kind, "prompt": list(prompt_ids), "reply": reply})
    return replies


def timed_steps(model: Path, positions: int, reps: int = 5) -> list[float]:
    """ms of a step of 1..positions positions of one sequence (every logit asked for), in one process: the engine's
    context as `bench/step_cost.py` builds it, the sizes alternating."""
    import llama_cpp
    from llama_cpp import _internals as internals
    from step_cost import Bench, Setup, alternate

    global _QUIET
    llama_cpp.llama_backend_init()
    _QUIET = llama_cpp.llama_log_callback(lambda *_: None)
    llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p(0))
    loaded = internals.LlamaModel(path_model=str(model), params=llama_cpp.llama_model_default_params(), verbose=False)
    bench = Bench(llama_cpp, loaded, Setup("replay", parallel=1))
    medians = alternate([(str(n), lambda n=n: bench.step(1, n)) for n in range(1, positions + 1)], reps)
    return [medians[str(n)] for n in range(1, positions + 1)]


def replay(item: dict[str, Any], max_ngram: int, min_ngram: int, cost: Callable[[int], float],
           shape: Sequence[float]) -> tuple[float, float]:
    """(speed over plain decoding, tokens per step) of one reply drafted as the engine drafts."""
    prompt, reply = item["prompt"], item["reply"]
    policy, index = DraftPolicy(shape=tuple(shape)), NgramIndex(max_ngram, min_ngram)
    index.extend(prompt)
    done, spent, steps = 1, 0.0, 1  # the first token comes out of the prompt's step
    while done < len(reply):
        limit = min(policy.length(), len(reply) - done - 1)
        index.extend(reply[len(index.history) - len(prompt):done])
        drafts = index.draft(limit) if limit > 0 else []
        kept = 0
        while kept < len(drafts) and drafts[kept] == reply[done + kept]:
            kept += 1
        ms = cost(1 + len(drafts))
        policy = policy.verified(len(drafts), kept, ms) if drafts else policy.plain_step(ms)
        spent, steps, done = spent + ms, steps + 1, done + kept + 1
    return ((len(reply) - 1) * cost(1) / spent if spent else 1.0), len(reply) / steps


def geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a GGUF (default: the builtin SmolLM2)")
    parser.add_argument("--tokens", type=int, default=160, help="tokens per reply (default 160)")
    parser.add_argument("--rtt-ms", default="0,2", help="round trip per stage added to every step (default 0,2)")
    parser.add_argument("--stages", type=int, default=3, help="stages a step crosses (default 3)")
    parser.add_argument("--step-ms", metavar="MS,...", help="what steps of 1, 2, ... positions cost on a mesh (e.g. "
                        "its calibration at load), instead of timing them here in one process")
    args = parser.parse_args()
    model = args.model or builtin_model_path("smollm2")
    replies = greedy_replies(model, args.tokens)
    measured = [float(x) for x in args.step_ms.split(",")] if args.step_ms else \
        timed_steps(model, CALIBRATE_POSITIONS)
    where = "given" if args.step_ms else "one process"
    print(f"{model.name}: {len(replies)} greedy replies; a step of 1..{len(measured)} positions (ms, {where}): "
          + ", ".join(f"{ms:.1f}" for ms in measured))
    for rtt in (float(x) for x in args.rtt_ms.split(",")):
        network = rtt * args.stages
        shape = step_shape([ms + network for ms in measured], DraftPolicy.max_length + 1)

        def cost(n: int, shape: Sequence[float] = shape, base: float = measured[0] + network) -> float:
            return base * shape[n - 1]

        print(f"\nround trip {rtt:g} ms x {args.stages} stages; speed over plain (geometric mean; per reply)")
        print("| drafts from | policy | copy | free | worst free |")
        print("|---|---|---|---|---|")
        for name, high, low in LOOKUPS:
            for policy_name, policy_shape in (("linear", ()), ("step costs", shape)):
                by_kind: dict[str, list[float]] = {"copy": [], "free": []}
                for item in replies:
                    by_kind[item["kind"]].append(replay(item, high, low, cost, policy_shape)[0])
                print(f"| {name} | {policy_name} | {geomean(by_kind['copy']):.2f}x | {geomean(by_kind['free']):.2f}x "
                      f"| {min(by_kind['free']):.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
