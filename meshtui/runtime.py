"""What the head pushes to hosts: the agent script and the ggml runtime libraries, content-addressed.

The runtime comes from the head's own llama-cpp-python build, so every stage speaks exactly the RPC
protocol the head speaks.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from meshtui.errors import MeshError

RUNTIME_LIBS = ("libggml-base.so.0", "libggml-cpu.so.0", "libggml-rpc.so.0", "libggml.so.0")
AGENT_FILE = "meshtui_agent.py"
REMOTE_ROOT = ".cache/meshtui/runtime"  # relative to the host user's home


# The ggml RPC protocol of each llama-cpp-python release meshtui supports (its vendored ggml-rpc.h).
RPC_PROTOCOL_BY_LLAMA_CPP_PYTHON = {"0.3.36": (7, 0, 0)}


def expected_rpc_protocol() -> tuple[int, int, int] | None:
    """The protocol the head's own llama.cpp speaks, or None for a release not in the table."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return RPC_PROTOCOL_BY_LLAMA_CPP_PYTHON.get(version("llama_cpp_python"))
    except PackageNotFoundError:
        return None


def agent_source_path() -> Path:
    """The agent script: `agent/` in a checkout, `meshtui/_agent/` in an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "agent" / AGENT_FILE, here / "_agent" / AGENT_FILE):
        if candidate.exists():
            return candidate
    raise MeshError(f"cannot find {AGENT_FILE} next to the meshtui package (broken install?)")


def llama_cpp_lib_dir() -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise MeshError("llama-cpp-python is not installed; run scripts/setup (it builds it with RPC support)")
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


@dataclass(frozen=True)
class RuntimeBundle:
    """Files to place under REMOTE_ROOT/<digest>/ on a host."""

    digest: str
    files: tuple[tuple[str, Path], ...]  # (relative remote path, local path)

    @property
    def remote_dir(self) -> str:
        return f"{REMOTE_ROOT}/{self.digest}"

    @property
    def total_bytes(self) -> int:
        return sum(path.stat().st_size for _, path in self.files)


@lru_cache(maxsize=1)
def local_runtime_bundle() -> RuntimeBundle:
    libdir = llama_cpp_lib_dir()
    files: list[tuple[str, Path]] = [(AGENT_FILE, agent_source_path())]
    for name in RUNTIME_LIBS:
        path = libdir / name
        if not path.exists():
            raise MeshError(
                f"{path} is missing: llama-cpp-python was built without RPC support; "
                "rebuild it with CMAKE_ARGS=-DGGML_RPC=on (scripts/setup does this)"
            )
        files.append((f"lib/{name}", path))
    digest = hashlib.sha256()
    for rel, path in files:
        digest.update(rel.encode() + b"\0")
        digest.update(path.read_bytes())
    return RuntimeBundle(digest=digest.hexdigest()[:16], files=tuple(files))
