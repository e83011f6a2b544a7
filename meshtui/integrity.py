"""Folders only their user can enter, and runtime files checked before anything runs them.

meshtui keeps what it runs (the agent, the ggml libraries) under ~/.cache/meshtui on the head and on every
host. Every folder it creates there is 0700 whatever the umask, and before an agent starts, its runtime is
checked: every file and folder owned by the user and writable by no one else, no links, nothing added, and
each file's sha256 the head's. A runtime built on a host has no digests the head could know beforehand: the head
records them when the build finishes (or, for a build this head never saw, the first time it meets it, as
OpenSSH records a new host key) and checks that record before every launch. `runtime_problems` and
`built_runtime_record` decide purely, from what `meshtui_agent.py inspect` reported; the I/O is in
`meshtui.hosts`, `meshtui.hostbuild` (hosts) and `meshtui.localstage` (the head).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from meshtui.text import one_line

PRIVATE = 0o700
MESHTUI_DIR = ".cache/meshtui"  # relative to a home: meshtui's own folders are this one and those below it
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


def _is_ours(rel: str) -> bool:
    return rel == MESHTUI_DIR or rel.startswith(MESHTUI_DIR + "/")


def make_private_dir(path: Path, home: Path | None = None) -> Path:
    """Create `path` and its missing parents 0700 on the head; meshtui's own existing folders are tightened."""
    home = (home or Path.home()).resolve()
    path = Path(path).absolute()
    for folder in [*reversed(path.parents), path]:
        try:
            folder.mkdir(mode=PRIVATE)
            os.chmod(folder, PRIVATE)  # mkdir's mode is masked by the umask
        except FileExistsError:
            with contextlib.suppress(ValueError, OSError):  # not under home, or not ours to change
                if _is_ours(folder.relative_to(home).as_posix()) and folder.stat().st_uid == os.getuid():
                    os.chmod(folder, PRIVATE)
    return path


async def make_private_dir_remote(sftp: asyncssh.SFTPClient, rel: str) -> None:
    """The same on a host, over SFTP, for a folder relative to the user's home."""
    parts = [p for p in rel.split("/") if p and p != "."]
    for i in range(1, len(parts) + 1):
        folder = "/".join(parts[:i])
        if not await sftp.exists(folder):
            try:
                await sftp.mkdir(folder, asyncssh.SFTPAttrs(permissions=PRIVATE))
            except asyncssh.SFTPFailure:  # created meanwhile (another head): checked below like any other
                if not await sftp.isdir(folder):
                    raise
            else:
                await sftp.chmod(folder, PRIVATE)
                continue
        if _is_ours(folder):
            with contextlib.suppress(asyncssh.SFTPError):  # not ours to change: the check before launch says so
                await sftp.chmod(folder, PRIVATE)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a runtime folder, as a user reads it; `above` when it is a folder above the runtime
    (pushing or building the runtime again cannot fix it)."""

    text: str
    above: bool = False

    def __str__(self) -> str:
        return self.text


def runtime_problems(report: Any, expected: Mapping[str, str] | None, agent_sha256: str,
                     agent_file: str) -> list[Problem]:
    """What is wrong with a runtime folder as `inspect` reported it; empty when it is safe to run.

    `expected` maps every file of the runtime to its sha256 (then nothing else may be there): the pushed bundle's,
    or what the head recorded of a runtime built on the host. None: a build the head has no record of yet, and
    only the agent's digest is known. Problems with the folders above the runtime come first (`above`).
    """
    if not isinstance(report, dict) or "error" in report:
        detail = report.get("error") if isinstance(report, dict) else None
        return [Problem(f"the check failed: {one_line(detail or 'no report')}")]
    uid = report.get("uid")
    ancestors = report.get("ancestors")
    entries = report.get("entries")
    if not isinstance(uid, int) or not isinstance(ancestors, list) or not isinstance(entries, dict):
        return [Problem("the check answered something unexpected")]
    if not entries:
        return [Problem("the runtime folder is missing")]
    problems: list[Problem] = []
    for item in ancestors:
        if not isinstance(item, dict):
            return [Problem("the check answered something unexpected")]
        path = str(item.get("path"))
        problems += [Problem(text, above=True)
                     for text in _unsafe("~" if path == "." else f"~/{path}", item, uid, allow_root=True)]
    for rel, entry in sorted(entries.items()):
        if not isinstance(entry, dict):
            return [Problem("the check answered something unexpected")]
        problems += [Problem(text) for text in _unsafe(f"{rel}", entry, uid, allow_root=False)]
    files = {rel: e.get("sha256") for rel, e in entries.items() if isinstance(e, dict) and e.get("kind") == "file"}
    if expected is not None:
        wanted = {**expected, ".complete": None}
        for rel in sorted(set(wanted) - set(files)):
            problems.append(Problem(f"{rel}: missing"))
        for rel in sorted(set(files) - set(wanted)):
            problems.append(Problem(f"{one_line(rel, 80)}: not part of the runtime"))
        for rel, digest in sorted(expected.items()):
            if rel in files and files[rel] != digest:
                problems.append(Problem(f"{one_line(rel, 80)}: its sha256 is not the head's (the file was changed)"))
    elif files.get(agent_file) != agent_sha256:
        problems.append(Problem(f"{agent_file}: " + ("missing" if agent_file not in files
                                                     else "its sha256 is not the head's (the file was changed)")))
    return problems


def _unsafe(rel: str, entry: dict[str, Any], uid: int, *, allow_root: bool) -> list[str]:
    name = one_line(rel, 80)
    kind, owner, mode = entry.get("kind"), entry.get("uid"), entry.get("mode")
    if kind not in ("file", "dir"):
        return [f"{name}: is a {one_line(kind, 20)}, not a plain file or folder"]
    if not isinstance(owner, int) or not isinstance(mode, int):
        return [f"{name}: no owner or mode reported"]
    if owner != uid and not (allow_root and owner == 0):
        return [f"{name}: owned by uid {owner}, not by the user (uid {uid})"]
    if mode & _WRITABLE_BY_OTHERS:
        return [f"{name}: writable by group or others (mode {mode:04o})"]
    return []


def built_runtime_record(report: Any) -> dict[str, str]:
    """The digests to record of a runtime built on a host, from an `inspect` report `runtime_problems` passed."""
    entries = report["entries"] if isinstance(report, dict) and isinstance(report.get("entries"), dict) else {}
    return {rel: str(entry["sha256"]) for rel, entry in sorted(entries.items())
            if isinstance(entry, dict) and entry.get("kind") == "file" and rel != ".complete"
            and isinstance(entry.get("sha256"), str)}
