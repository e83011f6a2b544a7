"""ggml RPC (protocol v7) framing, observed passively to time each stage's share of every token.

Client to server: 1 byte command, 8 byte little-endian payload size, payload.
Server to client: 8 byte size and payload, only for commands that answer.
A stage's time for a token runs from its first frame of that token to its GET_TENSOR reply.
"""

from __future__ import annotations

import statistics
import struct
import time
from collections import deque
from dataclasses import dataclass

CMD_SET_TENSOR = 6
CMD_SET_TENSOR_HASH = 7
CMD_GET_TENSOR = 8
CMD_GRAPH_COMPUTE = 10
CMD_HELLO = 14
CMD_GRAPH_RECOMPUTE = 16
# Commands the server answers (ggml-rpc.cpp, rpc_serve_client).
COMMANDS_WITH_REPLY = frozenset({0, 1, 2, 3, 7, 8, 9, 11, 13, 14, 15})
_SIZE = struct.Struct("<Q")
CONN_CAPS_SIZE = 24  # rpc_msg_hello_req: conn_caps[RPC_CONN_CAPS_SIZE]; all zero = no RDMA upgrade
# struct rpc_tensor (packed, 296 bytes): id u64, type u32, buffer u64, then ne[4] and nb[4] as uint32 at 20 and 36.
RPC_TENSOR_SIZE = 296
_SHAPE = struct.Struct("<4I4I")
_SHAPE_AT = 20
_SHAPE_END = _SHAPE_AT + _SHAPE.size
SET_TENSOR_HEADER = RPC_TENSOR_SIZE + 1 + 8  # | rpc_tensor | cache_flag | offset | data |
STEP_SIZES = 64  # recent rounds whose bytes say what a usual step sends


async def rpc_hello(path: str, timeout: float = 10.0) -> tuple[int, int, int]:
    """Ask a ggml RPC server on a Unix socket for its protocol version, as ggml's client opens every connection."""
    import asyncio

    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
    try:
        writer.write(bytes([CMD_HELLO]) + _SIZE.pack(CONN_CAPS_SIZE) + bytes(CONN_CAPS_SIZE))
        (size,) = _SIZE.unpack(await asyncio.wait_for(reader.readexactly(8), timeout))
        if size < 3 or size > 4096:
            raise ValueError(f"HELLO reply of {size} bytes")
        reply = await asyncio.wait_for(reader.readexactly(size), timeout)
        return reply[0], reply[1], reply[2]
    finally:
        writer.close()


@dataclass(frozen=True)
class Round:
    """One graph evaluation on a stage: frames sent, then the GET_TENSOR reply."""

    start: float
    end: float
    bytes_up: int
    bytes_down: int
    frames: int

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1000.0


def tensor_bytes(shape: bytes) -> int:
    """Bytes of a contiguous tensor from its rpc_tensor ne[4], nb[4]: ne[3] * nb[3] (the whole of it)."""
    values = _SHAPE.unpack(shape)
    return values[3] * values[7]


class RpcMeter:
    """Incremental parser of both directions of one RPC connection. Never buffers payloads.

    Besides bytes and rounds it counts the model's weights as they arrive: `weights_sent`, the data of every
    SET_TENSOR (weights during a load), and `weights_cached`, the size of every tensor offered by hash
    (SET_TENSOR_HASH) that the stage found in its cache, so it was not sent.
    """

    def __init__(self, max_rounds: int = 4096) -> None:
        self.bytes_up = 0
        self.bytes_down = 0
        self.weights_sent = 0
        self.weights_cached = 0
        self.hash_offers = 0
        self.hash_hits = 0
        self._offered: deque[int] = deque()  # sizes of tensors offered by hash, not answered yet
        self._shape = bytearray()  # the ne/nb part of a SET_TENSOR_HASH payload being read
        self._up_pos = 0  # bytes of the current payload read so far
        self._down_first: bool = False  # the current reply's first payload byte says hit or miss
        self.rounds: deque[Round] = deque(maxlen=max_rounds)
        self.rounds_since_reset = 0
        self._sizes: deque[int] = deque(maxlen=STEP_SIZES)  # recent rounds' bytes sent, kept across resets
        self._pending: deque[int] = deque()
        self._awaiting: deque[float] = deque()  # when each answered command still unanswered was fully sent
        self._up_header = bytearray()
        self._up_skip = 0
        self._up_cmd = -1
        self._down_header = bytearray()
        self._down_skip = 0
        self._round_start: float | None = None
        self._round_up = 0
        self._round_down = 0
        self._round_frames = 0
        self._round_has_graph = False

    def reset_rounds(self) -> None:
        """Forget the partial round; the next frame starts a new one (called while the engine is idle)."""
        self._round_start = None
        self._round_up = self._round_down = self._round_frames = 0
        self._round_has_graph = False
        self.rounds.clear()
        self.rounds_since_reset = 0

    def connection_changed(self) -> None:
        """A connection ended or a new one began: nothing sent on the old one will be answered.

        Byte counts and measured rounds are kept; the parser starts over at a frame boundary.
        """
        self._pending.clear()
        self._awaiting.clear()
        self._offered.clear()
        self._shape.clear()
        self._down_first = False
        self._up_header.clear()
        self._down_header.clear()
        self._up_skip = self._down_skip = 0
        self._up_cmd = -1
        self._round_start = None
        self._round_up = self._round_down = self._round_frames = 0
        self._round_has_graph = False

    @property
    def awaiting_since(self) -> float | None:
        """When the oldest command still waiting for the server's answer was fully sent; None if none waits.

        The stall watchdog's clock: a live stage answers every command it was sent, a frozen one never does.
        """
        return self._awaiting[0] if self._awaiting else None

    def step_scale(self) -> float:
        """How many usual steps' work the round under way is, at least 1: its bytes sent over the median of recent
        rounds'. What a stage sends grows with the step's positions (activations, positions, mask rows), and so
        does its compute: a long prompt's chunk of 512 positions is a hundred decode steps' bytes."""
        if self._round_start is None or not self._sizes:
            return 1.0
        usual = statistics.median(self._sizes)
        return max(1.0, self._round_up / usual) if usual > 0 else 1.0

    def feed_up(self, data: bytes, now: float | None = None) -> bool:
        """Count client-to-server bytes; True when they complete a command the server will answer.

        Until then the server cannot reply, so a forwarder may hold the bytes and send them as one packet.
        """
        n = len(data)
        answered = False
        self.bytes_up += n
        self._round_up += n
        if self._round_start is None:
            self._round_start = time.perf_counter() if now is None else now
        view = memoryview(data)
        pos = 0
        while pos < n:
            if self._up_skip:
                take = min(self._up_skip, n - pos)
                if self._up_cmd == CMD_SET_TENSOR_HASH and self._up_pos < _SHAPE_END:
                    self._read_shape(view[pos : pos + take])
                self._up_skip -= take
                self._up_pos += take
                pos += take
                if self._up_skip == 0 and self._up_cmd in COMMANDS_WITH_REPLY:
                    answered = True
                    self._awaiting.append(time.perf_counter() if now is None else now)
                continue
            need = 9 - len(self._up_header)
            chunk = view[pos : pos + need]
            self._up_header += chunk
            pos += len(chunk)
            if len(self._up_header) == 9:
                cmd = self._up_header[0]
                (size,) = _SIZE.unpack_from(self._up_header, 1)
                self._up_header.clear()
                self._up_skip = size
                self._up_cmd = cmd
                self._up_pos = 0
                self._round_frames += 1
                if cmd == CMD_SET_TENSOR and size >= SET_TENSOR_HEADER:
                    self.weights_sent += size - SET_TENSOR_HEADER
                elif cmd == CMD_SET_TENSOR_HASH:
                    self._shape.clear()
                    self.hash_offers += 1
                if cmd in (CMD_GRAPH_COMPUTE, CMD_GRAPH_RECOMPUTE):
                    self._round_has_graph = True
                if cmd in COMMANDS_WITH_REPLY:
                    self._pending.append(cmd)
                    if size == 0:
                        answered = True
                        self._awaiting.append(time.perf_counter() if now is None else now)
        return answered

    def _read_shape(self, chunk: memoryview) -> None:
        """Keep the bytes of ne/nb from a SET_TENSOR_HASH payload; `chunk` starts at payload offset _up_pos."""
        start = max(_SHAPE_AT - self._up_pos, 0)
        stop = min(_SHAPE_END - self._up_pos, len(chunk))
        if start < stop:
            self._shape += chunk[start:stop]
        if len(self._shape) == _SHAPE.size:
            self._offered.append(tensor_bytes(bytes(self._shape)))
            self._shape.clear()

    def feed_down(self, data: bytes, now: float | None = None) -> None:
        n = len(data)
        self.bytes_down += n
        self._round_down += n
        view = memoryview(data)
        pos = 0
        while pos < n:
            if self._down_skip:
                take = min(self._down_skip, n - pos)
                if self._down_first:
                    self._down_first = False
                    self._hash_answered(view[pos] != 0)
                self._down_skip -= take
                pos += take
                if self._down_skip == 0:
                    self._reply_done(now)
                continue
            need = 8 - len(self._down_header)
            chunk = view[pos : pos + need]
            self._down_header += chunk
            pos += len(chunk)
            if len(self._down_header) == 8:
                (size,) = _SIZE.unpack_from(self._down_header, 0)
                self._down_header.clear()
                self._down_skip = size
                self._down_first = size > 0 and bool(self._pending) and self._pending[0] == CMD_SET_TENSOR_HASH
                if size == 0:
                    self._reply_done(now)

    def _hash_answered(self, hit: bool) -> None:
        size = self._offered.popleft() if self._offered else 0
        if hit:
            self.hash_hits += 1
            self.weights_cached += size

    def _reply_done(self, now: float | None) -> None:
        cmd = self._pending.popleft() if self._pending else -1
        if self._awaiting:
            self._awaiting.popleft()
        if cmd != CMD_GET_TENSOR:
            return
        end = time.perf_counter() if now is None else now
        if self._round_has_graph and self._round_start is not None:
            self.rounds.append(Round(self._round_start, end, self._round_up, self._round_down, self._round_frames))
            self.rounds_since_reset += 1
            self._sizes.append(self._round_up)
        self._round_start = None
        self._round_up = self._round_down = self._round_frames = 0
        self._round_has_graph = False
