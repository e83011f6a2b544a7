"""Drafts the mesh verifies several at a time: made on the head, they never cross the network.

A decode step costs one round trip per stage whatever its batch holds, so a step that verifies k drafted tokens
plus the next one costs about one round trip plus a little compute, and yields every drafted token the model
agrees with plus one of its own. Here: where drafts come from (n-gram lookup over the conversation so far, or a
small draft model with the model's vocabulary run on the head's CPU), and how many to draft (`DraftPolicy`, a
pure controller fed what each step cost and how much of its draft was accepted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# -- n-gram lookup (pure) -----------------------------------------------------------------------------


def lookup_draft(history: Sequence[int], n: int, max_ngram: int = 2, min_ngram: int = 1) -> list[int]:
    """Up to `n` tokens that followed the earliest earlier occurrence of the longest suffix of `history`.

    The same drafts as llama-cpp-python's `LlamaPromptLookupDecoding(max_ngram_size, num_pred_tokens)`, so a
    mesh run with a fixed draft length can be compared token for token with that single-process reference.
    Copying prompts (repeat, rewrite, extract, edit given text) draft whole runs this way. `min_ngram`: no draft
    from a suffix shorter than that (a single common token recurring says little about copying).
    """
    length = len(history)
    if n <= 0:
        return []
    for size in range(min(max_ngram, length - 1), max(1, min_ngram) - 1, -1):
        suffix = list(history[length - size:])
        first = suffix[0]
        for start in range(0, length - size + 1):
            if history[start] != first or list(history[start:start + size]) != suffix:
                continue
            begin = start + size
            end = min(begin + n, length)
            if begin < end:
                return list(history[begin:end])
    return []


class NgramIndex:
    """`lookup_draft` over a history that only grows, without scanning it each time: the earliest start of every
    n-gram of `min_ngram` to `max_ngram` tokens, kept as tokens arrive (a reply's drafts come from its prompt and
    itself, so a long context would otherwise be scanned once per size at every step)."""

    def __init__(self, max_ngram: int, min_ngram: int = 1) -> None:
        self.max_ngram = max_ngram
        self.min_ngram = max(1, min_ngram)
        self.history: list[int] = []
        self._first: dict[tuple[int, ...], int] = {}

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.history.append(token)
            end = len(self.history)
            for size in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self._first.setdefault(tuple(self.history[end - size:]), end - size)

    def draft(self, n: int) -> list[int]:
        """What `lookup_draft(history, n, max_ngram, min_ngram)` returns."""
        length = len(self.history)
        if n <= 0:
            return []
        for size in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            begin = self._first[tuple(self.history[length - size:])] + size
            if begin < length:
                return self.history[begin:begin + n]
        return []


# -- how many to draft (pure) -------------------------------------------------------------------------


@dataclass(frozen=True)
class DraftPolicy:
    """The draft length that maximises expected tokens per millisecond, learnt from the steps seen.

    Model: a step verifying k drafts costs `step_ms + per_token_ms * k` (a round trip per stage and the head's
    work, then the compute of each extra position) plus `draft_ms * k` to make the drafts; it yields
    (1 - a^(k+1)) / (1 - a) tokens when each draft is accepted with probability a (given the ones before it
    were). When no k > 0 beats a plain step, drafting is off; it probes again (one draft) after `probe_after`
    steps, waiting twice as long each time a probe does not pay (up to `max_probe_after`).

    With `shape` (what a step of 1 + k positions costs over a step of one, k = 0, 1, ..., measured on the mesh
    at load: `step_shape`) a step verifying k drafts costs `step_ms * shape[k]` instead: on CPU stages a step's
    cost is not linear in its positions (ggml's matrix kernels take activations four rows at a time, the rest
    one by one: 4 positions can cost less than 3), and every step, plain or not, keeps `step_ms` current.
    """

    max_length: int = 16
    accepted_weight: float = 1.0  # discounted counts: accepted drafts, and positions tried
    tried_weight: float = 2.0
    step_ms: float | None = None  # a plain step (no draft), as measured
    per_token_ms: float | None = None  # each extra position verified in the same step
    draft_ms: float = 0.0  # making one drafted token
    off_for: int = 0  # plain steps left before the next probe
    probe_after: int = 16
    max_probe_after: int = 256
    decay: float = 0.9
    prior_per_token_share: float = 0.15  # before any verify step: extra position = this share of a plain step
    shape: tuple[float, ...] = ()  # a step of 1 + k positions over a step of one, by k (empty: the linear model)

    @property
    def acceptance(self) -> float:
        return self.accepted_weight / self.tried_weight if self.tried_weight > 0 else 0.0

    def expected_tokens(self, k: int) -> float:
        a = min(self.acceptance, 0.999)
        return (1.0 - a ** (k + 1)) / (1.0 - a)

    def cost_ms(self, k: int) -> float:
        step = self.step_ms if self.step_ms is not None else 1.0
        if k < len(self.shape):
            return step * self.shape[k] + self.draft_ms * k
        per_token = self.per_token_ms if self.per_token_ms is not None else step * self.prior_per_token_share
        return step + (per_token + self.draft_ms) * k

    def best_length(self) -> int:
        rates = [(self.expected_tokens(k) / self.cost_ms(k), -k) for k in range(self.max_length + 1)]
        return -max(rates)[1]

    def length(self, minimum: int = 0) -> int:
        """How many tokens to draft for the next step (0: a plain step). Off, it waits; back on, it probes with
        one draft (the cheapest probe: where an extra position costs nearly a step, as on CPU stages, a probe
        of two cost a rejected reply 2-3 steps' worth), which shows drafting pays again if it is kept.
        `minimum`: never fewer."""
        if self.off_for > 0:
            return minimum
        return max(minimum, self.best_length() or 1)

    def plain_step(self, ms: float) -> DraftPolicy:
        """A step that verified no draft took `ms`."""
        return replace(self, step_ms=self._step_from(ms), off_for=max(0, self.off_for - 1))

    def _step_from(self, ms: float, k: int = 0) -> float:
        """`step_ms` after a step of 1 + k positions took `ms` (k > 0 only where `shape` covers it)."""
        one = ms / self.shape[k] if k else ms
        return one if self.step_ms is None else self.step_ms + (1 - self.decay) * (one - self.step_ms)

    def verified(self, drafted: int, accepted: int, ms: float, draft_ms: float = 0.0) -> DraftPolicy:
        """A step verified `drafted` tokens in `ms` (drafting them took `draft_ms`) and `accepted` of them held."""
        if drafted <= 0:
            return self.plain_step(ms)
        tried = accepted + (1 if accepted < drafted else 0)
        policy = replace(
            self,
            accepted_weight=self.decay * self.accepted_weight + accepted,
            tried_weight=self.decay * self.tried_weight + tried,
            draft_ms=self.draft_ms + (1 - self.decay) * (draft_ms / drafted - self.draft_ms) if self.draft_ms
            else draft_ms / drafted,
        )
        if drafted < len(policy.shape):
            policy = replace(policy, step_ms=policy._step_from(ms, drafted))
        elif policy.step_ms is not None:
            extra = max(0.0, (ms - policy.step_ms) / drafted)
            per_token = extra if policy.per_token_ms is None else \
                policy.per_token_ms + (1 - self.decay) * (extra - policy.per_token_ms)
            policy = replace(policy, per_token_ms=per_token)
        if policy.best_length() == 0:  # this probe did not pay: plain steps for a while, then probe again
            return replace(policy, off_for=policy.probe_after,
                           probe_after=min(policy.max_probe_after, policy.probe_after * 2))
        return replace(policy, probe_after=DraftPolicy.probe_after) if accepted else policy


TILE = 4  # ggml's CPU matrix kernels take activations this many rows at a time (repacked and tinyBLAS alike)
CALIBRATE_POSITIONS = 2 * TILE  # steps timed after a load; longer ones are extrapolated tile by tile


def step_shape(costs_ms: Sequence[float], positions: int) -> tuple[float, ...]:
    """`DraftPolicy.shape` for steps of 1 to `positions` positions, from what steps of 1, 2, 3, ... took (measured
    up to two tiles): each over the first (at least 1). Past the measured ones, a step costs what the one a tile
    shorter cost plus the last tile's cost (one position's, where fewer than two tiles were measured)."""
    costs = list(costs_ms)
    if not costs or costs[0] <= 0:
        return ()
    if len(costs) >= 2 * TILE:
        period, extra = TILE, costs[-1] - costs[-1 - TILE]
    else:
        period, extra = 1, (costs[-1] - costs[0]) / max(1, len(costs) - 1)
    while len(costs) < positions:
        costs.append(costs[-period] + extra)
    return tuple(max(1.0, ms / costs[0]) for ms in costs[:positions])


# -- a draft model on the head's CPU ------------------------------------------------------------------


class DraftModelError(ValueError):
    """The draft model cannot draft for this model (a different vocabulary): the message names the file."""


def _vocab_texts(llama_cpp: Any, vocab: Any) -> list[bytes]:
    return [llama_cpp.llama_vocab_get_text(vocab, i) or b"" for i in range(llama_cpp.llama_vocab_n_tokens(vocab))]


def vocabulary_mismatch(path: str | Path, draft: Sequence[bytes], target: Sequence[bytes]) -> str | None:
    """Why a draft model with vocabulary `draft` cannot draft for one with `target` (None: it can)."""
    if len(draft) != len(target):
        return f"draft model {path}: its vocabulary has {len(draft)} tokens, the model's {len(target)}"
    for index, (mine, theirs) in enumerate(zip(draft, target, strict=True)):
        if mine != theirs:
            return (f"draft model {path}: its vocabulary differs from the model's "
                    f"(token {index} is {mine.decode('utf-8', 'replace')!r}, not "
                    f"{theirs.decode('utf-8', 'replace')!r})")
    return None


class DraftModel:
    """A small model with the target's vocabulary, on the head's CPU, one sequence per engine sequence.

    Its KV cache keeps each sequence's history; a draft decodes only what is new since the last one, then up
    to n tokens greedily, stopping early when its own confidence falls under `min_probability`.
    """

    def __init__(self, path: str, target_vocab: Any, *, context: int, sequences: int, threads: int,
                 batch: int = 512) -> None:
        import llama_cpp
        from llama_cpp import _internals as internals

        self.path = path
        self._llama = llama_cpp
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0  # the head's CPU only: a draft never crosses the network
        self.model = internals.LlamaModel(path_model=path, params=params, verbose=False)
        problem = vocabulary_mismatch(path, _vocab_texts(llama_cpp, self.model.vocab),
                                      _vocab_texts(llama_cpp, target_vocab))
        if problem:
            self.model.close()
            raise DraftModelError(problem)
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = context * sequences
        ctx_params.n_batch = ctx_params.n_ubatch = batch
        ctx_params.n_seq_max = sequences
        ctx_params.n_threads = ctx_params.n_threads_batch = threads
        ctx_params.offload_kqv = False
        ctx_params.op_offload = False
        ctx_params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = internals.LlamaContext(model=self.model, params=ctx_params, verbose=False)
        self.batch_size = batch
        self.batch = llama_cpp.llama_batch_init(batch, 0, 1)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.model.vocab)
        self.cached: dict[int, list[int]] = {}

    def forget(self, seq_id: int) -> None:
        self._llama.llama_memory_seq_rm(self.ctx.memory, seq_id, -1, -1)
        self.cached.pop(seq_id, None)

    def _decode(self, seq_id: int, tokens: Sequence[int], pos: int) -> None:
        batch = self.batch
        for start in range(0, len(tokens), self.batch_size):
            chunk = tokens[start:start + self.batch_size]
            batch.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = pos + start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq_id
                batch.logits[i] = i == len(chunk) - 1
            if self._llama.llama_decode(self.ctx.ctx, batch) != 0:
                raise RuntimeError(f"draft model {self.path}: decode failed")

    def _top(self) -> tuple[int, float]:
        """The most likely next token and its probability."""
        import numpy as np

        logits = np.ctypeslib.as_array(self._llama.llama_get_logits_ith(self.ctx.ctx, -1), shape=(self.n_vocab,))
        best = int(np.argmax(logits))
        return best, float(1.0 / np.exp(logits - logits[best]).sum())

    def draft(self, seq_id: int, history: Sequence[int], n: int, min_probability: float = 0.0) -> list[int]:
        """Up to n tokens the draft model expects after `history` (whose last token the target has not seen)."""
        if n <= 0 or not history:
            return []
        cached = self.cached.get(seq_id, [])
        common = 0
        for mine, theirs in zip(cached, history[:-1], strict=False):
            if mine != theirs:
                break
            common += 1
        self._llama.llama_memory_seq_rm(self.ctx.memory, seq_id, common, -1)
        self._decode(seq_id, history[common:], common)
        drafted: list[int] = []
        pos = len(history)
        while True:
            token, probability = self._top()
            if probability < min_probability or self._llama.llama_vocab_is_eog(self.model.vocab, token):
                break
            drafted.append(token)
            if len(drafted) >= n:
                break
            self._decode(seq_id, [token], pos)
            pos += 1
        self.cached[seq_id] = list(history) + drafted[:-1] if drafted else list(history)
        return drafted

    def close(self) -> None:
        self._llama.llama_batch_free(self.batch)
        self.ctx.close()
        self.model.close()

