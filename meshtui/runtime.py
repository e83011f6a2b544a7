"""What the head pushes to hosts: the agent script and the ggml runtime libraries, content-addressed.

Two kinds of runtime, both built from the exact source of the head's llama-cpp-python, so every stage speaks
exactly the RPC protocol the head speaks:

- "portable": native/build_runtime.py's build (ggml only, CPU variants picked on the host, no libstdc++ or
  libgomp needed there), found in its cache for the installed llama-cpp-python version;
- "head-build": the ggml libraries of the head's own llama-cpp-python (built for the head's CPU).

`MESHTUI_RUNTIME` chooses: "auto" (the default: portable when built, else head-build), "portable" (fail when it
is not built) or "head-build".
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from meshtui.errors import MeshError

if TYPE_CHECKING:
    from types import ModuleType

RUNTIME_LIBS = ("libggml-base.so.0", "libggml-cpu.so.0", "libggml-rpc.so.0", "libggml.so.0")
AGENT_FILE = "meshtui_agent.py"
REMOTE_ROOT = ".cache/meshtui/runtime"  # relative to the host user's home
RUNTIME_ENV = "MESHTUI_RUNTIME"
RUNTIME_CHOICES = ("auto", "portable", "head-build")
PORTABLE_MANIFEST = "meshtui-runtime.json"  # agent/meshtui_agent.py recognises the portable layout by it


# The ggml RPC protocol of each llama-cpp-python release meshtui supports (its vendored ggml-rpc.h).
RPC_PROTOCOL_BY_LLAMA_CPP_PYTHON = {"0.3.36": (7, 0, 0)}


def installed_llama_cpp_python() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        return None


def expected_rpc_protocol() -> tuple[int, int, int] | None:
    """The protocol the head's own llama.cpp speaks, or None for a release not in the table."""
    installed = installed_llama_cpp_python()
    return RPC_PROTOCOL_BY_LLAMA_CPP_PYTHON.get(installed) if installed else None


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


def head_cache_dir() -> Path:
    """meshtui's cache folder on the head: $XDG_CACHE_HOME/meshtui, else ~/.cache/meshtui."""
    return Path(os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")) / "meshtui"


def portable_cache_root() -> Path:
    """Where native/build_runtime.py keeps its builds (the same rule as its default_cache_root)."""
    if os.environ.get("MESHTUI_RUNTIME_BUILD_CACHE"):
        return Path(os.environ["MESHTUI_RUNTIME_BUILD_CACHE"])
    return head_cache_dir() / "runtime-build"


def portable_pointer_name(version: str) -> str:
    """Same rule as native/build_runtime.py's pointer_name(): only builds with meshtui's patches write it."""
    return f"llama-cpp-python-{version}-weights-cache.json"


def portable_runtime_dir() -> Path | None:
    """The lib folder of the portable build for the installed llama-cpp-python, or None if there is none.

    A build for another version, whose RPC protocol is not the head's, or without meshtui's patches
    (native/patches/: Unix sockets, the verified weights cache), is never used.
    """
    version = installed_llama_cpp_python()
    if version is None:
        return None
    root = portable_cache_root()
    try:
        key = json.loads((root / portable_pointer_name(version)).read_text())["key"]
        libdir = root / str(key) / "lib"
        manifest = json.loads((libdir / PORTABLE_MANIFEST).read_text())
    except (OSError, ValueError, KeyError, TypeError):  # not built (or half-deleted): no portable runtime
        return None
    expected = expected_rpc_protocol()
    if manifest.get("llama_cpp_python") != version or manifest.get("rpc_unix_socket") is not True:
        return None
    if manifest.get("rpc_verified_cache") is not True:  # built before the weights-cache patch
        return None
    if expected is not None and tuple(manifest.get("rpc_protocol") or ()) != expected:
        return None
    return libdir


@dataclass(frozen=True)
class RuntimeBundle:
    """Files to place under REMOTE_ROOT/<digest>/ on a host."""

    digest: str
    files: tuple[tuple[str, Path], ...]  # (relative remote path, local path)
    kind: str = "head-build"  # or "portable"

    @property
    def remote_dir(self) -> str:
        return f"{REMOTE_ROOT}/{self.digest}"

    @property
    def total_bytes(self) -> int:
        return sum(path.stat().st_size for _, path in self.files)


def weight_repack_wanted() -> bool:
    """Whether stages keep quantized weights in their CPU's repacked layouts (native/patches/
    ggml-rpc-weights-repack.patch), as llama.cpp does in one process. MESHTUI_WEIGHT_REPACK=0 keeps ggml's plain
    layouts: the bench's A/B, and a way out should a model use a weight in a way those layouts do not allow."""
    return os.environ.get("MESHTUI_WEIGHT_REPACK", "1").strip() != "0"


def local_runtime_bundle(kind: str | None = None) -> RuntimeBundle:
    """The runtime to push: `kind` ("auto", "portable", "head-build"), else $MESHTUI_RUNTIME, else "auto"."""
    wanted = kind or os.environ.get(RUNTIME_ENV) or "auto"
    if wanted not in RUNTIME_CHOICES:
        raise MeshError(f"{RUNTIME_ENV}={wanted!r} is not one of {', '.join(RUNTIME_CHOICES)}")
    return _bundle(wanted)


@lru_cache(maxsize=4)
def _bundle(wanted: str) -> RuntimeBundle:
    if wanted != "head-build":
        libdir = portable_runtime_dir()
        if libdir is not None:
            return _portable_bundle(libdir)
        if wanted == "portable":
            raise MeshError(
                f"no portable runtime is built for llama-cpp-python {installed_llama_cpp_python()} "
                f"in {portable_cache_root()}; run scripts/setup --portable-runtime"
            )
    return _head_build_bundle()


def _portable_bundle(libdir: Path) -> RuntimeBundle:
    names = sorted(p.name for p in libdir.iterdir() if ".so" in p.name or p.name == PORTABLE_MANIFEST)
    files = [(AGENT_FILE, agent_source_path()), *((f"lib/{name}", libdir / name) for name in names)]
    return RuntimeBundle(digest=_digest(files), files=tuple(files), kind="portable")


def _head_build_bundle() -> RuntimeBundle:
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
    return RuntimeBundle(digest=_digest(files), files=tuple(files), kind="head-build")


def _digest(files: list[tuple[str, Path]]) -> str:
    digest = hashlib.sha256()
    for rel, path in files:
        digest.update(rel.encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@lru_cache(maxsize=8)
def file_digests(bundle: RuntimeBundle) -> dict[str, str]:
    """The sha256 of every file of the bundle, by its path in the runtime folder: what a host must hold."""
    return {rel: sha256_file(path) for rel, path in bundle.files}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_file_module(path: Path, name: str) -> ModuleType:
    """Import a script that is not part of the package (the agent, native/build_runtime.py) by its path."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
