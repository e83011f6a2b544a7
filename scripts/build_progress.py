"""Turn a wheel build's verbose output into one line of progress (used by scripts/setup).

    pip wheel -v ... 2>&1 | python3 scripts/build_progress.py --label "building X" --log build.log

Every line read goes to the log; stderr gets `building X: 42% (168/400), 1m12s` from cmake/ninja's `[N/M]`
steps: one line rewritten in place (and ticking each second) when stderr is a terminal, otherwise a line every
10%. Stdlib only: it runs before the venv has anything in it.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

STEP = re.compile(r"^\s*\[(\d+)/(\d+)\]\s")
REPORT_EVERY_PERCENT = 10


def parse_step(line: str) -> tuple[int, int] | None:
    """ninja's `[N/M] Building ...` as (N, M); None for any other line."""
    match = STEP.match(line)
    if match is None:
        return None
    done, total = int(match.group(1)), int(match.group(2))
    return (done, total) if 0 < done <= total else None


def elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


class Progress:
    """What the build is doing, drawn as one line; `now` is a parameter so tests need no clock."""

    def __init__(self, label: str, out: TextIO, *, tty: bool, now: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.out = out
        self.tty = tty
        self.now = now
        self.started = now()
        self.step: tuple[int, int] | None = None
        self.reported_bucket = -1  # the last 10% bucket printed (not on a terminal)
        self.last_line = ""
        self.lock = threading.Lock()

    def line(self) -> str:
        took = elapsed(self.now() - self.started)
        if self.step is None:
            return f"{self.label}: configuring, {took}"
        done, total = self.step
        if done == total:
            return f"{self.label}: 100% ({done}/{total}), packaging the wheel, {took}"
        return f"{self.label}: {100 * done // total}% ({done}/{total}), {took}"

    def begin(self) -> None:
        with self.lock:
            self._show(force=True)

    def feed(self, text: str) -> None:
        step = parse_step(text)
        if step is None:
            return
        with self.lock:
            self.step = step
            self._show(force=False)

    def tick(self) -> None:
        """Redraw on a terminal, so the time moves while one long file compiles."""
        if self.tty:
            with self.lock:
                self._show(force=True)

    def finish(self) -> None:
        with self.lock:
            if self.tty:
                self._show(force=True)
                self.out.write("\n")
            elif self.line() != self.last_line and self.step is not None and self.step[0] != self.step[1]:
                self._write(self.line())  # the build stopped between two reports: say where
            self.out.flush()

    def _show(self, *, force: bool) -> None:
        if self.tty:
            self.last_line = self.line()
            self.out.write(f"\r{self.last_line}\033[K")
            self.out.flush()
            return
        bucket = -1 if self.step is None else 100 * self.step[0] // self.step[1] // REPORT_EVERY_PERCENT
        if force or bucket > self.reported_bucket:
            self.reported_bucket = bucket
            self._write(self.line())

    def _write(self, text: str) -> None:
        self.last_line = text
        self.out.write(text + "\n")
        self.out.flush()


def follow(source: TextIO, log: TextIO, progress: Progress, tick_seconds: float = 1.0) -> None:
    progress.begin()
    stop = threading.Event()

    def ticker() -> None:
        while not stop.wait(tick_seconds):
            progress.tick()

    thread = threading.Thread(target=ticker, daemon=True)
    if progress.tty:
        thread.start()
    try:
        for text in source:
            log.write(text)
            progress.feed(text)
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        log.flush()
        progress.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="what is being built, e.g. 'building llama-cpp-python'")
    parser.add_argument("--log", required=True, help="file that keeps the full output")
    args = parser.parse_args(argv)
    sys.stdin.reconfigure(errors="replace")  # type: ignore[union-attr]  # a compiler's odd byte ends no build
    with open(args.log, "w", encoding="utf-8", errors="replace") as log:
        follow(sys.stdin, log, Progress(args.label, sys.stderr, tty=sys.stderr.isatty()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
