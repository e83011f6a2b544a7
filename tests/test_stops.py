"""Stop strings in the engine's text (pure): cut before the first, hold back only what could still begin one."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meshtui.engine.stops import StopText


def shown(stops: tuple[str, ...], pieces: list[str]) -> tuple[str, bool]:
    text = StopText(stops)
    out = "".join(text.feed(p) for p in pieces)
    return out + text.flush(), text.stopped


def test_the_text_ends_before_a_stop_string_split_across_tokens() -> None:
    text = StopText(("\n\n", "END"))
    assert text.feed("Hello E") == "Hello "  # "E" could begin "END": held
    assert text.feed("N") == ""
    assert text.feed("D and more") == ""
    assert text.stopped
    assert text.feed("later") == "" and text.flush() == ""


def test_a_held_tail_that_turns_out_not_to_be_a_stop_is_shown() -> None:
    text = StopText(("END",))
    assert text.feed("the EN") == "the "
    assert text.feed("JOY") == "ENJOY"
    assert text.feed("EN") == ""
    assert not text.stopped and text.flush() == "EN"  # the reply ended otherwise: held text is text


def test_the_earliest_stop_string_wins_and_no_stops_shows_everything() -> None:
    assert shown(("c", "ab"), ["xabc"]) == ("x", True)
    assert shown((), ["a", "b"]) == ("ab", False)


def test_a_resumed_reply_holds_what_the_attempt_before_held() -> None:
    text = StopText(("STOP",))
    text.resume("shown before ST")  # "ST" was held back by the attempt before
    assert text.feed("OP") == "" and text.stopped


@given(st.lists(st.text(alphabet="abc", max_size=4), max_size=8),
       st.lists(st.text(alphabet="abc", min_size=1, max_size=3), min_size=1, max_size=3))
def test_any_chunking_shows_the_text_up_to_the_first_stop(pieces: list[str], stops: list[str]) -> None:
    whole = "".join(pieces)
    cuts = [i for i in (whole.find(s) for s in stops) if i >= 0]
    expected = whole[:min(cuts)] if cuts else whole
    assert shown(tuple(stops), pieces) == (expected, bool(cuts))
