"""Without the namespace lab, lab tests are skipped with the reason, but fail when CI is set to anything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAB_TEST = "tests/test_lab.py::test_each_host_logs_in_as_its_own_user"


def run_lab_test(ci: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["MESHTUI_NO_LAB"] = "1"
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", LAB_TEST],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_without_ci_a_lab_test_is_skipped_with_the_reason() -> None:
    result = run_lab_test(None)
    assert result.returncode == 0, result.stdout
    assert "1 skipped" in result.stdout
    skipped = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED [1] tests/test_lab.py:")]
    assert len(skipped) == 1 and skipped[0].endswith(": namespace lab unavailable: MESHTUI_NO_LAB is set")


@pytest.mark.parametrize("ci", ["true", "1"])
def test_with_ci_set_to_anything_a_lab_test_fails_with_the_reason(ci: str) -> None:
    result = run_lab_test(ci)
    assert result.returncode == 1, result.stdout  # pytest's "tests failed" (an error in the lab fixture)
    assert "1 error" in result.stdout and "skipped" not in result.stdout
    assert f"CI={ci} needs the namespace lab, but it cannot run: MESHTUI_NO_LAB is set" in result.stdout
    assert "Traceback" not in result.stdout
