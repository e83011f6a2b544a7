"""A lost stage's cause in words a user can act on, from what its SSH channel reported."""

from __future__ import annotations

import pytest

from meshtui.failures import agent_exit_cause


@pytest.mark.parametrize(("status", "signal", "tail", "cause"), [
    (None, "KILL", ["Accepted client connection"], "killed by signal 9"),
    (None, "SIGTERM", [], "killed by signal 15"),
    (None, "NOSUCH", [], "killed by SIGNOSUCH"),
    (137, None, ["Accepted client connection"], "killed by signal 9"),  # a shell's way of saying SIGKILL
    (1, None, ["Traceback (most recent call last):", "ValueError: x"], "exited with code 1"),
    (0, None, [], "exited with code 0"),
    (None, None, ["Accepted client connection"], "SSH connection lost"),
    (None, "KILL", ["ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer of size 4096"],
     "out of memory"),
    (1, None, ["MemoryError"], "out of memory"),
    (None, "ABRT", ["terminate called after throwing an instance of 'std::bad_alloc'"], "out of memory"),
])
def test_the_cause_not_the_last_log_line(status: int | None, signal: str | None, tail: list[str],
                                         cause: str) -> None:
    assert agent_exit_cause(status, signal, tail) == cause
