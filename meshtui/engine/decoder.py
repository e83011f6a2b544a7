"""The engine's step loop: the sequences in flight advance together, one `llama_decode` a step.

A step's batch holds runs of one length (`Decoder._runs`), up to the batch size: for a sequence that is decoding,
its latest token plus the tokens drafted after it (all with logits); for one being read, a chunk of its prompt
(logits only where the prompt ends). Every sequence whose next run has the step's length joins it, so replies
decoding one token at a time all advance in every plain step, and a joining prompt or a verify of other length
takes a step of its own: one graph a step, one round trip per stage whatever it holds (what drafting and
batching both exploit), and each run decoded whole, as it would be alone.

After the step each decoding sequence samples at its positions with its own sampler chain and keeps the drafts
while they equal what it sampled (exact for any sampler: the tokens are the ones a plain run would sample from
the same logits); the rejected positions leave the KV cache (`llama_memory_seq_rm`, which the RPC stages follow
through the next graph, nothing extra on hosts).
"""

from __future__ import annotations

import codecs
import heapq
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshtui.engine.drafts import DraftModel, DraftPolicy, NgramIndex, lookup_draft, step_shape
from meshtui.engine.protocol import Done, Event, Failed, Generate, Started, Token
from meshtui.engine.sampling import SamplerError, build_sampler, token_logprobs
from meshtui.engine.stops import StopText

# Adaptive drafts come from the longest earlier run (up to 8 tokens) the reply's latest tokens repeat; `auto` needs
# at least 2 (one recurring token says little). Replayed offline on 19 greedy SmolLM2 replies (bench/draft_replay.py)
# against runs of exactly 3 and of 1-8 or 3-8 tokens: copy prompts gained most, and the worst reply with nothing to
# copy lost least (docs/performance.md, session 11).
ADAPTIVE_MAX_NGRAM = 8
AUTO_MIN_NGRAM = 2


@dataclass
class Slot:
    """One request in flight on its own sequence id (mutable, the decoder's own)."""

    request: Generate
    seq_id: int
    prompt: list[int]
    max_tokens: int
    sampler: Any
    mode: str  # "auto", "ngram", "draft" or "off"
    feeds: deque[list[int]]  # runs still to read before the next sample, a chunk a step (split if long)
    generated: list[int]
    started: float
    n_past: int = 0  # positions of this sequence in the KV cache
    last: int | None = None  # the latest sampled token, not yet in the KV cache
    policy: DraftPolicy = field(default_factory=DraftPolicy)
    drafts: list[int] = field(default_factory=list)
    draft_ms: float = 0.0
    text_parts: list[str] = field(default_factory=list)
    utf8: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    stops: StopText = field(default_factory=lambda: StopText(()))
    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0
    last_step: int = -1
    drafted_at: int = -1  # the n_past `drafts` were chosen at (-1: none chosen yet)
    last_ran: int = -1  # the step that last took a run of this sequence (-1: none yet, first in line)
    lookup: NgramIndex | None = None  # the prompt and reply so far, for adaptive n-gram drafts (made when first used)


class Decoder:
    """Requests in, events out (`send`); `step()` advances every request in flight by one decode."""

    def __init__(self, llama_cpp: Any, model: Any, ctx: Any, *, context: int, parallel: int, batch: int,
                 send: Callable[[Event], None], draft_model: DraftModel | None = None) -> None:
        self._llama = llama_cpp
        self.model = model
        self.ctx = ctx
        self.context = context  # each sequence's
        self.batch_size = batch
        self.send = send
        self.draft_model = draft_model
        self.free_seqs: list[int] = list(range(parallel))  # a heap: the lowest id first
        self.waiting: deque[tuple[Generate, list[int]]] = deque()
        self.slots: list[Slot] = []
        self.cancelled: set[int] = set()
        self.cancel_all = False
        self.steps = 0  # decode steps since load: a Token's decode_call
        self._batch = llama_cpp.llama_batch_init(batch, 0, 1)
        self.step_shape: tuple[float, ...] = ()  # each slot's drafting policy's (`calibrate`); empty: linear

    def calibrate(self, positions: int, rounds: int = 2, budget_s: float = 1.0) -> list[float]:
        """Time steps of 1, 2, ..., `positions` positions of one sequence, each asking for every logit as a verify
        step does (the fastest of `rounds`), and give every later request's drafting policy their shape
        (`step_shape`, extended to the longest draft). What a step costs for its positions is the mesh's: its
        kernels, stages and round trips. Past `budget_s` it stops with what it has (a model whose steps are slow
        gets one round, or its shortest steps and the rest extrapolated). Run while no request is in flight: it
        takes the first free sequence id and leaves its cache empty. Returns the ms of the steps timed (empty if
        one failed)."""
        if self.slots or self.waiting:
            raise RuntimeError("calibrate while no request is in flight")
        positions = min(positions, self.batch_size)
        seq_id = self.free_seqs[0]
        vocab = self._llama.llama_vocab_n_tokens(self.model.vocab)
        best = [float("inf")] * positions
        began = time.perf_counter()
        plan = [1] + [n for _ in range(rounds) for n in range(1, positions + 1)]  # a first step, untimed, warms up
        for index, n in enumerate(plan):
            if index > 2 and time.perf_counter() - began > budget_s:
                break
            for i in range(n):
                self._put(i, (i + 1) % vocab, i, seq_id, True)
            self._batch.n_tokens = n
            status, ms = self._decode()
            self._llama.llama_memory_seq_rm(self.ctx.memory, seq_id, -1, -1)
            if status != 0:
                return []
            if index:
                best[n - 1] = min(best[n - 1], ms)
        timed = best[:best.index(float("inf"))] if float("inf") in best else best
        self.price_steps(timed)
        return timed

    def price_steps(self, step_ms: Sequence[float]) -> None:
        """Every later request's drafting policy prices a step of 1, 2, ... positions as these took."""
        self.step_shape = step_shape(step_ms, DraftPolicy.max_length + 1)

    @property
    def busy(self) -> bool:
        return bool(self.slots or self.waiting)

    # -- requests --------------------------------------------------------------------------------
    def submit(self, request: Generate, prompt: list[int]) -> None:
        """Queue a request whose prompt is tokenized; it joins at the next step a sequence is free."""
        tokens = len(prompt) + len(request.resume_tokens)
        if not prompt:  # a model without a BOS token, and nothing to read: no logits to sample from
            self.send(Failed("the prompt is empty", request.id))
            return
        if tokens >= self.context:
            self.send(Failed(f"prompt is {tokens} tokens; the context holds {self.context}", request.id,
                             prompt_tokens=tokens, context=self.context))
            return
        if request.speculative == "draft" and self.draft_model is None:
            self.send(Failed("speculative 'draft' needs a draft model: set [model] draft in the inventory",
                             request.id))
            return
        self.waiting.append((request, prompt))

    def cancel(self, request_id: int | None) -> None:
        """Called from the command reader's thread: the step loop acts on it at its next step."""
        if request_id is None:
            self.cancel_all = True
        else:
            self.cancelled.add(request_id)

    def _admit(self) -> None:
        while self.waiting and self.free_seqs:
            request, prompt = self.waiting.popleft()
            if request.id in self.cancelled:
                self.cancelled.discard(request.id)
                self.send(Done(request.id, "cancelled", (), "", 0.0, len(prompt)))
                continue
            resume = [int(t) for t in request.resume_tokens]
            max_tokens = min(int(request.max_tokens or 256), self.context - len(prompt))
            try:
                sampler = build_sampler(self._llama, self.model.vocab, request)
            except SamplerError as err:
                self.send(Failed(str(err), request.id))
                continue
            self.send(Started(request.id, len(prompt), self.steps))
            if len(resume) >= max_tokens:
                self._llama.llama_sampler_free(sampler)
                self.send(Done(request.id, "length", tuple(resume), "", 0.0, len(prompt)))
                continue
            seq_id = heapq.heappop(self.free_seqs)
            self._llama.llama_memory_seq_rm(self.ctx.memory, seq_id, -1, -1)
            for token in resume:  # the repeat penalty sees the reply so far, as it did the first time
                self._llama.llama_sampler_accept(sampler, token)
            # After a stage was lost the reply resumes: the prompt in one run, then each token generated
            # so far on its own, rebuilding the KV cache the way plain decoding built it.
            feeds: deque[list[int]] = deque([prompt, *([t] for t in resume)])
            slot = Slot(request=request, seq_id=seq_id, prompt=prompt, max_tokens=max_tokens, sampler=sampler,
                        mode=request.speculative, feeds=feeds, generated=resume, started=time.perf_counter(),
                        stops=StopText(request.stop), policy=DraftPolicy(shape=self.step_shape))
            if resume:  # shown by the attempt before, but for a tail that could begin a stop string: held here
                slot.stops.resume(slot.utf8.decode(b"".join(self.model.detokenize([t]) for t in resume)))
            self.slots.append(slot)

    # -- drafting --------------------------------------------------------------------------------
    def _draft(self, slot: Slot, room: int) -> list[int]:
        """The tokens to verify after `slot.last` this step (none for a plain step)."""
        request = slot.request
        if slot.mode == "off":
            return []
        remaining = slot.max_tokens - len(slot.generated) - 1
        if request.draft_length > 0:
            limit = request.draft_length
        else:
            limit = slot.policy.length(minimum=1 if slot.mode in ("ngram", "draft") else 0)
        limit = min(limit, remaining, room)
        if limit <= 0:
            return []
        drafts: list[int] = []
        started = time.perf_counter()
        if slot.mode in ("auto", "ngram") and request.draft_length > 0:  # llama-cpp-python's prompt lookup
            drafts = lookup_draft(slot.prompt + slot.generated, limit, 2)
        elif slot.mode in ("auto", "ngram"):
            if slot.lookup is None:
                slot.lookup = NgramIndex(ADAPTIVE_MAX_NGRAM, AUTO_MIN_NGRAM if slot.mode == "auto" else 1)
                slot.lookup.extend(slot.prompt)
            slot.lookup.extend(slot.generated[len(slot.lookup.history) - len(slot.prompt):])  # the new tokens
            drafts = slot.lookup.draft(limit)
        if not drafts and self.draft_model is not None and slot.mode in ("auto", "draft"):
            drafts = self.draft_model.draft(slot.seq_id, slot.prompt + slot.generated, limit,
                                            min_probability=0.0 if request.draft_length > 0 else 0.5)
        slot.draft_ms = (time.perf_counter() - started) * 1000.0
        return drafts

    # -- the step --------------------------------------------------------------------------------
    def _put(self, index: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        batch = self._batch
        batch.token[index] = token
        batch.pos[index] = pos
        batch.n_seq_id[index] = 1
        batch.seq_id[index][0] = seq_id
        batch.logits[index] = logits

    def _decode(self) -> tuple[int, float]:
        """`llama_decode` of the batch as filled: its status, and the ms until its results are here (it returns
        with the last commands to the stages possibly still in flight: ggml's RPC client sends them from a thread
        of its own)."""
        started = time.perf_counter()
        status = self._llama.llama_decode(self.ctx.ctx, self._batch)
        if status == 0:
            self._llama.llama_synchronize(self.ctx.ctx)
        return status, (time.perf_counter() - started) * 1000.0

    def step(self) -> None:
        self._drop_cancelled()
        self._admit()
        if not self.slots:
            return
        verifying: list[tuple[Slot, int]] = []  # (slot, batch index of its latest token)
        sampling: list[tuple[Slot, int]] = []  # (slot, batch index of its prompt's last token)
        n = 0
        for slot, tokens, final in self._runs():
            if final is None:
                verifying.append((slot, n))
            for i, token in enumerate(tokens):
                self._put(n, token, slot.n_past + i, slot.seq_id, final is None or (final and i == len(tokens) - 1))
                n += 1
            if final is not None:
                slot.n_past += len(tokens)
                if final:
                    sampling.append((slot, n - 1))
        self._batch.n_tokens = n
        status, ms = self._decode()
        step = self.steps
        self.steps += 1
        if status != 0:
            self.fail_all(f"llama_decode failed (status {status})")
            return
        for slot, index in sampling:
            token = self._llama.llama_sampler_sample(slot.sampler, self.ctx.ctx, index)
            _, end = self._produce(slot, [token], step, ms, [self._scored(slot, index, token)])
            if end:
                self._finish(slot, end)
        for slot, index in verifying:
            self._verify(slot, index, step, ms)

    def _runs(self) -> list[tuple[Slot, list[int], bool | None]]:
        """This step's runs, in ascending sequence ids: (slot, its tokens, whether its prompt ends; None: it
        verifies its latest token and drafts). One run length a step (the module's docstring says why): that of
        the sequence that waited longest (decoding before reading at a tie), with every other sequence whose run
        has it, as the batch holds. With a KV cache per sequence llama.cpp would split runs of several lengths
        into as many graphs, and a run split across graphs rounds apart from the run whole."""
        wanted: list[tuple[Slot, list[int], bool | None]] = []
        for slot in self.slots:
            if slot.last is not None:  # decoding: its latest token and the drafts chosen for this position
                if slot.drafted_at != slot.n_past:
                    slot.drafts = self._draft(slot, self.batch_size - 1)
                    slot.drafted_at = slot.n_past
                wanted.append((slot, [slot.last, *slot.drafts], None))
            else:  # reading: its next chunk, as much of the batch as it may fill
                chunk = slot.feeds[0][:self.batch_size]
                wanted.append((slot, chunk, len(chunk) == len(slot.feeds[0]) and len(slot.feeds) == 1))
        first = min(wanted, key=lambda w: (w[0].last_ran, w[2] is not None, w[0].seq_id))
        length, room = len(first[1]), self.batch_size - len(first[1])
        runs = [first]
        for other in wanted:
            if other is not first and len(other[1]) == length and room >= length:
                runs.append(other)
                room -= length
        for slot, tokens, _ in runs:
            slot.last_ran = self.steps
            if slot.last is None:
                if len(tokens) < len(slot.feeds[0]):
                    slot.feeds[0] = slot.feeds[0][len(tokens):]
                else:
                    slot.feeds.popleft()
        # In ascending ids: llama.cpp's split takes consecutive ascending ids into one graph; the lowest free id
        # is taken, so they stay consecutive.
        return sorted(runs, key=lambda r: r[0].seq_id)

    def _verify(self, slot: Slot, index: int, step: int, ms: float) -> None:
        produced: list[int] = []
        scores: list[tuple[float, tuple[tuple[str, float], ...]] | None] = []
        drafts = slot.drafts
        for i in range(len(drafts) + 1):
            token = self._llama.llama_sampler_sample(slot.sampler, self.ctx.ctx, index + i)
            produced.append(token)
            scores.append(self._scored(slot, index + i, token))
            if i == len(drafts) or token != drafts[i]:
                break
        matched = len(produced) - 1
        slot.n_past += 1 + matched
        if matched < len(drafts):  # the rejected drafts' positions leave the cache
            self._llama.llama_memory_seq_rm(self.ctx.memory, slot.seq_id, slot.n_past, -1)
        slot.drafts = []
        kept, end = self._produce(slot, produced, step, ms, scores)
        # Accepted: the drafts the reply holds. Drafts that matched at or past where it stopped (end of
        # generation, a stop string) are not, though the model agreed with them.
        accepted = min(matched, kept)
        if drafts:
            slot.drafted += len(drafts)
            slot.accepted += accepted
            slot.verify_steps += 1
        slot.policy = slot.policy.verified(len(drafts), accepted, ms, slot.draft_ms)
        if end:
            self._finish(slot, end)

    def _scored(self, slot: Slot, index: int, token: int) -> tuple[float, tuple[tuple[str, float], ...]] | None:
        """The token's logprob and the top alternatives', when the request asked for them."""
        top = slot.request.logprobs
        return None if top is None else token_logprobs(self._llama, self.ctx.ctx, self.model, index, token, top)

    def _produce(self, slot: Slot, tokens: Sequence[int], step: int, ms: float,
                 scores: Sequence[tuple[float, tuple[tuple[str, float], ...]] | None]) -> tuple[int, str | None]:
        """Emit what a step produced for `slot`, up to end of generation, a stop string, the length, or a cancel:
        how many of `tokens` joined the reply, and why the reply ends (None: it goes on). The caller finishes it."""
        request = slot.request
        for kept, (token, score) in enumerate(zip(tokens, scores, strict=True)):
            if self._llama.llama_vocab_is_eog(self.model.vocab, token):
                return kept, "stop"
            slot.generated.append(token)
            slot.last = token
            slot.last_step = step
            text = slot.stops.feed(slot.utf8.decode(self.model.detokenize([token])))
            slot.text_parts.append(text)
            logprob, top = score if score is not None else (None, ())
            self.send(Token(request.id, len(slot.generated) - 1, token, text, step, ms, logprob, top))
            if slot.stops.stopped:  # the text ends before the stop string, and the reply with it
                return kept + 1, "stop"
            if len(slot.generated) >= slot.max_tokens:
                return kept + 1, "length"
            if self.cancel_all or request.id in self.cancelled:
                return kept + 1, "cancelled"
        return len(tokens), None

    def fail_all(self, message: str) -> None:
        """Every request in flight ends with `message`; their sequences are freed."""
        for slot in list(self.slots):
            self.send(Failed(message, slot.request.id))
            self._release(slot)

    def _drop_cancelled(self) -> None:
        for slot in list(self.slots):
            if self.cancel_all or slot.request.id in self.cancelled:
                self._finish(slot, "cancelled")
        self.cancel_all = False

    def _finish(self, slot: Slot, reason: str) -> None:
        tail = slot.stops.feed(slot.utf8.decode(b"", final=True)) + slot.stops.flush()
        if tail:
            slot.text_parts.append(tail)
            self.send(Token(slot.request.id, len(slot.generated) - 1, -1, tail, max(0, slot.last_step)))
        self.send(Done(slot.request.id, reason, tuple(slot.generated), "".join(slot.text_parts),
                       time.perf_counter() - slot.started, len(slot.prompt), slot.drafted, slot.accepted,
                       slot.verify_steps))
        self.cancelled.discard(slot.request.id)
        self._release(slot)

    def _release(self, slot: Slot) -> None:
        """The sequence's cache is emptied and its id freed: nothing of this request stays behind."""
        self._llama.llama_memory_seq_rm(self.ctx.memory, slot.seq_id, -1, -1)
        if self.draft_model is not None:
            self.draft_model.forget(slot.seq_id)
        self._llama.llama_sampler_free(slot.sampler)
        self.slots.remove(slot)
        heapq.heappush(self.free_seqs, slot.seq_id)
