"""The head's own stage: the agent run locally, without SSH, holding the output layer.

llama.cpp keeps only the *first* layers on the head's CPU and gives the output layer to the last device. Left
there, every token would bring the full logits (n_vocab floats: 192 KiB for SmolLM2, 0.5 MiB for a 128k
vocabulary) back over the network. A local RPC stage registered after the remote ones keeps the output layer,
and so the logits, on the head: only hidden states cross the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import sys
from collections import deque
from pathlib import Path

from meshtui.errors import EngineError
from meshtui.hostfacts import repacked_weights_field, weight_repack_field
from meshtui.integrity import Problem, make_private_dir, runtime_problems
from meshtui.procs import wait_or_kill
from meshtui.runtime import (
    AGENT_FILE,
    RuntimeBundle,
    agent_source_path,
    file_digests,
    load_file_module,
    weight_repack_wanted,
)
from meshtui.unixsock import unix_endpoint


def install_locally(bundle: RuntimeBundle, home: Path | None = None) -> Path:
    """Copy the bundle to ~/<bundle.remote_dir> on the head (once), the layout hosts get.

    Checked like a host's copy before it is used: a changed copy is replaced, one that cannot be is refused.
    """
    home = home or Path.home()
    final = home / bundle.remote_dir
    if (final / ".complete").exists():
        if not _problems(final, bundle, home):
            return final
        stale = final.with_name(f"{final.name}.stale-{secrets.token_hex(4)}")
        with contextlib.suppress(OSError):  # not ours to move: refused below
            final.rename(stale)
            shutil.rmtree(stale)
    make_private_dir(final.parent, home)
    staging = final.with_name(f"{final.name}.partial-{secrets.token_hex(4)}")
    for rel, local in bundle.files:
        make_private_dir((staging / rel).parent, home)
        shutil.copyfile(local, staging / rel)
        os.chmod(staging / rel, 0o700 if rel == AGENT_FILE or ".so" in rel else 0o600)
    (staging / ".complete").write_text(bundle.digest + "\n")
    os.chmod(staging / ".complete", 0o600)
    try:
        staging.rename(final)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process installed it meanwhile
    problems = _problems(final, bundle, home)
    if problems:
        raise EngineError(f"refusing to run the head's output stage from {final}: {problems[0]}")
    return final


def _problems(folder: Path, bundle: RuntimeBundle, home: Path) -> list[Problem]:
    inspect = load_file_module(agent_source_path(), "meshtui_agent_local").inspect_tree
    try:
        report = inspect(str(folder.relative_to(home)), home=str(home))
    except (OSError, RuntimeError) as err:
        report = {"error": str(err)}
    digests = file_digests(bundle)
    return runtime_problems(report, digests, digests[AGENT_FILE], AGENT_FILE)


class LocalStage:
    def __init__(self, bundle: RuntimeBundle, threads: int | None = None) -> None:
        self.bundle = bundle
        self.threads = threads
        self.proc: asyncio.subprocess.Process | None = None
        self.socket_path = ""
        self.weight_repack: bool | None = None  # its server repacks weights (None: its runtime cannot)
        self.stderr_tail: deque[str] = deque(maxlen=20)
        self._stderr_task: asyncio.Task[None] | None = None

    @property
    def endpoint(self) -> str:
        return unix_endpoint(self.socket_path)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, timeout: float = 60.0) -> None:
        runtime = install_locally(self.bundle)
        argv = [sys.executable, str(runtime / AGENT_FILE), "serve", "--runtime", str(runtime)]
        if self.threads:
            argv += ["--threads", str(self.threads)]
        if not weight_repack_wanted():
            argv.append("--no-repack")
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
        self.socket_path = str(message["socket"])
        self.weight_repack = weight_repack_field(message)

    async def repacked_weights(self, timeout: float = 5.0) -> int | None:
        """How many weight tensors the stage holds in the CPU backend's repacked layouts (the agent's `stats`);
        None from a runtime without meshtui's repack patch, or a stage that does not answer."""
        if self.weight_repack is None or not self.alive:
            return None
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(b"stats 1\n")
            while True:  # after `ready` the agent says nothing unasked: its next line is the answer
                line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
                if not line:
                    return None
                message = json.loads(line)
                if isinstance(message, dict) and message.get("event") == "stats":
                    break
        except (asyncio.TimeoutError, ValueError, OSError):
            return None
        return repacked_weights_field(message)

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
