"""The head's own stage: the agent run locally, without SSH, holding the output layer.

llama.cpp keeps only the *first* layers on the head's CPU and gives the output layer to the last device. Left
there, every token would bring the full logits (n_vocab floats: 192 KiB for SmolLM2, 0.5 MiB for a 128k
vocabulary) back over the network. A local RPC stage registered after the remote ones keeps the output layer,
and so the logits, on the head: only hidden states cross the network.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import sys
from collections import deque
from pathlib import Path

from meshtui.errors import EngineError
from meshtui.procs import wait_or_kill
from meshtui.runtime import AGENT_FILE, RuntimeBundle


def install_locally(bundle: RuntimeBundle, home: Path | None = None) -> Path:
    """Copy the bundle to ~/<bundle.remote_dir> on the head (once), the layout hosts get."""
    final = (home or Path.home()) / bundle.remote_dir
    if (final / ".complete").exists():
        return final
    staging = final.with_name(f"{final.name}.partial-{secrets.token_hex(4)}")
    for rel, local in bundle.files:
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(local, staging / rel)
    (staging / ".complete").write_text(bundle.digest + "\n")
    try:
        staging.rename(final)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process installed it meanwhile
    return final


class LocalStage:
    def __init__(self, bundle: RuntimeBundle, threads: int | None = None) -> None:
        self.bundle = bundle
        self.threads = threads
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.stderr_tail: deque[str] = deque(maxlen=20)
        self._stderr_task: asyncio.Task[None] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, timeout: float = 60.0) -> None:
        runtime = install_locally(self.bundle)
        argv = [sys.executable, str(runtime / AGENT_FILE), "serve", "--runtime", str(runtime)]
        if self.threads:
            argv += ["--threads", str(self.threads)]
        self.proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
        )
        self._stderr_task = asyncio.create_task(self._drain_stderr())
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            message = json.loads(line) if line.strip() else {"event": "exited"}
        except (asyncio.TimeoutError, ValueError) as err:
            await self.close()
            raise EngineError(f"the head's local output stage did not start: {err}") from err
        if message.get("event") != "ready":
            await self.close()
            reason = message.get("reason") or (self.stderr_tail[-1] if self.stderr_tail else "no output")
            raise EngineError(f"the head's local output stage did not start: {reason}")
        self.port = int(message["port"])

    async def _drain_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.stderr_tail.append(raw.decode("utf-8", errors="replace").rstrip())

    async def close(self, timeout: float = 5.0) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # the agent exits when its stdin closes
            await wait_or_kill(self.proc, timeout)
        if self._stderr_task is not None:
            self._stderr_task.cancel()
