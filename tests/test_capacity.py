"""The head's capacity: the same rule for `up`, `plan` and the bench's "single" mode."""

from __future__ import annotations

from synth import synthetic_model

from meshtui.capacity import HEAD_NAME, HEAD_RESERVE_BYTES, head_capacity
from meshtui.gguf_facts import read_model_facts
from meshtui.inventory import HeadSpec
from meshtui.planner import NODE_OVERHEAD_BYTES, NodeCapacity

GiB = 1024**3


def test_the_head_keeps_a_reserve_and_honours_max_memory_or_holds_only_the_embeddings() -> None:
    model = read_model_facts(synthetic_model(4))
    assert head_capacity(model, HeadSpec(), 8 * GiB) == NodeCapacity(HEAD_NAME, 8 * GiB - HEAD_RESERVE_BYTES,
                                                                      is_head=True)
    assert head_capacity(model, HeadSpec(max_memory=GiB), 8 * GiB).usable_bytes == GiB
    assert head_capacity(model, HeadSpec(), HEAD_RESERVE_BYTES // 2).usable_bytes == 0
    only_embeddings = head_capacity(model, HeadSpec(compute=False), 8 * GiB)
    assert only_embeddings.usable_bytes == model.input_bytes + NODE_OVERHEAD_BYTES
