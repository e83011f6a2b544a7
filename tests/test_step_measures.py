"""Which engine step a stage's meter round belongs to, with one reply or several in flight (pure)."""

from __future__ import annotations

from meshtui.engine.protocol import Token
from meshtui.streaming import StepMeasures


def token(request_id: int, decode_call: int) -> Token:
    return Token(request_id, 0, 5, "x", decode_call)


def test_each_step_is_told_once_counted_from_the_step_the_meters_were_reset_at() -> None:
    engine = object()
    steps = StepMeasures()
    steps.meters_reset(1, engine)
    steps.started(2, engine, 40)  # another reply's start does not anchor the count
    steps.started(1, engine, 40)
    steps.started(1, engine, 41)  # nor does a later one
    step = steps.step_of(token(1, 43), engine)
    assert step is not None and step.decode_call == 3  # the meters' fourth round
    assert steps.step_of(token(2, 43), engine) is None  # the same step, seen by another reply's token
    assert steps.step_of(token(2, 44), engine) == token(2, 4)
    assert steps.step_of(token(2, 39), engine) is None  # before the count began


def test_nothing_is_told_until_anchored_nor_for_another_engine() -> None:
    engine, other = object(), object()
    steps = StepMeasures()
    assert steps.step_of(token(1, 3), engine) is None  # the meters were never reset
    steps.meters_reset(1, engine)
    assert steps.step_of(token(1, 3), engine) is None  # reset, but where the count begins is not known yet
    steps.started(1, engine, 0)
    assert steps.step_of(token(1, 3), other) is None  # a recovery's new engine counts its steps anew
    steps.started(1, other, 0)
    assert steps.step_of(token(1, 3), other) is None
    assert steps.step_of(token(1, 3), engine) == token(1, 3)
