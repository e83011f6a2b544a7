"""Chat mode through the real mesh equals llama-cpp-python's own `create_chat_completion`, greedy.

The conversation has a system turn and an assistant turn, so the whole chat template is exercised: SmolLM2's
own (ChatML), and a Zephyr-style one on a synthetic model whose template starts with the BOS token (so BOS
handling differs from ChatML's). Exact equality needs identical kernels on the stages: the hosts run the
head's own build (MESHTUI_RUNTIME=head-build; FINDINGS.md, "Numerics across builds").
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import SMOLLM2
from reference import reference_chat
from synth import synthetic_model

from meshtui.inventory import ModelSpec
from meshtui.lab import EmbeddedLab
from meshtui.mesh import Mesh, Reply

pytestmark = [pytest.mark.slow]

CONTEXT = 512
MAX_TOKENS = 24
CONVERSATION = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What colour is the sky on a clear day?"},
    {"role": "assistant", "content": "It is blue."},
    {"role": "user", "content": "And at sunset?"},
]
ZEPHYR_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


async def mesh_chat(model: ModelSpec) -> tuple[Reply, list[str]]:
    """The reply of a real mesh (the head and two embedded hosts over SSH) and the nodes holding layers."""
    lab = EmbeddedLab(n_hosts=2)
    await lab.start()
    mesh = Mesh(lab.inventory(model))
    try:
        await mesh.up()
        assert mesh.plan is not None
        holders = [a.name for a in mesh.plan.assignments if a.n_layers]
        return await mesh.generate(messages=CONVERSATION, max_tokens=MAX_TOKENS, temperature=0.0), holders
    finally:
        await mesh.close()
        await lab.close()


def zephyr_model() -> Path:
    # seed 1: a reply that varies with the conversation (other seeds repeat one token whatever it is)
    return synthetic_model(6, n_embd=128, n_ff=256, seed=1, chat_template=ZEPHYR_TEMPLATE)


@pytest.mark.parametrize("which", ["smollm2", "synthetic-zephyr"])
async def test_a_multi_turn_chat_reply_equals_create_chat_completion(which: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHTUI_RUNTIME", "head-build")
    path = SMOLLM2 if which == "smollm2" else zephyr_model()
    spec = ModelSpec(path=None, name="smollm2", context=CONTEXT) if which == "smollm2" else \
        ModelSpec(path=path, name=None, context=CONTEXT)
    reply, holders = await mesh_chat(spec)
    expected = reference_chat(path, CONVERSATION, MAX_TOKENS, CONTEXT)
    assert holders == ["head", "lab1", "lab2"]  # the reply really crossed both hosts
    assert reply.prompt_tokens == expected["prompt_tokens"]  # the same template, rendered and tokenized alike
    assert len(reply.token_ids) == expected["completion_tokens"]
    assert reply.text == expected["text"]
    assert {"stop": "stop", "length": "length"}[reply.stop_reason] == expected["finish_reason"]
    assert reply.token_ids  # a reply to compare, not two empty ones


def test_the_synthetic_model_carries_the_zephyr_template() -> None:
    from gguf import GGUFReader

    field = GGUFReader(zephyr_model()).fields["tokenizer.chat_template"]
    assert bytes(field.parts[-1]).decode() == ZEPHYR_TEMPLATE
