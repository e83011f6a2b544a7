"""Acting on one host over its SSH connection: probe it, push the runtime, launch and watch its agent."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import shlex
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import asyncssh

from meshtui.errors import HostError
from meshtui.hostfacts import HostFacts, count_field, socket_path_field
from meshtui.integrity import Problem, make_private_dir_remote, runtime_problems
from meshtui.inventory import HostSpec
from meshtui.remoteio import (
    MAX_ANSWER_CHARS,
    OutputTooLong,
    kill_remote_group,
    last_json_line,
    read_lines,
    run_capped,
    stop_remote,
)
from meshtui.runtime import (
    AGENT_FILE,
    REMOTE_ROOT,
    RuntimeBundle,
    agent_source_path,
    file_digests,
    weight_repack_wanted,
)
from meshtui.text import one_line, printable

# The agent's error codes (agent/meshtui_agent.py has the same names; a test checks they match).
AGENT_CANNOT_LOAD = "cannot_load"
AGENT_ERROR_CODES = {"CANNOT_LOAD": AGENT_CANNOT_LOAD, "RUNTIME_ERROR": "runtime_error", "NO_DEVICE": "no_device",
                     "NOT_LISTENING": "not_listening"}
PROBE_TIMEOUT = 30.0
LAUNCH_TIMEOUT = 60.0

async def probe_host(conn: asyncssh.SSHClientConnection, host: HostSpec,
                     timeout: float = PROBE_TIMEOUT) -> HostFacts:
    """Run the agent's probe by feeding the script on stdin: nothing is written to the host.

    The shell prints its pid before it becomes the probe, so a probe that hangs can be killed (with its
    process group) instead of being left running on the host.
    """
    python = shlex.quote(host.python)
    # Belt and braces: coreutils' timeout (where the host has it) kills the probe's whole process group
    # on the host's own clock, even if the head is gone by then.
    limit = int(timeout) + 2
    command = (f'echo "meshtui-pid $$"; if command -v timeout >/dev/null 2>&1; '
               f'then exec timeout -s KILL {limit} {python} - probe; else exec {python} - probe; fi')
    pid: int | None = None

    def first_line(line: str) -> None:
        nonlocal pid
        words = line.split()
        if len(words) == 2 and words[0] == "meshtui-pid" and words[1].isdigit():
            pid = int(words[1])

    try:
        process = await conn.create_process(command, encoding="utf-8", errors="replace")
    except (OSError, asyncssh.Error) as err:
        raise HostError(f"probe failed: {one_line(err)}", host=host.name) from err
    try:
        process.stdin.write(agent_source_path().read_text())
        process.stdin.write_eof()
        result = await run_capped(process, timeout, on_first_line=first_line)
    except (asyncio.TimeoutError, asyncssh.TimeoutError) as err:
        await stop_remote(process, conn, pid)
        raise HostError(f"probe did not answer within {timeout:.0f}s", host=host.name) from err
    except OutputTooLong as err:
        await stop_remote(process, conn, pid)
        raise HostError(f"probe printed more than {MAX_ANSWER_CHARS // 1024} KiB; stopped reading",
                        host=host.name) from err
    except (OSError, asyncssh.Error) as err:
        await kill_remote_group(conn, pid)
        raise HostError(f"probe failed: {one_line(err)}", host=host.name) from err
    finally:
        process.close()
    stdout = result.stdout.split("\n", 1)[1] if result.stdout.startswith("meshtui-pid ") else result.stdout
    stderr = result.stderr
    if result.exit_status == 127:
        raise HostError(f"'{host.python}' was not found on the host (set python = ... for this host)",
                        host=host.name)
    if "SyntaxError" in stderr:
        raise HostError(f"'{host.python}' is too old for the agent (it needs Python 3.8+)", host=host.name)
    data = last_json_line(stdout)
    if result.exit_status != 0 or data is None:
        detail = one_line(stderr or stdout or f"exit status {result.exit_status}")
        raise HostError(f"probe failed: {detail}", host=host.name)
    try:
        return HostFacts.from_json(data)
    except ValueError as err:
        raise HostError(f"probe answered something unexpected: {err}", host=host.name) from err



async def run_agent_command(conn: asyncssh.SSHClientConnection, host: HostSpec, args: str,
                            doing: str) -> tuple[Any, dict[str, Any] | None]:
    """Run `meshtui_agent.py ARGS` from the head's copy, fed on stdin (nothing is written to the host).

    Returns the capped result and its last JSON line; every failure is one line naming the host and `doing`.
    """
    command = f"{shlex.quote(host.python)} - {args}"
    try:
        process = await conn.create_process(command, encoding="utf-8", errors="replace")
        try:
            process.stdin.write(agent_source_path().read_text())
            process.stdin.write_eof()
            result = await run_capped(process, PROBE_TIMEOUT)
        finally:
            process.close()
    except (OSError, asyncssh.Error) as err:
        raise HostError(f"{doing} failed: {one_line(err)}", host=host.name) from err
    except asyncio.TimeoutError as err:
        raise HostError(f"{doing} did not end within {PROBE_TIMEOUT:.0f}s", host=host.name) from err
    except OutputTooLong as err:
        raise HostError(f"{doing} printed more than {MAX_ANSWER_CHARS // 1024} KiB; stopped reading",
                        host=host.name) from err
    return result, last_json_line(result.stdout)


async def inspect_runtime(conn: asyncssh.SSHClientConnection, host: HostSpec, folder: str) -> Any:
    """What `meshtui_agent.py inspect` reports about ~/`folder` on the host."""
    result, report = await run_agent_command(conn, host, f"inspect {shlex.quote(folder)}", "checking the runtime")
    if report is None:
        raise HostError(f"checking the runtime failed: {one_line(result.stderr or result.stdout or 'no output')}",
                        host=host.name)
    return report


async def runtime_check(conn: asyncssh.SSHClientConnection, host: HostSpec, bundle: RuntimeBundle,
                        runtime_dir: str | None = None) -> list[Problem]:
    """Problems with the pushed bundle (or with `runtime_dir`, a runtime built on the host) on the host."""
    folder = runtime_dir or bundle.remote_dir
    report = await inspect_runtime(conn, host, folder)
    if runtime_dir is None:
        return runtime_problems(report, file_digests(bundle), file_digests(bundle)[AGENT_FILE], AGENT_FILE)
    from meshtui.hostbuild import recorded_digests, source_agent_sha256  # only hosts that build need these

    return runtime_problems(report, recorded_digests(conn, host, runtime_dir), source_agent_sha256(), AGENT_FILE)


def _refusal(host: HostSpec, folder: str, problems: list[Problem]) -> HostError:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return HostError(f"refusing to run the agent from ~/{folder}: {problems[0]}{more}", host=host.name)


async def push_runtime(
    conn: asyncssh.SSHClientConnection,
    host: HostSpec,
    bundle: RuntimeBundle,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
    on_log: Callable[[str], None] = lambda line: None,
) -> int:
    """Put the bundle at ~/<bundle.remote_dir>/ unless it is there intact; returns bytes sent.

    A copy whose files were changed (or made writable by others) is replaced, never run; one that cannot be
    replaced (not the user's) is refused with the reason.
    """
    total = bundle.total_bytes
    final = bundle.remote_dir
    try:
        async with conn.start_sftp_client() as sftp:
            if await sftp.exists(f"{final}/.complete"):
                problems = await runtime_check(conn, host, bundle)
                if not problems:
                    on_progress(0, 0)
                    return 0
                if problems[0].above:  # a folder above the runtime: pushing again would not help
                    raise _refusal(host, final, problems)
                on_log(f"the runtime on the host was changed ({problems[0]}); pushing it again")
                stale = f"{final}.stale-{secrets.token_hex(4)}"
                await sftp.rename(final, stale)
                await sftp.rmtree(stale)
            await make_private_dir_remote(sftp, REMOTE_ROOT)
            staging = f"{final}.partial-{secrets.token_hex(4)}"
            await make_private_dir_remote(sftp, f"{staging}/lib")
            sent_before = 0
            for rel, local in bundle.files:
                base = sent_before

                def progress(_src: bytes, _dst: bytes, done: int, _size: int, base: int = base) -> None:
                    on_progress(base + done, total)

                await sftp.put(str(local), f"{staging}/{rel}", progress_handler=progress)
                # Not sftp.put(preserve=True): the head's mode may be group-writable; nobody else writes these.
                await sftp.chmod(f"{staging}/{rel}", 0o700 if rel == AGENT_FILE or ".so" in rel else 0o600)
                sent_before += local.stat().st_size
            async with sftp.open(f"{staging}/.complete", "w", asyncssh.SFTPAttrs(permissions=0o600)) as marker:
                await marker.write(f"{bundle.digest}\n")
            try:
                await sftp.rename(staging, final)
            except asyncssh.SFTPError:
                # Another head pushed the same bundle meanwhile: theirs is as good as ours (checked at launch).
                if not await sftp.exists(f"{final}/.complete"):
                    raise
                await sftp.rmtree(staging)
            on_progress(total, total)
            return sent_before
    except (OSError, asyncssh.Error) as err:
        raise HostError(f"pushing the runtime failed: {one_line(err)}", host=host.name) from err


class Agent:
    """A running `meshtui_agent.py serve` on a host. Closing its channel makes it exit."""

    def __init__(self, host: HostSpec, process: asyncssh.SSHClientProcess[str],
                 on_log: Callable[[str], None]) -> None:
        self.host = host
        self.process = process
        self.on_log = on_log
        self.socket_path = ""  # the stage's Unix socket on the host, in a 0700 folder
        self.pid = 0
        self.devices: list[dict[str, Any]] = []
        self.backends: list[str] = []
        self.weight_repack: bool | None = None  # the agent's server repacks weights (None: its runtime cannot)
        self.runtime_dir = ""  # the runtime it runs from, as a shell word ('"$HOME"/...'): `put` runs from it too
        self.cache_dir: str | None = None  # its weights cache on the host (None: this runtime keeps none)
        self.cache_limit: int | None = None
        self.stderr_tail: deque[str] = deque(maxlen=20)
        self.exited = asyncio.Event()
        self._ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pongs: dict[str, asyncio.Future[float]] = {}
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}  # "seed" and "stats", by seq
        self._seq = itertools.count()
        self._tasks = [asyncio.create_task(self._read_stdout()), asyncio.create_task(self._read_stderr())]

    async def _read_stdout(self) -> None:
        try:
            async for line in read_lines(self.process.stdout):
                if not line.strip():
                    continue
                try:
                    msg = json.loads(line)
                    if not isinstance(msg, dict):
                        raise ValueError("not an object")
                except (ValueError, RecursionError):  # RecursionError: brackets nested deeper than json goes
                    self.on_log(f"agent printed: {one_line(line)}")
                    if not self._ready.done():
                        self._ready.set_exception(HostError(
                            f"agent printed garbage instead of starting: {one_line(line)}", host=self.host.name))
                    continue
                event = msg.get("event")
                if event in ("ready", "error") and not self._ready.done():
                    self._ready.set_result(msg)
                elif event == "pong":
                    future = self._pongs.pop(str(msg.get("seq")), None)
                    if future and not future.done():
                        future.set_result(time.perf_counter())
                elif event in ("seeded", "stats"):
                    reply = self._replies.pop(str(msg.get("seq")), None)
                    if reply and not reply.done():
                        reply.set_result(msg)
        except (OSError, asyncssh.Error) as err:
            self.on_log(f"agent channel error: {one_line(err)}")
        finally:
            self.exited.set()
            if not self._ready.done():
                self._ready.set_result({"event": "exited"})
            for future in self._pongs.values():
                if not future.done():
                    future.cancel()
            for reply in self._replies.values():
                if not reply.done():
                    reply.cancel()

    async def _read_stderr(self) -> None:
        with contextlib.suppress(OSError, asyncssh.Error):
            async for raw in read_lines(self.process.stderr):
                line = printable(raw.rstrip())
                if line:
                    self.stderr_tail.append(line)
                    self.on_log(line)

    async def wait_ready(self, timeout: float = LAUNCH_TIMEOUT) -> None:
        try:
            msg = await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except asyncio.TimeoutError as err:
            raise HostError(f"agent did not become ready within {timeout:.0f}s", host=self.host.name) from err
        if msg.get("event") == "exited":
            # Its last words may still be on their way on stderr.
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._tasks[1]), 2.0)
            detail = self.stderr_tail[-1] if self.stderr_tail else "no output"
            raise HostError(f"agent exited at start: {one_line(detail)}", host=self.host.name)
        if msg.get("event") == "error":
            code = msg.get("code")
            raise HostError(f"agent cannot serve: {one_line(msg.get('reason'))}", host=self.host.name,
                            code=code if isinstance(code, str) else None)
        try:
            self.socket_path = socket_path_field(msg)
            self.pid = count_field(msg, "pid", 1, 1 << 31)
            devices, backends = msg.get("devices") or [], msg.get("backends") or []
            if not isinstance(devices, list) or not all(isinstance(d, dict) for d in devices) or len(devices) > 64:
                raise ValueError("key 'devices': expected a list of objects")
            if not isinstance(backends, list) or not all(isinstance(b, str) for b in backends) or len(backends) > 16:
                raise ValueError("key 'backends': expected a list of names")
        except ValueError as err:
            raise HostError(f"agent answered something unexpected: {err}", host=self.host.name) from err
        cache_dir, cache_limit = msg.get("cache_dir"), msg.get("cache_limit")
        if isinstance(cache_dir, str) and cache_dir.startswith("/") and printable(cache_dir) == cache_dir:
            self.cache_dir = cache_dir
        if isinstance(cache_limit, int) and not isinstance(cache_limit, bool) and cache_limit >= 0:
            self.cache_limit = cache_limit
        self.devices = [{str(k)[:64]: printable(v) if isinstance(v, str) else v for k, v in d.items()}
                        for d in devices]
        self.backends = [printable(b[:64]) for b in backends]
        repack = msg.get("weight_repack")
        self.weight_repack = repack if isinstance(repack, bool) else None

    async def ping(self, timeout: float = 5.0) -> float:
        """Round-trip time in seconds through the same SSH connection the stage traffic uses."""
        seq = str(next(self._seq))
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pongs[seq] = future
        sent = time.perf_counter()
        self.process.stdin.write(f"ping {seq}\n")
        return await asyncio.wait_for(future, timeout) - sent

    async def seed(self, model_path: str, regions: list[tuple[int, int]], timeout: float = 600.0) -> dict[str, Any]:
        """Ask the agent to put these byte ranges of its own copy of the model into its cache, named by hash."""
        seq = str(next(self._seq))
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[seq] = future
        self.process.stdin.write("seed " + json.dumps({"seq": seq, "model": model_path, "regions": regions}) + "\n")
        return await asyncio.wait_for(future, timeout)

    async def repacked_weights(self, timeout: float = 5.0) -> int | None:
        """How many weight tensors the agent's server holds in the CPU backend's repacked layouts now; None from a
        runtime without meshtui's repack patch."""
        if self.weight_repack is None or not self.alive:
            return None
        seq = str(next(self._seq))
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[seq] = future
        try:
            self.process.stdin.write(f"stats {seq}\n")
        except (OSError, asyncssh.Error):
            future.cancel()
        done, _ = await asyncio.wait({future}, timeout=timeout)
        self._replies.pop(seq, None)
        if not done or future.cancelled():
            return None
        count = future.result().get("repacked_weights")
        return count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else None

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()

    async def exit_report(self, timeout: float = 1.0) -> tuple[int | None, str | None]:
        """(exit status, signal name) as the SSH channel reported them, once the agent's output ended.

        The report follows the end of its output: wait a moment for the channel to close. (None, None) when the
        channel closed without one (the connection itself went away).
        """
        with contextlib.suppress(asyncio.TimeoutError, OSError, asyncssh.Error):
            await asyncio.wait_for(self.process.wait_closed(), timeout)
        status = self.process.exit_status
        signal = self.process.exit_signal
        return (status if status is not None and status >= 0 else None), (signal[0] if signal else None)

    async def close(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(OSError, asyncssh.Error):
            self.process.stdin.write_eof()
        try:
            await asyncio.wait_for(self.exited.wait(), timeout)
        except asyncio.TimeoutError:
            self.on_log("agent did not exit on EOF; closing its channel")
        self.process.close()
        for task in self._tasks:
            task.cancel()


async def launch_agent(
    conn: asyncssh.SSHClientConnection,
    host: HostSpec,
    bundle: RuntimeBundle,
    on_log: Callable[[str], None] = lambda line: None,
    gpu: bool = False,
    runtime_dir: str | None = None,
) -> Agent:
    """Start the agent from the pushed bundle, or from `runtime_dir` (a runtime built on the host)."""
    problems = await runtime_check(conn, host, bundle, runtime_dir)
    if problems:
        raise _refusal(host, runtime_dir or bundle.remote_dir, problems)
    remote = f'"$HOME"/{runtime_dir or bundle.remote_dir}'
    command = f"{shlex.quote(host.python)} {remote}/{AGENT_FILE} serve --runtime {remote}"
    if host.threads:
        command += f" --threads {int(host.threads)}"
    if gpu:
        command += " --gpu"
    if host.cache_limit is not None:
        command += f" --cache-limit {int(host.cache_limit)}"
    if not weight_repack_wanted():
        command += " --no-repack"
    try:
        process = await conn.create_process(command, encoding="utf-8", errors="replace")
    except (OSError, asyncssh.Error) as err:
        raise HostError(f"cannot start the agent: {one_line(err)}", host=host.name) from err
    agent = Agent(host, process, on_log)
    agent.runtime_dir = remote
    try:
        await agent.wait_ready()
    except BaseException:
        await agent.close(timeout=2.0)
        raise
    return agent


async def stop_leftover_agents(conn: asyncssh.SSHClientConnection, host: HostSpec) -> list[dict[str, Any]]:
    """`meshtui down`: stop agents of this user that outlived their head (by their pid files)."""
    result, data = await run_agent_command(conn, host, "down", "cleanup")
    stopped = data.get("stopped") if data is not None else None
    if not isinstance(stopped, list):
        raise HostError(f"cleanup failed: {one_line(result.stderr or result.stdout)}", host=host.name)
    # What `down` lists comes from the host: numbers as numbers, command lines made printable.
    return [{"pid": item["pid"], "cmdline": one_line(item.get("cmdline", ""), 300)} for item in stopped
            if isinstance(item, dict) and isinstance(item.get("pid"), int) and not isinstance(item["pid"], bool)]
