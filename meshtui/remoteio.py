"""Reading what a command on a host prints, within limits, and stopping one that will not end.

A host can print anything, as much as it likes: the head reads at most these many characters (docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncssh

# What the head reads from a host at most: a host cannot make it hold more than this (see docs/security.md).
READ_CHUNK = 65536
MAX_ANSWER_CHARS = 256 * 1024  # a probe's or a check's JSON answer
MAX_STDERR_CHARS = 16 * 1024  # the tail of a command's stderr, for its error message
MAX_LINE_CHARS = 4096  # one line of an agent's or a build's output


def last_json_line(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            # RecursionError: a host can nest brackets deeper than the parser goes.
            with contextlib.suppress(ValueError, RecursionError):
                value = json.loads(line)
                if isinstance(value, dict):
                    return value
    return None


class OutputTooLong(Exception):
    """A host printed more than the head reads from it."""


@dataclass(frozen=True)
class Captured:
    """What a command on a host printed, read within limits."""

    exit_status: int | None
    stdout: str
    stderr: str  # its last MAX_STDERR_CHARS characters


async def _read_capped(stream: asyncssh.SSHReader[str], limit: int,
                       on_line: Callable[[str], None] | None = None) -> str:
    """Everything `stream` sends, but at most `limit` characters (more raises OutputTooLong)."""
    chunks: list[str] = []
    size = 0
    pending = on_line is not None
    while data := await stream.read(READ_CHUNK):
        size += len(data)
        if size > limit:
            raise OutputTooLong()
        chunks.append(data)
        if pending and on_line is not None and "\n" in data:
            pending = False
            on_line("".join(chunks).split("\n", 1)[0])
    return "".join(chunks)


async def read_tail(stream: asyncssh.SSHReader[str], limit: int) -> str:
    """The last `limit` characters `stream` sends; the rest is read and dropped (so the writer never blocks)."""
    tail = ""
    while data := await stream.read(READ_CHUNK):
        tail = (tail + data)[-limit:]
    return tail


async def read_lines(stream: asyncssh.SSHReader[str], limit: int = MAX_LINE_CHARS) -> AsyncIterator[str]:
    """Lines of `stream`; a line longer than `limit` is cut there (the rest of it is dropped)."""
    buffer = ""
    dropping = False
    while data := await stream.read(READ_CHUNK):
        buffer += data
        while "\n" in buffer:
            line, buffer = buffer.split("\n", 1)
            if not dropping:
                yield line
            dropping = False
        if len(buffer) > limit:
            if not dropping:
                yield buffer[:limit]
            buffer = ""
            dropping = True
    if buffer and not dropping:
        yield buffer


async def run_capped(process: asyncssh.SSHClientProcess[str], timeout: float,
                     max_stdout: int = MAX_ANSWER_CHARS,
                     on_first_line: Callable[[str], None] | None = None) -> Captured:
    """Wait for a started command, reading at most `max_stdout` of its output and the tail of its stderr.

    Raises OutputTooLong, or asyncio.TimeoutError when it does not end within `timeout`.
    """
    out, err = await asyncio.wait_for(asyncio.gather(
        _read_capped(process.stdout, max_stdout, on_first_line), read_tail(process.stderr, MAX_STDERR_CHARS)),
        timeout)
    result = await asyncio.wait_for(process.wait(check=False), timeout)
    return Captured(result.exit_status, out, err)


async def stop_remote(process: asyncssh.SSHClientProcess[str], conn: asyncssh.SSHClientConnection,
                pid: int | None) -> None:
    with contextlib.suppress(OSError, asyncssh.Error):
        process.kill()  # a signal request on the channel, where sshd supports it
    await kill_remote_group(conn, pid)


async def kill_remote_group(conn: asyncssh.SSHClientConnection, pid: int | None) -> None:
    if pid is None or pid <= 1:
        return
    with contextlib.suppress(OSError, asyncssh.Error, asyncio.TimeoutError):
        await conn.run(f"kill -9 -{pid} {pid} 2>/dev/null; kill -9 -- -{pid} 2>/dev/null", check=False, timeout=20)
