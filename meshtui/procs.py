"""Stopping the head's child processes (engine, local stage) the same way everywhere."""

from __future__ import annotations

import asyncio
import contextlib


async def wait_or_kill(proc: asyncio.subprocess.Process, timeout: float) -> None:
    """Give a process that was asked to leave `timeout` seconds, then kill it; always reap it."""
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
