"""The agent runs on hosts with the stdlib only, so it cannot import meshtui: the constants both sides must
agree on (library names, the runtime's manifest, the socket's limits, the patch's symbols) are written twice.
Every such pair is found by name, from the sources (no list kept by hand), and must hold the same value."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
AGENT = REPO / "agent" / "meshtui_agent.py"


def constants(path: Path) -> dict[str, Any]:
    """Module-level UPPER_CASE names bound to a literal, with their values."""
    found: dict[str, Any] = {}
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name) and target.id.isupper():
                try:
                    found[target.id] = ast.literal_eval(value)
                except ValueError:  # not a literal (computed from other names): not a shared constant
                    continue
    return found


def shared_with_agent() -> list[tuple[str, str, Any, Any]]:
    """(module path, name, its value there, the agent's value) for every name both define."""
    agent = constants(AGENT)
    pairs = []
    for path in sorted((REPO / "meshtui").rglob("*.py")):
        mine = constants(path)
        where = str(path.relative_to(REPO))
        pairs += [(where, name, mine[name], agent[name]) for name in sorted(set(mine) & set(agent))]
    return pairs


def test_every_constant_the_head_and_the_agent_both_define_has_one_value() -> None:
    pairs = shared_with_agent()
    names = {name for _, name, _, _ in pairs}
    assert {"RUNTIME_LIBS", "PORTABLE_MANIFEST", "MAX_SOCKET_PATH", "UNIX_SOCKET_SYMBOL"} <= names
    assert [f"{where}: {name} = {mine!r}, the agent's {theirs!r}" for where, name, mine, theirs in pairs
            if mine != theirs] == []


def test_the_finder_sees_a_drifted_constant(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('RUNTIME_LIBS = ("libggml.so.0",)\nMAX_SOCKET_PATH: int = 104\nlower = 1\nDERIVED = len("x")\n')
    found = constants(sample)
    assert found == {"RUNTIME_LIBS": ("libggml.so.0",), "MAX_SOCKET_PATH": 104}
    agent = constants(AGENT)
    assert found["RUNTIME_LIBS"] != agent["RUNTIME_LIBS"] and found["MAX_SOCKET_PATH"] != agent["MAX_SOCKET_PATH"]
