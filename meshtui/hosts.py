"""Acting on one host over its SSH connection: probe it, push the runtime, launch and watch its agent."""

from __future__ import annotations

import asyncio
import secrets
import shlex
from collections.abc import Callable
from typing import Any

import asyncssh

from meshtui.errors import HostError
from meshtui.hostfacts import HostFacts
from meshtui.integrity import Problem, make_private_dir_remote, runtime_problems
from meshtui.inventory import HostSpec
from meshtui.remoteio import (
    MAX_ANSWER_CHARS,
    OutputTooLong,
    kill_remote_group,
    last_json_line,
    run_capped,
    stop_remote,
)
from meshtui.runtime import AGENT_FILE, REMOTE_ROOT, RuntimeBundle, agent_source_path, file_digests
from meshtui.text import one_line

# The agent's error codes (agent/meshtui_agent.py has the same names; a test checks they match).
AGENT_CANNOT_LOAD = "cannot_load"
AGENT_ERROR_CODES = {"CANNOT_LOAD": AGENT_CANNOT_LOAD, "RUNTIME_ERROR": "runtime_error", "NO_DEVICE": "no_device",
                     "NOT_LISTENING": "not_listening"}
PROBE_TIMEOUT = 30.0

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


def runtime_refusal(host: HostSpec, folder: str, problems: list[Problem]) -> HostError:
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
                    raise runtime_refusal(host, final, problems)
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


async def stop_leftover_agents(conn: asyncssh.SSHClientConnection, host: HostSpec) -> list[dict[str, Any]]:
    """`meshtui down`: stop agents of this user that outlived their head (by their pid files)."""
    result, data = await run_agent_command(conn, host, "down", "cleanup")
    stopped = data.get("stopped") if data is not None else None
    if not isinstance(stopped, list):
        raise HostError(f"cleanup failed: {one_line(result.stderr or result.stdout)}", host=host.name)
    # What `down` lists comes from the host: numbers as numbers, command lines made printable.
    return [{"pid": item["pid"], "cmdline": one_line(item.get("cmdline", ""), 300)} for item in stopped
            if isinstance(item, dict) and isinstance(item.get("pid"), int) and not isinstance(item["pid"], bool)]
