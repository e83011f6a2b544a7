"""Logprobs through the API of a real mesh equal llama-cpp-python's own `create_completion(logprobs=N)`, greedy.

With identical kernels on the stages (MESHTUI_RUNTIME=head-build: the hosts run the head's own ggml build), the
mesh computes what one process computes, so the sampled tokens, their logprobs and the top alternatives agree to
rounding (`tests/test_api_fields.py` compares the default portable runtime with a tolerance for another build).
"""

from __future__ import annotations

import openai
import pytest
from helpers import SMOLLM2
from reference import reference_logprobs

from meshtui.api import ApiServer
from meshtui.inventory import ModelSpec
from meshtui.lab import EmbeddedLab
from meshtui.mesh import Mesh

pytestmark = [pytest.mark.slow]

CONTEXT = 512
PROMPT = "The three primary colors are"
MAX_TOKENS = 12
TOP = 3


async def test_completion_logprobs_equal_llama_cpp_python_with_the_heads_kernels(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHTUI_RUNTIME", "head-build")
    expected = reference_logprobs(SMOLLM2, PROMPT, MAX_TOKENS, top=TOP, context=CONTEXT)["logprobs"]
    lab = EmbeddedLab(n_hosts=2)
    await lab.start()
    mesh = Mesh(lab.inventory(ModelSpec(path=None, name="smollm2", context=CONTEXT)), speculative="off")
    try:
        await mesh.up()
        assert mesh.plan is not None and [a.name for a in mesh.plan.assignments if a.n_layers] == [
            "head", "lab1", "lab2"]  # the logits really crossed both hosts
        server = ApiServer(mesh, port=0)
        await server.start()
        try:
            async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none",
                                          max_retries=0, timeout=60) as client:
                got = (await client.completions.create(model="meshtui", prompt=PROMPT, max_tokens=MAX_TOKENS,
                                                       temperature=0, logprobs=TOP)).choices[0].logprobs
        finally:
            await server.close()
    finally:
        await mesh.close()
        await lab.close()
    assert got is not None and got.tokens == expected["tokens"] and len(got.tokens) == MAX_TOKENS
    assert got.token_logprobs == pytest.approx(expected["token_logprobs"], abs=1e-4)
    for mine, theirs in zip(got.top_logprobs or [], expected["top_logprobs"], strict=True):
        assert list(mine) == list(theirs)  # the same alternatives, in the same order
        assert list(mine.values()) == pytest.approx(list(theirs.values()), abs=1e-4)
