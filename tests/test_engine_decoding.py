"""The engine's step loop on the head alone (no stages): speculative decoding and sequences decoded together.

References are llama-cpp-python's own, in a process of their own (tests/reference.py): plain greedy decoding,
and its speculative decoding with prompt lookup (`LlamaPromptLookupDecoding`). The kernels are the same
library's, so equality is exact. The mesh's own runs with stages are in tests/test_speculative_lab.py.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from helpers import SMOLLM2, parting
from reference import reference_greedy, reference_lookup
from synth import write_synthetic_llama

from meshtui.engine import protocol as p
from meshtui.engine.client import EngineProcess
from meshtui.engine.drafts import lookup_draft
from meshtui.errors import EngineError

pytestmark = [pytest.mark.slow]

CONTEXT = 512
COPY_PROMPT = ("Repeat the following list exactly.\nList: apples, pears, plums, cherries, lemons, limes, figs, "
               "dates, grapes, melons.\nRepeated list: apples, pears,")
PLAIN_PROMPT = "The three primary colors are"


@asynccontextmanager
async def engine(parallel: int = 1, batch: int = 512, draft_model: Path | None = None) -> AsyncIterator[EngineProcess]:
    process = EngineProcess()
    await process.start()
    try:
        await process.load(p.Load(model=str(SMOLLM2), context=CONTEXT, threads=1, batch=batch, parallel=parallel,
                                  draft_model=str(draft_model) if draft_model else None))
        yield process
    finally:
        await process.close()


async def reply(process: EngineProcess, request_id: int, prompt: str, max_tokens: int = 48,
                **options: object) -> tuple[list[p.Token], p.Done]:
    tokens: list[p.Token] = []
    async for event in process.generate(p.Generate(id=request_id, prompt=prompt, raw=True, max_tokens=max_tokens,
                                                   temperature=0.0, **options)):  # type: ignore[arg-type]
        if isinstance(event, p.Token) and event.token_id >= 0:
            tokens.append(event)
        elif isinstance(event, p.Done):
            return tokens, event
    raise AssertionError("no Done")


def ids(tokens: list[p.Token]) -> list[int]:
    return [t.token_id for t in tokens]


def margins(tokens: list[p.Token]) -> list[float]:
    """At each token (of a reply asked for logprobs=2): its two likeliest tokens' logprobs apart."""
    return [t.top_logprobs[0][1] - t.top_logprobs[1][1] for t in tokens]


async def test_fixed_length_lookup_drafts_equal_llama_cpp_pythons_speculative_decoding() -> None:
    async with engine() as process:
        for prompt in (COPY_PROMPT, PLAIN_PROMPT):
            tokens, done = await reply(process, 1, prompt, 64, speculative="ngram", draft_length=10)
            expected = reference_lookup(SMOLLM2, prompt, 64, draft_tokens=10, context=CONTEXT)
            assert ids(tokens) == expected["tokens"]
            assert done.text == expected["text"]
            assert done.tokens == tuple(expected["tokens"])  # type: ignore[arg-type]
            # Drafts were verified, some held, and several tokens came out of one step.
            assert done.verify_steps > 0 and 0 < done.accepted <= done.drafted
            steps = [t.decode_call for t in tokens]
            assert len(set(steps)) < len(tokens) and steps == sorted(steps)


async def test_speculation_off_is_plain_greedy_decoding_even_after_a_speculative_reply() -> None:
    async with engine() as process:
        # A speculative reply first, with drafts rejected along the way: nothing of it stays in the cache, so the
        # next reply is computed exactly as on a fresh engine.
        _, first = await reply(process, 1, COPY_PROMPT, 48, speculative="ngram", draft_length=10)
        assert first.accepted < first.drafted
        tokens, done = await reply(process, 2, PLAIN_PROMPT, 48, speculative="off")
    expected = reference_greedy(SMOLLM2, PLAIN_PROMPT, 48, context=CONTEXT)
    assert ids(tokens) == expected["tokens"]
    assert (done.drafted, done.accepted, done.verify_steps) == (0, 0, 0)
    assert len({t.decode_call for t in tokens}) == len(tokens)  # one token per step


# A conversation that already holds the answer: the reply copies it, and the drafts run on past its end
# (<|im_end|>, then the next turn's tokens), which the model would also have produced there.
REPEAT_TURN = ("<|im_start|>user\nRepeat exactly: the cat sat on the mat.<|im_end|>\n<|im_start|>assistant\n"
               "the cat sat on the mat.<|im_end|>\n<|im_start|>user\nRepeat exactly: the cat sat on the mat."
               "<|im_end|>\n<|im_start|>assistant\n")


def expected_accepted(prompt: list[int], reply: list[int], stopped: bool, max_tokens: int, draft_length: int) -> int:
    """Drafts that became tokens of the reply, replaying the step loop's lookup drafts (fixed length) against the
    reply the model produced: a draft counts only if the reply holds it, never one at or past the stop."""
    produced = reply + ([-1] if stopped else [])  # -1: the end of generation, where the reply stops
    accepted, i = 0, 1  # the first token comes out of the prompt's step, with no drafts
    while i < len(produced) and i < max_tokens:
        remaining = max_tokens - i - 1
        drafts = lookup_draft(prompt + reply[:i], min(draft_length, remaining), 2)
        matched = 0
        while matched < len(drafts) and i + matched < len(produced) and drafts[matched] == produced[i + matched]:
            matched += 1
        joined = min(matched + 1, len(reply) - i)  # the tokens of the reply this step added
        accepted += min(matched, joined)
        i += matched + 1
    return accepted


async def test_accepted_counts_only_drafts_the_reply_kept_never_past_its_end() -> None:
    async with engine() as process:
        tokens, done = await reply(process, 1, REPEAT_TURN, 32, speculative="ngram", draft_length=10)
    expected = reference_lookup(SMOLLM2, REPEAT_TURN, 32, draft_tokens=10, context=CONTEXT)
    assert ids(tokens) == expected["tokens"] and done.stop_reason == "stop" and expected["stopped"]
    kept = expected_accepted(expected["prompt_tokens"], expected["tokens"], True, 32, 10)  # type: ignore[arg-type]
    assert kept > 0
    assert done.accepted == kept
    # Tokens per round trip as the TUI shows them: every token beyond the first came from a step, and a step
    # yields its accepted drafts plus at most one token of its own.
    steps = len({t.decode_call for t in tokens})
    assert len(tokens) - steps <= done.accepted <= len(tokens) - 1


def text_of(tokens: list[p.Token]) -> str:
    return "".join(t.text for t in tokens)


async def test_a_stop_string_ends_the_reply_before_it_and_frees_the_sequence() -> None:
    async with engine() as process:
        plain, plain_done = await reply(process, 1, PLAIN_PROMPT, 48, speculative="off")
        words = plain_done.text.split()
        stop = " ".join(words[3:5])  # two words in the middle of the reply: the stop spans tokens
        cut = plain_done.text.find(stop)
        assert cut > 0
        stopped, done = await reply(process, 2, PLAIN_PROMPT, 48, speculative="off", stop=(stop, "never seen"))
        # The sequence was freed at once: the next reply is the plain one again, from an empty cache.
        again, _ = await reply(process, 3, PLAIN_PROMPT, 48, speculative="off")
    assert (done.stop_reason, done.text) == ("stop", plain_done.text[:cut])
    assert text_of(stopped) == plain_done.text[:cut]
    assert ids(stopped) == ids(plain)[:len(stopped)] and len(stopped) < len(plain)
    # It ended at the token that completed the stop string, not later.
    assert stop not in text_of(plain[:len(stopped) - 1]) and stop in text_of(plain[:len(stopped)])
    assert ids(again) == ids(plain)


async def test_drafts_never_run_past_a_stop_string() -> None:
    async with engine() as process:
        plain, plain_done = await reply(process, 1, COPY_PROMPT, 40, speculative="off")
        stop = " figs"
        cut = plain_done.text.find(stop)
        assert cut > 0
        spec, done = await reply(process, 2, COPY_PROMPT, 40, speculative="ngram", draft_length=10, stop=(stop,))
    assert (done.stop_reason, done.text, text_of(spec)) == ("stop", plain_done.text[:cut], plain_done.text[:cut])
    assert ids(spec) == ids(plain)[:len(spec)]
    assert done.verify_steps > 0 and done.accepted <= len(spec) - 1
    # Every accepted draft is a token of the reply: at most one token per step is the model's own.
    assert done.accepted >= len(spec) - len({t.decode_call for t in spec})


async def test_adaptive_drafting_copies_a_list_in_fewer_steps_and_stops_where_it_should() -> None:
    async with engine() as process:
        plain, plain_done = await reply(process, 1, COPY_PROMPT, 40, speculative="off")
        spec, spec_done = await reply(process, 2, COPY_PROMPT, 40, speculative="auto")
        short, short_done = await reply(process, 3, COPY_PROMPT, 5, speculative="auto")
    agreement = sum(a == b for a, b in zip(ids(spec), ids(plain), strict=False)) / len(plain)
    print(f"auto vs off: {agreement:.0%} of {len(plain)} tokens agree; {spec_done.accepted}/{spec_done.drafted} "
          f"drafts accepted in {spec_done.verify_steps} verify steps; ended by {spec_done.stop_reason}, plain by "
          f"{plain_done.stop_reason}")
    assert ids(spec)[:12] == ids(plain)[:12]  # the copied list itself
    assert len({t.decode_call for t in spec}) < len(spec) * 0.7  # fewer steps than tokens
    assert (short_done.stop_reason, len(short)) == ("length", 5)  # max_tokens holds with drafts in flight
    assert ids(short) == ids(plain)[:5]


async def test_calibration_times_each_step_size_and_leaves_the_cache_as_it_was() -> None:
    async with engine() as process:
        plain, _ = await reply(process, 1, PLAIN_PROMPT, 24, speculative="off")
    async with engine() as process:
        costs = await process.calibrate(8)
        after, _ = await reply(process, 1, PLAIN_PROMPT, 24, speculative="off")
    assert len(costs) == 8 and all(ms > 0 for ms in costs)
    # The calibration's steps used the first sequence and removed their positions: the reply on that sequence
    # is the one an engine that never calibrated gives.
    assert ids(after) == ids(plain)


async def test_a_draft_model_drafts_on_the_head_and_its_drafts_are_verified() -> None:
    async with engine(draft_model=SMOLLM2) as process:  # SmolLM2 drafting for itself
        plain, _ = await reply(process, 1, PLAIN_PROMPT, 32, speculative="off")
        drafted, done = await reply(process, 2, PLAIN_PROMPT, 32, speculative="draft", draft_length=4)
    assert done.verify_steps > 0
    assert done.accepted >= 0.8 * done.drafted  # the same model: its drafts nearly always hold
    agreement = sum(a == b for a, b in zip(ids(drafted), ids(plain), strict=False)) / len(plain)
    print(f"draft model vs off: {agreement:.0%} of {len(plain)} tokens agree; {done.accepted}/{done.drafted}")
    assert ids(drafted)[:8] == ids(plain)[:8]


def _other_vocabulary(tmp_path: Path) -> Path:
    """A synthetic model whose vocabulary is SmolLM2's with token 17 renamed."""
    tokenizer = tmp_path / "tokenizer.gguf"
    reader = GGUFReader(SMOLLM2)
    writer = GGUFWriter(tokenizer, arch="llama")
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY and field.types[-1] == GGUFValueType.STRING:
            values: list[object] = [bytes(field.parts[i]) for i in field.data]
            if key == "tokenizer.ggml.tokens":
                values[17] = b"<renamed>"
            writer.add_key_value(key, values, GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
        elif kind == GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), GGUFValueType.ARRAY, sub_type=field.types[-1])
        elif kind == GGUFValueType.STRING:
            writer.add_key_value(key, bytes(field.parts[-1]), GGUFValueType.STRING)
        else:
            writer.add_key_value(key, field.contents(), kind)
    writer.write_header_to_file(tokenizer)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return write_synthetic_llama(tmp_path / "draft.gguf", n_layer=2, source_tokenizer=tokenizer)


async def test_a_draft_model_with_another_vocabulary_is_refused_naming_the_file(tmp_path: Path) -> None:
    draft = _other_vocabulary(tmp_path)
    process = EngineProcess()
    await process.start()
    try:
        with pytest.raises(EngineError) as caught:
            await process.load(p.Load(model=str(SMOLLM2), context=CONTEXT, threads=1, draft_model=str(draft)))
    finally:
        await process.close()
    assert str(caught.value) == (f"model load failed: draft model {draft}: its vocabulary differs from the "
                                 "model's (token 17 is '<renamed>', not '!')")


# -- several sequences decoded together ---------------------------------------------------------------

PROMPTS = [PLAIN_PROMPT, "Once upon a time", "def fibonacci(n):", COPY_PROMPT]


async def test_replies_decoded_together_agree_with_each_decoded_alone() -> None:
    async with engine(parallel=4) as process:
        alone = [(await reply(process, 10 + i, prompt, 32, speculative="off", logprobs=2))[0]
                 for i, prompt in enumerate(PROMPTS)]
        together = await asyncio.gather(*(reply(process, 20 + i, prompt, 32, speculative="off", logprobs=2)
                                          for i, prompt in enumerate(PROMPTS)))
    steps = [{t.decode_call for t in tokens} for tokens, _ in together]
    assert len(set.intersection(*steps)) >= 16  # really decoded together: steps shared by all four
    for i, (tokens, done) in enumerate(together):
        agreement = sum(a == b for a, b in zip(ids(tokens), ids(alone[i]), strict=False)) / len(alone[i])
        same = len(os.path.commonprefix([ids(tokens), ids(alone[i])]))
        drift = max(abs((a.logprob or 0.0) - (b.logprob or 0.0))
                    for a, b in zip(tokens[:same], alone[i][:same], strict=True))
        print(f"prompt {i}: {agreement:.0%} of {len(alone[i])} tokens agree decoded together vs alone; "
              f"logprobs {drift:.4f} apart at most before they part")
        assert done.stop_reason in ("stop", "length")
        assert parting(ids(tokens), ids(alone[i]), margins(alone[i])) is None


async def test_replies_decoded_together_draft_each_for_itself() -> None:
    """Each sequence drafts from its own conversation and is verified in the shared step; token agreement with
    the same request alone is printed."""
    async with engine(parallel=4) as process:
        alone = [(await reply(process, 10 + i, prompt, 32, speculative="ngram", draft_length=4, logprobs=2))
                 for i, prompt in enumerate(PROMPTS)]
        together = await asyncio.gather(*(reply(process, 20 + i, prompt, 32, speculative="ngram", draft_length=4)
                                          for i, prompt in enumerate(PROMPTS)))
    for i, ((tokens, done), (alone_tokens, alone_done)) in enumerate(zip(together, alone, strict=True)):
        agreement = sum(a == b for a, b in zip(ids(tokens), ids(alone_tokens), strict=False)) / len(alone_tokens)
        print(f"prompt {i}: {agreement:.0%} agree together vs alone; drafts {done.accepted}/{done.drafted} "
              f"together, {alone_done.accepted}/{alone_done.drafted} alone")
        assert parting(ids(tokens), ids(alone_tokens), margins(alone_tokens)) is None
        assert done.drafted > 0
    assert together[3][1].accepted > 0  # the list is copied from its own prompt


async def test_a_cancelled_reply_frees_its_sequence_and_disturbs_no_other() -> None:
    async with engine(parallel=2) as process:
        alone, _ = await reply(process, 1, PLAIN_PROMPT, 40, speculative="off", logprobs=2)

        async def cancel_after(request_id: int, count: int) -> p.Done:
            seen = 0
            async for event in process.generate(p.Generate(id=request_id, prompt="Once upon a time", raw=True,
                                                           max_tokens=200, temperature=0.0, speculative="off")):
                if isinstance(event, p.Token):
                    seen += 1
                    if seen == count:
                        process.cancel(request_id)
                if isinstance(event, p.Done):
                    return event
            raise AssertionError("no Done")

        (kept, _), cancelled = await asyncio.gather(reply(process, 2, PLAIN_PROMPT, 40, speculative="off"),
                                                    cancel_after(3, 5))
        # The freed sequence serves the next request, which is decoded like the first one was.
        again, _ = await reply(process, 4, PLAIN_PROMPT, 40, speculative="off")
    assert cancelled.stop_reason == "cancelled" and 5 <= len(cancelled.tokens) < 200
    assert parting(ids(kept), ids(alone), margins(alone)) is None  # decoded beside the cancelled one
    assert ids(again) == ids(alone)  # alone again: exactly


async def test_a_long_prompt_is_read_in_chunks_between_the_steps_of_a_running_reply() -> None:
    long_prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 20)  # about 200 tokens
    async with engine(parallel=2, batch=64) as process:
        first = asyncio.create_task(reply(process, 1, PLAIN_PROMPT, 40, speculative="off"))
        await asyncio.sleep(0)
        second, second_done = await reply(process, 2, long_prompt, 4, speculative="off")
        running, _ = await first
    # The prompt was read 64 tokens a step, each chunk a step of its own between the running reply's steps
    # (one run length a step: one graph, a round trip per stage), so the running reply got a token every other
    # step while it was read and every step otherwise; the second reply's tokens came in the steps they shared.
    steps = [t.decode_call for t in running]
    assert {b - a for a, b in zip(steps, steps[1:], strict=False)} == {1, 2}
    read = set(range(steps[0], steps[-1])) - set(steps)
    assert second_done.prompt_tokens > 3 * 64 and len(read) == -(-second_done.prompt_tokens // 64)
    assert second[0].decode_call == max(read)  # its first token from the step that read the prompt's end
    assert len(second) == 4 and {t.decode_call for t in second[1:]} <= set(steps)
