"""Drafting's pure parts: n-gram lookup equals llama-cpp-python's prompt lookup; the draft length follows what
pays; a draft model with another vocabulary is refused with the file named."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

from meshtui.engine.drafts import DraftPolicy, lookup_draft, vocabulary_mismatch


@given(history=st.lists(st.integers(0, 5), min_size=1, max_size=60), n=st.integers(1, 12),
       max_ngram=st.integers(1, 4))
def test_lookup_drafts_what_llama_cpp_python_drafts(history: list[int], n: int, max_ngram: int) -> None:
    reference = LlamaPromptLookupDecoding(max_ngram_size=max_ngram, num_pred_tokens=n)
    assert lookup_draft(history, n, max_ngram) == [int(t) for t in reference(np.array(history, dtype=np.intc))]


def test_lookup_copies_what_followed_the_earliest_match() -> None:
    #                 a  b  c  d  e  a  b  x  a  b
    assert lookup_draft([1, 2, 3, 4, 5, 1, 2, 9, 1, 2], 3) == [3, 4, 5]
    assert lookup_draft([1, 2, 3], 3) == []  # nothing to copy
    assert lookup_draft([7, 7, 7], 0) == []
    # `auto` asks for a repeated run of 3 tokens: a recurring pair is not enough to draft from.
    assert lookup_draft([1, 2, 3, 4, 5, 1, 2, 9, 1, 2], 3, max_ngram=3, min_ngram=3) == []
    assert lookup_draft([1, 2, 3, 4, 5, 1, 2, 9, 1, 2], 3, max_ngram=3, min_ngram=2) == [3, 4, 5]
    assert lookup_draft([1, 2, 3, 4, 1, 2, 3], 2, max_ngram=3, min_ngram=3) == [4, 1]


def _run(policy: DraftPolicy, steps: int, accept_all: bool, step_ms: float, per_token_ms: float) -> DraftPolicy:
    for _ in range(steps):
        k = policy.length()
        if k == 0:
            policy = policy.plain_step(step_ms)
        else:
            policy = policy.verified(k, k if accept_all else 0, step_ms + per_token_ms * k)
    return policy


def test_when_drafts_are_accepted_the_length_grows_to_the_limit() -> None:
    policy = _run(DraftPolicy(max_length=16), 40, accept_all=True, step_ms=10.0, per_token_ms=0.5)
    assert policy.acceptance > 0.95
    assert policy.length() == 16


def test_when_drafts_are_rejected_drafting_turns_off_and_probes_ever_more_rarely() -> None:
    policy = DraftPolicy()
    lengths = []
    for _ in range(200):
        k = policy.length()
        lengths.append(k)
        policy = policy.plain_step(10.0) if k == 0 else policy.verified(k, 0, 10.0 + 1.0 * k)
    assert lengths[0] == 2  # the prior: half the drafts accepted, a cheap extra position
    assert set(lengths[1:]) == {0, 1}  # then each try is the cheapest one: a single draft
    off_runs = [len(run) for run in "".join("0" if k == 0 else "1" for k in lengths).split("1") if run]
    assert off_runs[:-1] == sorted(off_runs[:-1]) and off_runs[-2] > off_runs[0]  # off ever longer between probes
    assert off_runs[0] == 16
    assert sum(1 for k in lengths if k) <= 12  # 200 steps, nearly all plain


def test_a_costly_extra_position_keeps_drafts_short() -> None:
    # Half the drafts accepted. Extra positions nearly free (a round trip dominates): draft more; as costly as
    # a whole step (compute dominates): drafting never pays.
    cheap = DraftPolicy(accepted_weight=5, tried_weight=10, step_ms=10.0, per_token_ms=0.1)
    dear = DraftPolicy(accepted_weight=5, tried_weight=10, step_ms=10.0, per_token_ms=10.0)
    assert cheap.best_length() >= 3
    assert dear.best_length() == 0


def test_a_draft_vocabulary_that_differs_is_named_with_the_file() -> None:
    assert vocabulary_mismatch("/m/d.gguf", [b"a", b"b"], [b"a", b"b"]) is None
    assert vocabulary_mismatch("/m/d.gguf", [b"a"], [b"a", b"b"]) == \
        "draft model /m/d.gguf: its vocabulary has 1 tokens, the model's 2"
    assert vocabulary_mismatch("/m/d.gguf", [b"a", b"c"], [b"a", b"b"]) == \
        "draft model /m/d.gguf: its vocabulary differs from the model's (token 1 is 'c', not 'b')"
