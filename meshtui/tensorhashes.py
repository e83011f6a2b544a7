"""The content hash of each of a model's tensors, computed once per file and kept in the head's cache folder.

Hosts' weight caches name entries by the patched ggml's content hash (XXH64) of a tensor's bytes; to offer a host
tensors by hash before the engine loads, the head needs those hashes. Hashing a model reads all of it (from disk
the first time), so the hashes are recorded under the file's identity (device, inode, size, mtime_ns): a file
that is the same by all four is not read again, and one changed in any of them is hashed again.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from meshtui.errors import ModelError
from meshtui.runtime import head_cache_dir, llama_cpp_lib_dir

CONTENT_HASH_SYMBOL = "ggml_backend_rpc_content_hash"  # native/patches/ggml-rpc-weights-cache.patch
THRESHOLD_SYMBOL = "ggml_backend_rpc_verified_cache_threshold"
RECORD_VERSION = 2  # 2: XXH64 (1 was ggml's FNV-1a: those records are hashed again)

Region = tuple[int, int]  # (file offset, bytes)
HashFn = Callable[[int, int], int]  # (address, bytes) -> content hash


@dataclass(frozen=True)
class FileIdentity:
    """What says a file is the one its record was taken from, checked with one stat."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity:
        info = path.stat()
        return cls(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


@dataclass(frozen=True)
class TensorHashes:
    """The hashes of the regions asked for, and how many of them had to be computed (not read from the record)."""

    by_region: dict[Region, int]
    hashed: int


@dataclass(frozen=True)
class Hasher:
    """ggml's content hash from the head's own patched libggml-rpc, and the size from which tensors are cached."""

    hash_fn: HashFn
    threshold: int


def head_hasher(libdir: Path | None = None) -> Hasher | None:
    """The head's ggml content hash, or None when its libggml-rpc lacks meshtui's weights-cache patch."""
    path = (libdir or llama_cpp_lib_dir()) / "libggml-rpc.so.0"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    if not hasattr(lib, CONTENT_HASH_SYMBOL) or not hasattr(lib, THRESHOLD_SYMBOL):
        return None
    fn = getattr(lib, CONTENT_HASH_SYMBOL)
    fn.restype = ctypes.c_uint64
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    threshold = getattr(lib, THRESHOLD_SYMBOL)
    threshold.restype = ctypes.c_size_t
    return Hasher(lambda address, size: int(fn(address, size)), int(threshold()))


def record_path(identity: FileIdentity, folder: Path | None = None) -> Path:
    return (folder or head_cache_dir() / "tensor-hashes") / f"{identity.device}-{identity.inode}.json"


def read_record(path: Path, identity: FileIdentity) -> dict[Region, int]:
    """The hashes recorded for this identity; empty when there is no record, or it is of another file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # no record yet, or a damaged one: hashed again
    if not isinstance(data, dict) or data.get("version") != RECORD_VERSION or data.get("identity") != [
            identity.device, identity.inode, identity.size, identity.mtime_ns]:
        return {}
    found: dict[Region, int] = {}
    for row in data.get("hashes") or []:
        if isinstance(row, list) and len(row) == 3 and all(isinstance(v, int) for v in row):
            found[(row[0], row[1])] = row[2]
    return found


def write_record(path: Path, identity: FileIdentity, hashes: dict[Region, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({
        "version": RECORD_VERSION,
        "identity": [identity.device, identity.inode, identity.size, identity.mtime_ns],
        "hashes": sorted([offset, size, value] for (offset, size), value in hashes.items()),
    }))
    os.replace(tmp, path)


def hash_regions(path: Path, regions: Sequence[Region], hash_fn: HashFn) -> dict[Region, int]:
    """Hash these byte ranges of the file (mapped, not read into memory)."""
    if not regions:
        return {}
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if any(offset < 0 or offset + length > size for offset, length in regions):
            raise ModelError(f"{path}: a tensor lies past the end of the file (truncated?)")
        view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable for ctypes, never written
    try:
        base = ctypes.addressof(ctypes.c_char.from_buffer(view))
        return {(offset, length): hash_fn(base + offset, length) for offset, length in regions}
    finally:
        with contextlib.suppress(BufferError):  # ctypes still holds the buffer: the map goes with the object
            view.close()


def tensor_hashes(path: Path, regions: Sequence[Region], hash_fn: HashFn,
                  folder: Path | None = None) -> TensorHashes:
    """The content hash of each region of the model file: from the record when the file is the one recorded,
    else computed (and recorded, together with what was recorded before for the same file)."""
    try:
        identity = FileIdentity.of(path)
    except OSError as err:
        raise ModelError(f"{path}: cannot read the model file ({err.strerror})") from err
    record = record_path(identity, folder)
    known = read_record(record, identity)
    wanted = sorted(set(regions))
    missing = [region for region in wanted if region not in known]
    if missing:
        try:
            known.update(hash_regions(path, missing, hash_fn))
        except OSError as err:
            raise ModelError(f"{path}: cannot read the model file ({err.strerror})") from err
        with contextlib.suppress(OSError):  # a head cache folder that cannot be written: hashed again next time
            write_record(record, identity, known)
    return TensorHashes({region: known[region] for region in wanted}, len(missing))
