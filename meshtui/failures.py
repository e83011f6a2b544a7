"""What happened to a stage, in words a user can act on. Pure: the orchestrator passes in what it saw.

The node table shows the cause ("killed by signal 9", "exited with code 1", "SSH connection lost",
"out of memory"); the agent's last lines of output, which say more but rarely what to do, go to the log.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence

# What allocators and ggml print when memory runs out (glibc, C++, Python, CUDA, ggml's own buffers).
_OUT_OF_MEMORY = ("out of memory", "cannot allocate memory", "std::bad_alloc", "memoryerror",
                  "failed to allocate", "cudaerrormemoryallocation")


def signal_name(name_or_number: str | int) -> tuple[int | None, str]:
    """SSH names a signal ("KILL"); a shell's exit status carries its number. Both as (number, "SIGKILL")."""
    if isinstance(name_or_number, int):
        try:
            return name_or_number, signal.Signals(name_or_number).name
        except ValueError:
            return name_or_number, f"signal {name_or_number}"
    name = name_or_number.upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    number = getattr(signal, name, None)
    return (int(number) if number is not None else None), name


def agent_exit_cause(exit_status: int | None, exit_signal: str | None, stderr_tail: Sequence[str]) -> str:
    """Why a stage's agent is gone: out of memory, killed by a signal, exited with a code, or the connection lost.

    `exit_status` and `exit_signal` are what the SSH channel reported (none when it closed without saying);
    a status above 128 is a shell's way of saying the command died of signal (status - 128).
    """
    if any(marker in line.lower() for line in stderr_tail[-5:] for marker in _OUT_OF_MEMORY):
        return "out of memory"
    if exit_signal:
        number, name = signal_name(exit_signal)
        return f"killed by signal {number}" if number is not None else f"killed by {name}"
    if exit_status is not None and 128 < exit_status < 160:
        return f"killed by signal {exit_status - 128}"
    if exit_status is not None and exit_status >= 0:
        return f"exited with code {exit_status}"
    return "SSH connection lost"
