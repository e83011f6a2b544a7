"""Speculative decoding over a real mesh (the head and two embedded hosts over SSH).

With fixed-length prompt-lookup drafts the mesh's greedy reply equals llama-cpp-python's own speculative decoding
in one process: the hosts run the head's build (MESHTUI_RUNTIME=head-build; FINDINGS.md, "Numerics across
builds"), so the kernels are identical. The draft model path and the per-reply report are checked on the same mesh.
"""

from __future__ import annotations

import pytest
from helpers import SMOLLM2, meshtui, meshtui_json
from reference import reference_lookup

from meshtui.engine import protocol as p
from meshtui.inventory import ModelSpec
from meshtui.lab import EmbeddedLab
from meshtui.mesh import Mesh

pytestmark = [pytest.mark.slow]

CONTEXT = 512
COPY_PROMPT = ("Repeat the following list exactly.\nList: apples, pears, plums, cherries, lemons, limes, figs, "
               "dates, grapes, melons.\nRepeated list: apples, pears,")


async def test_speculative_replies_over_the_mesh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHTUI_RUNTIME", "head-build")
    lab = EmbeddedLab(n_hosts=2)
    await lab.start()
    mesh = Mesh(lab.inventory(ModelSpec(path=None, name="smollm2", context=CONTEXT, draft="smollm2")))
    try:
        await mesh.up()
        assert mesh.plan is not None
        assert [a.name for a in mesh.plan.assignments if a.n_layers] == ["head", "lab1", "lab2"]
        assert mesh.engine is not None
        # 1. Fixed-length lookup drafts, verified over the stages: llama-cpp-python's own speculative reply.
        tokens: list[int] = []
        done = None
        async for event in mesh.engine.generate(p.Generate(id=1000, prompt=COPY_PROMPT, raw=True, max_tokens=48,
                                                           temperature=0.0, speculative="ngram", draft_length=10)):
            if isinstance(event, p.Token) and event.token_id >= 0:
                tokens.append(event.token_id)
            elif isinstance(event, p.Done):
                done = event
        assert done is not None and done.accepted > 0
        # 2. The mesh's own replies: the mode and its counts are reported with each reply.
        auto = await mesh.generate(prompt=COPY_PROMPT, raw=True, max_tokens=24, temperature=0.0)
        drafted = await mesh.generate(prompt=COPY_PROMPT, raw=True, max_tokens=24, temperature=0.0,
                                      speculative="draft")
        plain = await mesh.generate(prompt=COPY_PROMPT, raw=True, max_tokens=24, temperature=0.0,
                                    speculative="off")
    finally:
        await mesh.close()
        await lab.close()
    expected = reference_lookup(SMOLLM2, COPY_PROMPT, 48, draft_tokens=10, context=CONTEXT)
    assert tokens == expected["tokens"]
    assert auto.speculative is not None and drafted.speculative is not None and plain.speculative is not None
    assert (auto.speculative.mode, drafted.speculative.mode, plain.speculative.mode) == ("auto", "draft", "off")
    assert plain.speculative.to_json() == {"mode": "off", "drafted": 0, "accepted": 0, "verify_steps": 0,
                                           "tokens_per_step": 1.0}
    for reply in (auto, drafted):
        assert reply.speculative is not None
        assert reply.speculative.accepted > 0 and reply.speculative.tokens_per_step is not None
        assert reply.speculative.tokens_per_step > 1.0  # several tokens per round trip
        # The copied list is the same; where it ends, "\n" and the end of turn are nearly tied, and batched
        # verification can round the other way (FINDINGS.md): the report prints how the replies end.
        assert reply.token_ids[:12] == plain.token_ids[:12]
        assert reply.stop_reason == "length" and len(reply.token_ids) == 24 or reply.stop_reason == "stop"
        agreement = sum(a == b for a, b in zip(reply.token_ids, plain.token_ids, strict=False))
        print(f"{reply.speculative.mode}: {agreement}/{len(plain.token_ids)} tokens as plain, ended by "
              f"{reply.stop_reason} (plain by {plain.stop_reason}); {reply.speculative.to_json()}")


def test_headless_json_reports_the_replys_speculation() -> None:
    result = meshtui_json("up", "--lab-hosts", "1", "--context", "512", "--headless", "--prompt", COPY_PROMPT,
                          "--raw", "--temperature", "0", "--max-tokens", "16", "--speculative", "ngram")
    spec = result["speculative"]
    assert spec["mode"] == "ngram" and spec["verify_steps"] > 0 and 0 < spec["accepted"] <= spec["drafted"]
    assert spec["tokens_per_step"] > 1.0
    assert list(result["load_by_host"]) == ["lab1"] and result["load_by_host"]["lab1"]["bytes_sent"] > 0
    # The steps timed after the load, whose costs the drafts were priced by: 1 to 8 positions.
    assert len(result["step_costs_ms"]) == 8 and all(ms > 0 for ms in result["step_costs_ms"])
    rtt = {n["name"]: n["network_rtt_ms"] for n in result["nodes"]}
    predicted = {n["name"]: n["network_ms"] for n in result["prediction"]["nodes"]}
    assert predicted == {"head": 0.0, "lab1": rtt["lab1"]} and rtt["lab1"] > 0  # the prediction reads the state
    assert result["tokens"][:8] == reference_lookup(SMOLLM2, COPY_PROMPT, 16, draft_tokens=10)["tokens"][:8]


def test_draft_mode_without_a_draft_model_is_one_line_naming_the_key() -> None:
    result = meshtui("up", "--lab-hosts", "1", "--headless", "--prompt", "hi", "--speculative", "draft")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "meshtui: error: <embedded lab>: --speculative draft needs a draft model: set [model] draft to a builtin "
        "name or a GGUF path"]
