"""The RPC framing meter: rounds are cut exactly at GET_TENSOR replies, whatever the chunking."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from meshtui.rpcwire import (
    CMD_GET_TENSOR,
    CMD_GRAPH_RECOMPUTE,
    CMD_HELLO,
    CMD_SET_TENSOR,
    CMD_SET_TENSOR_HASH,
    RPC_TENSOR_SIZE,
    RpcMeter,
    tensor_bytes,
)

SET_TENSOR, ALLOC_BUFFER = 6, 0


def frame(cmd: int, payload: bytes) -> bytes:
    return bytes([cmd]) + struct.pack("<Q", len(payload)) + payload


def reply(payload: bytes) -> bytes:
    return struct.pack("<Q", len(payload)) + payload


def token_exchange(n_set: int, out_size: int) -> tuple[bytes, bytes]:
    up = b"".join(frame(SET_TENSOR, bytes(40 + i)) for i in range(n_set))
    up += frame(CMD_GRAPH_RECOMPUTE, bytes(16)) + frame(CMD_GET_TENSOR, bytes(24))
    return up, reply(bytes(out_size))


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def feed(meter: RpcMeter, up: bytes, down: bytes, t0: float, t1: float, cuts: list[int]) -> None:
    for piece in chunks(up, cuts):
        meter.feed_up(piece, t0)
    for piece in chunks(down, cuts):
        meter.feed_down(piece, t1)


def test_handshake_and_load_replies_do_not_make_rounds() -> None:
    meter = RpcMeter()
    meter.feed_up(frame(CMD_HELLO, bytes(8)), 0.0)
    meter.feed_down(reply(bytes(12)), 0.1)
    meter.feed_up(frame(ALLOC_BUFFER, bytes(16)), 0.2)
    meter.feed_down(reply(bytes(16)), 0.3)
    # A GET_TENSOR with no graph evaluated before it (reading a tensor back) is not a token.
    meter.feed_up(frame(CMD_GET_TENSOR, bytes(24)), 0.4)
    meter.feed_down(reply(bytes(100)), 0.5)
    assert list(meter.rounds) == []


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=30), st.integers(1, 9))
def test_rounds_are_exact_under_any_chunking(cuts: list[int], n_set: int) -> None:
    meter = RpcMeter()
    meter.feed_up(frame(CMD_HELLO, bytes(8)), 0.0)
    meter.feed_down(reply(bytes(12)), 0.0)
    meter.reset_rounds()
    for i in range(3):
        up, down = token_exchange(n_set, out_size=2304)
        feed(meter, up, down, t0=10.0 * i, t1=10.0 * i + 0.25 * (i + 1), cuts=cuts)
    assert meter.rounds_since_reset == 3
    assert [r.ms for r in meter.rounds] == [250.0, 500.0, 750.0]
    up, down = token_exchange(n_set, out_size=2304)
    assert all(r.bytes_up == len(up) and r.bytes_down == len(down) for r in meter.rounds)
    assert all(r.frames == n_set + 2 for r in meter.rounds)


def test_reset_forgets_a_partial_round() -> None:
    meter = RpcMeter()
    up, down = token_exchange(3, 64)
    meter.feed_up(up[:5], 1.0)  # a half-seen frame header from before the reset...
    meter.reset_rounds()
    meter.feed_up(up[5:], 2.0)
    meter.feed_down(down, 3.0)
    assert [r.ms for r in meter.rounds] == [1000.0]  # ...the round starts at the first bytes after it


def test_step_scale_is_the_round_under_ways_bytes_over_the_usual_rounds_and_outlives_a_reset() -> None:
    meter = RpcMeter()
    assert meter.step_scale() == 1.0  # nothing seen yet
    usual_up, usual_down = token_exchange(2, 64)
    for i in range(5):
        feed(meter, usual_up, usual_down, float(i), i + 0.5, [])
    assert meter.step_scale() == 1.0  # no round under way
    meter.reset_rounds()  # a new reply: its rounds are counted afresh, what a usual step sends is kept
    big_up, big_down = token_exchange(40, 64)  # a step with 20 times the activations
    meter.feed_up(big_up, 9.0)
    assert meter.step_scale() == len(big_up) / len(usual_up)
    meter.feed_down(big_down, 9.5)
    assert meter.step_scale() == 1.0
    meter.feed_up(usual_up[:-10], 10.0)  # a usual step under way, partly sent: never under 1
    assert meter.step_scale() == 1.0


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_feed_up_says_when_a_command_the_server_answers_is_complete(cuts: list[int]) -> None:
    # Two decode steps, then a zero-payload answered command (GET_ALLOC_SIZE-like, number 13).
    up, _ = token_exchange(7, 2304)
    stream = up + up + frame(13, b"")
    answered_at = [len(up), 2 * len(up), len(stream)]
    meter = RpcMeter()
    position, seen = 0, []
    for piece in chunks(stream, cuts):
        position += len(piece)
        if meter.feed_up(piece, 0.0):
            seen.append(position)
    # True for exactly the chunks in which an answered command ends (a chunk ending several counts once).
    ends, total = [], 0
    for piece in chunks(stream, cuts):
        total += len(piece)
        ends.append(total)
    assert seen == sorted({min(end for end in ends if end >= a) for a in answered_at})


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=30), st.integers(1, 9))
def test_awaiting_since_is_the_oldest_unanswered_command_under_any_chunking(cuts: list[int], n_set: int) -> None:
    meter = RpcMeter()
    assert meter.awaiting_since is None
    up, down = token_exchange(n_set, out_size=2304)
    pieces = chunks(up, cuts)
    for i, piece in enumerate(pieces):
        meter.feed_up(piece, 10.0 + i)
        if i < len(pieces) - 1:
            # SET_TENSOR and GRAPH_RECOMPUTE are not answered: nothing waits until GET_TENSOR is complete.
            assert meter.awaiting_since is None
    sent_at = 10.0 + len(pieces) - 1
    assert meter.awaiting_since == sent_at
    # A second answered command pipelined behind the first: the clock still runs from the oldest.
    meter.feed_up(frame(CMD_HELLO, bytes(8)), 50.0)
    assert meter.awaiting_since == sent_at
    reply_pieces = chunks(down, cuts)
    for i, piece in enumerate(reply_pieces):
        meter.feed_down(piece, 60.0)
        if i < len(reply_pieces) - 1:
            assert meter.awaiting_since == sent_at  # half an answer is no answer
    assert meter.awaiting_since == 50.0
    meter.feed_down(reply(bytes(12)), 61.0)
    assert meter.awaiting_since is None


def test_an_empty_answered_command_waits_too() -> None:
    meter = RpcMeter()
    meter.feed_up(frame(CMD_HELLO, b""), 3.0)
    assert meter.awaiting_since == 3.0
    meter.feed_down(reply(bytes(3)), 4.0)
    assert meter.awaiting_since is None


def test_a_new_connection_forgets_what_the_old_one_waited_for() -> None:
    meter = RpcMeter()
    up, down = token_exchange(3, out_size=2304)
    meter.feed_up(up[: len(up) - 5], 1.0)  # the engine died in the middle of a frame
    meter.connection_changed()
    assert meter.awaiting_since is None
    # The next engine's stream parses from a frame boundary: its rounds come out exact.
    meter.reset_rounds()
    meter.feed_up(up, 2.0)
    assert meter.awaiting_since == 2.0
    meter.feed_down(down, 2.5)
    assert meter.awaiting_since is None
    assert [(r.start, r.end, r.frames) for r in meter.rounds] == [(2.0, 2.5, 5)]


def rpc_tensor(ne: tuple[int, int, int, int], nb: tuple[int, int, int, int]) -> bytes:
    """A struct rpc_tensor (packed, 296 bytes) with only its shape filled in: ne[4] at 20, nb[4] at 36 (uint32)."""
    data = bytearray(RPC_TENSOR_SIZE)
    struct.pack_into("<4I4I", data, 20, *ne, *nb)
    return bytes(data)


def load_exchange(hits: list[bool]) -> tuple[bytes, bytes, int, int]:
    """A load as ggml's client sends it: each tensor offered by hash, its data sent only when the stage lacks it.

    Returns (upstream, downstream, bytes sent, bytes found cached). Tensor i is a quantized-like 2-D tensor:
    ne = (64 * (i + 1), 3, 1, 1), nb = (18, 18 * 2 * (i + 1), ..) so its size is nb[3] * ne[3].
    """
    up = bytearray()
    down = bytearray()
    sent = cached = 0
    for i, hit in enumerate(hits):
        row = 18 * 2 * (i + 1)
        size = row * 3
        tensor = rpc_tensor((64 * (i + 1), 3, 1, 1), (18, row, size, size))
        up += frame(CMD_SET_TENSOR_HASH, tensor + struct.pack("<QQ", 0, 0xABCDEF + i))
        down += reply(bytes([1 if hit else 0]))
        if hit:
            cached += size
        else:
            up += frame(CMD_SET_TENSOR, tensor + b"\x01" + struct.pack("<Q", 0) + bytes(size))
            sent += size
    return bytes(up), bytes(down), sent, cached


@given(st.lists(st.booleans(), min_size=1, max_size=8),
       st.lists(st.integers(min_value=0, max_value=20_000), max_size=30))
def test_weights_sent_and_found_cached_are_counted_under_any_chunking(hits: list[bool], cuts: list[int]) -> None:
    meter = RpcMeter()
    up, down, sent, cached = load_exchange(hits)
    feed(meter, up, down, 0.0, 1.0, cuts)
    assert (meter.weights_sent, meter.weights_cached) == (sent, cached)
    assert (meter.hash_offers, meter.hash_hits) == (len(hits), sum(hits))
    assert RPC_TENSOR_SIZE == 296  # ggml-rpc.cpp: static_assert'ed layout, #pragma pack(1)
    assert meter.awaiting_since is None  # every offer was answered


def test_tensor_bytes_is_the_whole_contiguous_tensor() -> None:
    shape = struct.pack("<4I4I", 576, 49152, 1, 1, 2, 1152, 1152 * 49152, 1152 * 49152)
    assert tensor_bytes(shape) == 576 * 49152 * 2  # f16 embeddings of SmolLM2
