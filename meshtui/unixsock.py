"""Private Unix sockets on the head: where the tunnels and the local output stage listen.

No stage is reachable over TCP, not even on loopback, where every local user could connect. Each listener is a
Unix socket in a fresh folder only this user can enter (mkdtemp: mode 0700, a new random name), so the
kernel refuses everyone else's connect() before any byte reaches ggml. The folder lives in $XDG_RUNTIME_DIR
when that is ours and private, else in ~/.cache/meshtui/run/ (made 0700).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

UNIX_PREFIX = "unix:"  # a ggml RPC endpoint "unix:/abs/path" is an AF_UNIX socket (native/patches/)
MAX_SOCKET_PATH = 103  # bytes: sockaddr_un.sun_path is 108 on Linux, 104 on macOS, with its NUL
# The symbol meshtui's patch adds to libggml-rpc (native/build_runtime.py's UNIX_SOCKET_SYMBOL, the agent's too).
UNIX_SOCKET_SYMBOL = "ggml_backend_rpc_unix_socket_support"


def unix_endpoint(path: Path | str) -> str:
    return f"{UNIX_PREFIX}{path}"


def _private_base() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        try:
            info = os.stat(runtime)
        except OSError:
            info = None
        if info is not None and stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() \
                and stat.S_IMODE(info.st_mode) & 0o077 == 0:
            return Path(runtime) / "meshtui"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "meshtui" / "run"


def private_socket_dir(prefix: str, socket_name: str) -> Path:
    """A fresh 0700 folder for one listening socket; in the temp dir when the usual path is too long."""
    from meshtui.integrity import make_private_dir  # not at the top: the engine process imports this module

    base = make_private_dir(_private_base())
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    if len(str(folder / socket_name).encode()) <= MAX_SOCKET_PATH:
        return folder
    folder.rmdir()
    return Path(tempfile.mkdtemp(prefix=f"meshtui-{prefix}"))


def remove_socket_dir(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)  # our own folder: at most the socket file is left in it
