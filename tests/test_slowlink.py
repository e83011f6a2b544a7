"""The slow-link relay (meshtui/slowlink.py) really delays, keeps bytes and order, and takes a new round trip
while connections stay open. Only lower bounds on time: a relay never delivers before its delay, so these
cannot flake on a busy machine; an upper bound could."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from meshtui.errors import MeshError
from meshtui.slowlink import LinkProcess, LinkShape, SlowLink, parse_target


@contextlib.contextmanager
def echo_server() -> Iterator[tuple[str, int]]:
    """A TCP echo server on 127.0.0.1, one thread per connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:  # the listener was closed: the test is over
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[:2]
    finally:
        stop.set()
        listener.close()


def ping_ms(conn: socket.socket, payload: bytes) -> float:
    """One round trip of `payload` through an echo; the echo must come back intact."""
    started = time.perf_counter()
    conn.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = conn.recv(65536)
        assert chunk, "connection closed mid-echo"
        got += chunk
    assert got == payload
    return (time.perf_counter() - started) * 1000.0


def pings(port: int, rounds: int = 5, payload: bytes = b"x" * 3000) -> list[float]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return [ping_ms(conn, payload + bytes([i])) for i in range(rounds)]


def test_a_link_process_adds_its_round_trip_and_changes_it_on_open_connections() -> None:
    with echo_server() as target, LinkProcess([target, target], rtt_ms=20.0) as links:
        assert len(links.ports) == 2 and len(set(links.ports)) == 2
        for port in links.ports:
            through = pings(port)
            assert min(through) >= 20.0, through  # the floor: 10 ms each way
        # One connection open across the change: the new round trip applies to it.
        with socket.create_connection(("127.0.0.1", links.ports[0]), timeout=10) as conn:
            before = [ping_ms(conn, b"z" * 100) for _ in range(3)]
            links.set_rtt(60.0)
            after = [ping_ms(conn, b"w" * 100) for _ in range(3)]
        assert min(before) >= 20.0 and min(after) >= 60.0, (before, after)
        links.set_rtt(0.0)
        assert links.rtt_ms == 0.0


def test_an_in_process_link_keeps_order_and_delays_both_ways() -> None:
    with echo_server() as target, SlowLink(target, LinkShape.for_rtt(10.0, jitter_ms=4.0), seed=1) as link:
        assert link.shape.rtt_ms == pytest.approx(10.0)
        with socket.create_connection(("127.0.0.1", link.port), timeout=10) as conn:
            # Many small writes with random jitter: still delivered in order, each round trip at least 10 ms.
            conn.sendall(b"".join(bytes([i]) * 100 for i in range(50)))
            got = b""
            while len(got) < 5000:
                got += conn.recv(65536)
            assert got == b"".join(bytes([i]) * 100 for i in range(50))
            assert min(ping_ms(conn, b"q" * 500) for _ in range(3)) >= 10.0


def test_bad_targets_and_a_relay_that_cannot_start_are_named() -> None:
    assert parse_target("198.51.100.11:22") == ("198.51.100.11", 22)
    assert parse_target("[::1]:2222") == ("::1", 2222)
    for bad in ("host", "host:0", ":22", "host:ssh"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_target(bad)
    result = subprocess.run([sys.executable, "-m", "meshtui.slowlink", "nowhere"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 2 and "expected HOST:PORT, got 'nowhere'" in result.stderr
    with pytest.raises(MeshError, match="the slow-link relay is not running"):
        LinkProcess([("127.0.0.1", 1)]).set_rtt(1.0)
