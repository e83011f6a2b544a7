"""Drafting's pure parts: n-gram lookup equals llama-cpp-python's prompt lookup; the draft length follows what
pays; a draft model with another vocabulary is refused with the file named."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

from meshtui.engine.drafts import DraftPolicy, NgramIndex, lookup_draft, step_shape, vocabulary_mismatch


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


@given(history=st.lists(st.integers(0, 4), min_size=1, max_size=80), cuts=st.lists(st.integers(1, 9), max_size=12),
       n=st.integers(1, 12), max_ngram=st.integers(1, 8), min_ngram=st.integers(1, 3))
def test_the_index_drafts_what_the_lookup_drafts_as_the_history_grows(
        history: list[int], cuts: list[int], n: int, max_ngram: int, min_ngram: int) -> None:
    index = NgramIndex(max_ngram, min_ngram)
    end = 0
    for cut in [*cuts, len(history)]:  # the history arrives in pieces (a prompt, then a step's tokens)
        end = min(len(history), end + cut)
        index.extend(history[len(index.history):end])
        assert index.draft(n) == lookup_draft(history[:end], n, max_ngram, min_ngram)


def test_the_longest_repeated_run_picks_where_a_copy_goes_on() -> None:
    # 1 2 appears twice before the end: after 9 1 2 a run of 3 says the copy goes on with 7, a pair with 3.
    history = [1, 2, 3, 4, 9, 1, 2, 7, 8, 5, 9, 1, 2]
    assert lookup_draft(history, 2, max_ngram=2) == [3, 4]
    assert lookup_draft(history, 2, max_ngram=8, min_ngram=2) == [7, 8]


def test_step_costs_become_a_shape_extended_a_tile_at_a_time() -> None:
    # Measured steps of 1..8 positions: four rows at a time are cheap, the rest one by one.
    costs = [10.0, 16.0, 22.0, 19.0, 25.0, 31.0, 37.0, 28.0]
    shape = step_shape(costs, 17)
    assert shape[:8] == (1.0, 1.6, 2.2, 1.9, 2.5, 3.1, 3.7, 2.8)
    # 9 positions cost 5 positions plus the last tile's cost (28 - 19), 12 cost 8 plus it, 16 cost 12 plus it.
    assert [round(x, 6) for x in (shape[8], shape[11], shape[15])] == [3.4, 3.7, 4.6]
    assert len(shape) == 17
    assert step_shape([10.0, 14.0, 18.0], 5) == (1.0, 1.4, 1.8, 2.2, 2.6)  # fewer than two tiles: linear
    assert step_shape([10.0, 9.0], 2) == (1.0, 1.0)  # never cheaper than one position
    assert step_shape([], 4) == () and step_shape([0.0], 4) == ()


def test_where_four_positions_cost_what_three_do_the_policy_drafts_three() -> None:
    linear = step_shape([10.0 + 6.0 * n for n in range(8)], 17)
    tiled = step_shape([10.0, 16.0, 22.0, 19.0, 25.0, 31.0, 37.0, 28.0], 17)
    seen = {"accepted_weight": 8.0, "tried_weight": 10.0, "step_ms": 10.0}  # 80% of the drafts held so far
    assert DraftPolicy(shape=linear, **seen).best_length() == 1
    assert DraftPolicy(shape=tiled, **seen).best_length() == 3


def test_with_a_shape_every_step_keeps_the_plain_step_cost_current() -> None:
    shape = (1.0, 1.5, 2.0, 1.9)
    policy = DraftPolicy(shape=shape, step_ms=10.0)
    # A verify step of 3 drafts (4 positions) took 38 ms: a plain step would have taken 20 now.
    after = policy.verified(3, 3, 38.0)
    assert after.step_ms == pytest.approx(10.0 + 0.1 * (20.0 - 10.0))
    assert after.per_token_ms is None  # the linear model is not used
    assert after.cost_ms(3) == pytest.approx(after.step_ms * 1.9)
    # Past the shape, the linear model as before.
    assert DraftPolicy(shape=shape, step_ms=10.0, per_token_ms=2.0).cost_ms(5) == pytest.approx(20.0)


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
