"""The engine's wire contract: every command and event survives encode -> decode; bad lines are named."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshtui.engine import protocol as p

SAMPLES: list[p.Command | p.Event] = [
    p.Load(model="/m.gguf", context=512, endpoints=("127.0.0.1:1",), tensor_split=(2.0, 1.0), n_gpu_layers=3,
           threads=2),
    p.Generate(id=3, messages=({"role": "user", "content": "hi"},), max_tokens=8, temperature=0.0,
               resume_tokens=(1, 2)),
    p.Generate(id=4, prompt="The sky", raw=True),
    p.Generate(id=5, prompt="x", presence_penalty=0.5, frequency_penalty=-0.25, logit_bias=((17, -100.0), (3, 2.5)),
               grammar='root ::= "a"', logprobs=3, stop=("\n", "END")),
    p.Cancel(), p.Cancel(7), p.Shutdown(),
    p.Hello(pid=42),
    p.Loaded(seconds=1.5, placement={"CPU": [0, 1], "RPC0": [2]}, device_endpoints={"RPC0": "127.0.0.1:1"},
             n_layer=2),
    p.Started(id=3, prompt_tokens=5),
    p.Token(id=3, index=0, token_id=17, text=" blue", decode_call=0, decode_ms=12.5),
    p.Token(id=3, index=1, token_id=18, text=".", decode_call=1, logprob=-0.5,
            top_logprobs=((".", -0.5), ("!", -1.25))),
    p.Done(id=3, stop_reason="stop", tokens=(17,), text=" blue", seconds=0.1, prompt_tokens=5),
    p.Failed("prompt is 600 tokens; the context holds 512", id=3, prompt_tokens=600, context=512),
    p.Failed("bad command line: not JSON: b'x'"),
    p.Bye(),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: p.Command | p.Event) -> None:
    line = p.encode(message)
    assert line.endswith("\n") and line.count("\n") == 1
    decoded = p.decode_event(line) if type(message) in p.EVENT_TYPES else p.decode_command(line)
    assert decoded == message


@given(text=st.text(), index=st.integers(0, 10**6), token_id=st.integers(-1, 10**6))
def test_any_token_text_round_trips(text: str, index: int, token_id: int) -> None:
    token = p.Token(id=1, index=index, token_id=token_id, text=text, decode_call=index, decode_ms=0.5)
    assert p.decode_event(p.encode(token).encode()) == token


@pytest.mark.parametrize(("line", "message"), [
    ('{"ev": "tokn"}', "unknown ev 'tokn'"),
    ('{"ev": "started", "id": 1, "prompt_tokens": 2, "extra": 1}', "started: unknown field 'extra'"),
    ('{"ev": "started", "id": 1}', "started: "),
    ("[1]", "not a JSON object: '[1]'"),
    ("{nope", "not JSON: '{nope'"),
    ('{"op": "generate"}', "unknown ev None"),
])
def test_a_line_that_is_not_the_protocol_is_refused_with_what_is_wrong(line: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        p.decode_event(line)
    assert str(caught.value).startswith(message)


def test_commands_are_not_events() -> None:
    with pytest.raises(ValueError, match="^unknown op None$"):
        p.decode_command(p.encode(p.Hello(pid=1)))
