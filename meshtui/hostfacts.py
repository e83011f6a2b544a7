"""What a host's probe reported, checked field by field: a host can send anything, the head accepts only this."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshtui.text import one_line, printable
from meshtui.unixsock import MAX_SOCKET_PATH


@dataclass(frozen=True)
class HostFacts:
    """What `meshtui_agent.py probe` reported."""

    hostname: str
    os: str
    arch: str
    python: str
    glibc: str | None
    cores: int
    mem_total: int
    mem_available: int
    gpus: tuple[dict[str, Any], ...]
    mem_bandwidth: int | None = None  # bytes/s one core copies (agent's probe)
    nvcc: bool = False  # the CUDA compiler is on PATH
    cmake: bool = False

    @classmethod
    def from_json(cls, data: object) -> HostFacts:
        """The probe's answer, checked field by field: a host can send anything, the head accepts only this.

        Raises ValueError naming the first bad key; every string is made printable (see meshtui.text).
        """
        if not isinstance(data, dict):
            raise ValueError("the answer is not a JSON object")
        unknown = sorted(set(data) - _PROBE_KEYS)
        if unknown:
            raise ValueError(f"unexpected key '{one_line(unknown[0], 40)}'")
        gpus = data.get("gpus")
        if gpus is None:
            gpus = []
        if not isinstance(gpus, list) or len(gpus) > MAX_GPUS:
            raise ValueError(f"key 'gpus': expected a list of at most {MAX_GPUS} objects")
        return cls(
            hostname=_text(data, "hostname"),
            os=_text(data, "os"),
            arch=_text(data, "arch"),
            python=_text(data, "python"),
            glibc=_text(data, "glibc", optional=True),
            cores=count_field(data, "cores", 1, MAX_CORES),
            mem_total=count_field(data, "mem_total", 0, MAX_BYTES),
            mem_available=count_field(data, "mem_available", 0, MAX_BYTES),
            gpus=tuple(_gpu(gpu, i) for i, gpu in enumerate(gpus)),
            mem_bandwidth=count_field(data, "mem_bandwidth", 0, MAX_BYTES, optional=True) or None,
            nvcc=_flag(data, "nvcc"),
            cmake=_flag(data, "cmake"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "hostname": self.hostname, "os": self.os, "arch": self.arch, "python": self.python,
            "glibc": self.glibc, "cores": self.cores, "mem_total": self.mem_total,
            "mem_available": self.mem_available, "gpus": list(self.gpus), "mem_bandwidth": self.mem_bandwidth,
            "nvcc": self.nvcc, "cmake": self.cmake,
        }


# What a probe may answer (agent/meshtui_agent.py's probe()), and the bounds of each number.
_PROBE_KEYS = frozenset({"agent_version", "hostname", "python", "os", "kernel", "arch", "glibc", "cores", "mem_total",
                         "mem_available", "gpus", "mem_bandwidth", "nvcc", "cmake"})
_GPU_KEYS = {"name": str, "vendor": str, "memory_total": int, "memory_free": int, "unified": bool}
MAX_GPUS = 64
MAX_CORES = 1 << 20
MAX_BYTES = 1 << 60  # an exbibyte: more memory (or bandwidth) than any host has
MAX_TEXT = 256


def _text(data: dict[str, Any], key: str, *, optional: bool = False, where: str = "") -> Any:
    value = data.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ValueError(f"key '{where}{key}': expected a string of at most {MAX_TEXT} characters")
    return printable(value)


def count_field(data: dict[str, Any], key: str, low: int, high: int, *, optional: bool = False, where: str = "") -> Any:
    value = data.get(key)
    if value is None and optional:
        return None
    # bool is an int to Python, and JSON's Infinity/NaN and 1e999 are floats: neither is a count.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"key '{where}{key}': expected an integer from {low} to {high}")
    return value


def weight_repack_field(ready: dict[str, Any]) -> bool | None:
    """Whether an agent's server repacks weights, from its `ready` (None: its runtime cannot)."""
    value = ready.get("weight_repack")
    return value if isinstance(value, bool) else None


def repacked_weights_field(stats: dict[str, Any]) -> int | None:
    """The weights an agent's server holds repacked, from its `stats` answer (None: not a count)."""
    try:
        return int(count_field(stats, "repacked_weights", 0, 1 << 40))
    except ValueError:
        return None


def socket_path_field(data: dict[str, Any]) -> str:
    """The stage's Unix socket as the agent reported it: an absolute path that fits in sun_path, printable."""
    value = data.get("socket")
    if not isinstance(value, str) or not value.startswith("/") or len(value.encode()) > MAX_SOCKET_PATH \
            or printable(value) != value:
        raise ValueError(f"key 'socket': expected an absolute path of at most {MAX_SOCKET_PATH} bytes")
    return value


def _flag(data: dict[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"key '{key}': expected true or false")
    return value


def _gpu(gpu: object, index: int) -> dict[str, Any]:
    where = f"gpus[{index}]."
    if not isinstance(gpu, dict):
        raise ValueError(f"key 'gpus[{index}]': expected an object")
    unknown = sorted(set(gpu) - set(_GPU_KEYS))
    if unknown:
        raise ValueError(f"unexpected key '{where}{one_line(unknown[0], 40)}'")
    checked: dict[str, Any] = {"name": _text(gpu, "name", where=where),
                               "vendor": _text(gpu, "vendor", where=where),
                               "memory_total": count_field(gpu, "memory_total", 0, MAX_BYTES, where=where),
                               "memory_free": count_field(gpu, "memory_free", 0, MAX_BYTES, where=where)}
    if "unified" in gpu:
        if not isinstance(gpu["unified"], bool):
            raise ValueError(f"key '{where}unified': expected true or false")
        checked["unified"] = gpu["unified"]
    return checked
