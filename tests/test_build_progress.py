"""scripts/setup's build progress: pip's verbose build output in, one line of progress out."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "build_progress.py"
_spec = importlib.util.spec_from_file_location("build_progress", SCRIPT)
assert _spec is not None and _spec.loader is not None
build_progress = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_progress)

LABEL = "building llama-cpp-python"
# The shape of `pip wheel -v llama-cpp-python` (scikit-build-core driving cmake and ninja), shortened to 20 steps.
STEPS = [f"  [{n}/20] Building C object vendor/llama.cpp/ggml/src/CMakeFiles/ggml-base.dir/ggml{n}.c.o\n"
         for n in range(1, 21)]
PIP_LOG = [
    "Building wheels for collected packages: llama-cpp-python\n",
    "  Running command Building wheel for llama-cpp-python (pyproject.toml)\n",
    "  *** scikit-build-core 0.11.5 using CMake 3.31.6 (wheel)\n",
    "  *** Configuring CMake...\n",
    "  -- The C compiler identification is GNU 12.2.0\n",
    "  -- Including RPC backend\n",
    "  -- Build files have been written to: /tmp/tmpq1w2e3/build\n",
    "  *** Building project with Ninja...\n",
    *STEPS[:7],
    "  In file included from ggml.c:3: warning: [-Wunused] not a step\n",
    *STEPS[7:],
    "  *** Installing project into wheel...\n",
    "  -- Installing: /tmp/tmpq1w2e3/wheel/platlib/llama_cpp/lib/libggml-rpc.so.0\n",
    "  *** Created llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl\n",
    "  Building wheel for llama-cpp-python (pyproject.toml) ... done\n",
]


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_steps_are_read_from_ninja_lines_only() -> None:
    assert build_progress.parse_step("  [168/400] Building CXX object llama.cpp.o\n") == (168, 400)
    assert build_progress.parse_step("[1/2] Linking C shared library libggml.so\n") == (1, 2)
    assert build_progress.parse_step("  -- Installing: [1/2] lib.so\n") is None
    assert build_progress.parse_step("  warning: [-Wunused]\n") is None
    assert build_progress.parse_step("  [0/4] nothing done yet\n") is None
    assert build_progress.parse_step("  [5/4] more than all\n") is None


def test_without_a_terminal_a_line_every_ten_percent_with_the_elapsed_time() -> None:
    out, clock = io.StringIO(), Clock()
    progress = build_progress.Progress(LABEL, out, tty=False, now=clock)
    progress.begin()
    for n, line in enumerate(PIP_LOG):
        clock.t = 100.0 + 9 * n  # 9 s a line
        progress.feed(line)
    progress.finish()
    assert out.getvalue().splitlines() == [
        "building llama-cpp-python: configuring, 0m00s",
        "building llama-cpp-python: 5% (1/20), 1m12s",
        "building llama-cpp-python: 10% (2/20), 1m21s",
        "building llama-cpp-python: 20% (4/20), 1m39s",
        "building llama-cpp-python: 30% (6/20), 1m57s",
        "building llama-cpp-python: 40% (8/20), 2m24s",
        "building llama-cpp-python: 50% (10/20), 2m42s",
        "building llama-cpp-python: 60% (12/20), 3m00s",
        "building llama-cpp-python: 70% (14/20), 3m18s",
        "building llama-cpp-python: 80% (16/20), 3m36s",
        "building llama-cpp-python: 90% (18/20), 3m54s",
        "building llama-cpp-python: 100% (20/20), packaging the wheel, 4m12s",
    ]


def test_a_build_that_stops_between_reports_says_where_it_stopped() -> None:
    out, clock = io.StringIO(), Clock()
    progress = build_progress.Progress(LABEL, out, tty=False, now=clock)
    progress.begin()
    for line in PIP_LOG[:8 + 5]:
        progress.feed(line)
    clock.t += 75
    progress.finish()
    assert out.getvalue().splitlines()[-2:] == [
        "building llama-cpp-python: 20% (4/20), 0m00s",
        "building llama-cpp-python: 25% (5/20), 1m15s",
    ]


def test_on_a_terminal_one_line_is_rewritten_and_the_clock_ticks() -> None:
    out, clock = io.StringIO(), Clock()
    progress = build_progress.Progress(LABEL, out, tty=True, now=clock)
    progress.begin()
    clock.t += 5
    progress.tick()
    progress.feed(STEPS[0])
    clock.t += 67
    progress.tick()
    progress.finish()
    assert out.getvalue() == (
        "\rbuilding llama-cpp-python: configuring, 0m00s\033[K"
        "\rbuilding llama-cpp-python: configuring, 0m05s\033[K"
        "\rbuilding llama-cpp-python: 5% (1/20), 0m05s\033[K"
        "\rbuilding llama-cpp-python: 5% (1/20), 1m12s\033[K"
        "\rbuilding llama-cpp-python: 5% (1/20), 1m12s\033[K\n"
    )


def test_the_script_keeps_the_whole_output_in_its_log(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    result = subprocess.run([sys.executable, str(SCRIPT), "--label", LABEL, "--log", str(log)],
                            input="".join(PIP_LOG), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == "building llama-cpp-python: configuring, 0m00s"
    assert lines[-1] == "building llama-cpp-python: 100% (20/20), packaging the wheel, 0m00s"
    assert len(lines) == 12
    assert log.read_text() == "".join(PIP_LOG)
