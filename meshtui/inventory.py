"""The inventory: which model to run and which SSH hosts to split it over.

Everything a user can get wrong in the file becomes one `InventoryError` line naming the file and the key,
so `meshtui up` stops before it touches the network. Files on disk (the model, keys, known_hosts) are only
named here; the layers that open them report when they are missing.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshtui.errors import InventoryError
from meshtui.units import parse_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_MODEL_NAME = "smollm2"
RESERVED_HOST_NAMES = frozenset({"head"})
_TOML_POSITION = re.compile(r"\s*\(at (?:line (\d+), column \d+|end of document)\)$")


@dataclass(frozen=True)
class ModelSpec:
    path: Path | None  # expanded, absolute; None when `name` is used
    name: str | None  # a model that installs with meshtui, e.g. "smollm2"; exactly one of path/name
    context: int = 2048
    draft: str | None = None  # a draft model for speculative decoding: a builtin name, or a path (absolute)


@dataclass(frozen=True)
class HeadSpec:
    compute: bool = True  # False: the head only embeds and samples, hosts hold every layer
    max_memory: int | None = None  # bytes the planner may use on the head
    threads: int | None = None


@dataclass(frozen=True)
class SSHSpec:
    known_hosts: Path | None = None  # None: the ssh config's UserKnownHostsFile, else OpenSSH's default
    connect_timeout: float = 15.0
    keepalive_interval: float = 5.0
    # Not inventory keys: the system-wide files OpenSSH reads, replaced only by tests (like `ssh -F` and
    # `-o GlobalKnownHostsFile`). None: ~/.ssh/config then /etc/ssh/ssh_config; the config's
    # GlobalKnownHostsFile, else /etc/ssh/ssh_known_hosts{,2}.
    config_files: tuple[Path, ...] | None = field(default=None, metadata={"inventory_key": False})
    global_known_hosts: tuple[Path, ...] | None = field(default=None, metadata={"inventory_key": False})


@dataclass(frozen=True)
class HostSpec:
    name: str
    address: str
    user: str | None = None
    port: int | None = None
    identity_file: Path | None = None
    max_memory: int | None = None
    threads: int | None = None
    python: str = "python3"
    runtime: str = "auto"  # auto: push the prebuilt runtime, build on the host if it cannot load; push; build
    gpu: bool = True  # serve layers from the host's GPUs when a GPU runtime can be built there
    cache_limit: int | None = None  # bytes of cached weight tensors kept on the host (None: the agent's 16 GiB)
    model_path: str | None = None  # the model file on the host, if it has one: its layers are read from there


@dataclass(frozen=True)
class Inventory:
    source: str  # the file path as given, or a label such as "<embedded lab>"
    model: ModelSpec
    head: HeadSpec
    ssh: SSHSpec
    hosts: tuple[HostSpec, ...]


class _Invalid(Exception):
    """A problem at one key; `parse_inventory` prefixes the source name."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}" if where else message)


def _quote(text: str, limit: int = 60) -> str:
    """Quote a user's string on one line, whatever control characters it holds."""
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    quoted = json.dumps(text, ensure_ascii=False)
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in quoted)


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, int) and value.bit_length() > 64:
        return "an integer too large"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return _quote(str(value))[1:-1]  # TOML dates and times


# Converters: (value, where, base_dir) -> the dataclass field's value, or raise _Invalid(where, ...).
Convert = Callable[[Any, str, Path | None], Any]


def _integer(minimum: int, maximum: int | None = None) -> Convert:
    wanted = f"an integer {minimum}..{maximum}" if maximum is not None else f"an integer >= {minimum}"

    def convert(value: Any, where: str, base_dir: Path | None) -> int:
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if is_int and minimum <= value and (maximum is None or value <= maximum):
            return int(value)
        raise _Invalid(where, f"expected {wanted}, got {_show(value)}")

    return convert


def _seconds(value: Any, where: str, base_dir: Path | None) -> float:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and value > 0):
        raise _Invalid(where, f"expected a number of seconds > 0, got {_show(value)}")
    return float(value)


def _boolean(value: Any, where: str, base_dir: Path | None) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(where, f"expected true or false, got {_show(value)}")
    return value


def _size(value: Any, where: str, base_dir: Path | None) -> int:
    wanted = f'expected a size such as "6GiB" or a number of bytes, got {_show(value)}'
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _Invalid(where, wanted)
    try:
        size = parse_size(value, where=where)
    except ValueError as err:  # parse_size says what is wrong; keep its words when they fit on one line
        detail = str(err)
        if detail.startswith(f"{where}: ") and detail.isprintable():
            raise _Invalid("", detail) from None
        raise _Invalid(where, wanted) from None
    return size


def _text(pattern: str, wanted: str) -> Convert:
    matcher = re.compile(pattern)

    def convert(value: Any, where: str, base_dir: Path | None) -> str:
        if not isinstance(value, str) or not matcher.fullmatch(value):
            raise _Invalid(where, f"expected {wanted}, got {_show(value)}")
        return value

    return convert


def _path(value: Any, where: str, base_dir: Path | None) -> Path:
    if not isinstance(value, str) or not value or "\0" in value:
        raise _Invalid(where, f"expected a file path, got {_show(value)}")
    try:
        path = Path(value).expanduser()
    except RuntimeError as err:  # "~someone" with no such user, or no home directory at all
        raise _Invalid(where, f"cannot expand {_quote(value)}: {err}") from None
    if not path.is_absolute():
        path = (base_dir / path) if base_dir is not None else path
    return path.absolute()


def _draft(value: Any, where: str, base_dir: Path | None) -> str:
    """A builtin model's name as it is; anything that looks like a file (a '/' or '.gguf') as an absolute path."""
    text = _text(_ONE_LINE, "a model name or a GGUF path")(value, where, base_dir)
    if "/" in text or text.endswith(".gguf") or text.startswith("~"):
        return str(_path(text, where, base_dir))
    return text


_ONE_LINE = r"[^\x00-\x1f\x7f-\x9f\u2028\u2029]+"
_ONE_WORD = r"[^\s\x00-\x1f\x7f-\x9f-][^\s\x00-\x1f\x7f-\x9f]*"  # and no leading "-": never an ssh option
_FIELDS: dict[str, dict[str, Convert]] = {
    "model": {"path": _path, "name": _text(_ONE_LINE, "a model name"), "context": _integer(1), "draft": _draft},
    "head": {"compute": _boolean, "max_memory": _size, "threads": _integer(1)},
    "ssh": {"known_hosts": _path, "connect_timeout": _seconds, "keepalive_interval": _seconds},
    "hosts": {
        "name": _text(r"[A-Za-z0-9_.-]{1,32}", "a name of 1-32 letters, digits, '_', '.' or '-'"),
        "address": _text(_ONE_WORD, "a hostname or IP address"),
        "user": _text(_ONE_WORD, "a user name"),
        "port": _integer(1, 65535),
        "identity_file": _path,
        "max_memory": _size,
        "threads": _integer(1),
        "python": _text(_ONE_LINE, "an interpreter command on one line"),
        "runtime": _text(r"auto|push|build", "one of auto, push, build"),
        "gpu": _boolean,
        "cache_limit": _size,
        "model_path": _text(_ONE_LINE, "a path on the host, on one line"),
    },
}
_TOP_LEVEL = sorted(_FIELDS)


def _unknown_key(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key {key!r} ({hint}expected one of: {', '.join(allowed)})"


def _read_table(
    value: Any,
    where: str,
    fields: Mapping[str, Convert],
    base_dir: Path | None,
    required: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Convert one TOML table into dataclass keyword arguments, rejecting keys the dataclass lacks."""
    if not isinstance(value, dict):
        raise _Invalid(where, f"expected a table, got {_show(value)}")
    for key in value:
        if key not in fields:
            raise _Invalid(where, _unknown_key(key, sorted(fields)))
    for key in required:
        if key not in value:
            raise _Invalid(where, f"missing required key {key!r}")
    return {key: fields[key](item, f"{where}.{key}", base_dir) for key, item in value.items()}


def _read_model(value: Any, base_dir: Path | None) -> ModelSpec:
    fields = _read_table(value, "model", _FIELDS["model"], base_dir)
    if "path" in fields and "name" in fields:
        raise _Invalid("model", "set exactly one of 'path' or 'name'")
    if "path" not in fields:
        fields.setdefault("name", DEFAULT_MODEL_NAME)
    return ModelSpec(**{"path": None, "name": None, **fields})


def _read_hosts(value: Any, base_dir: Path | None) -> tuple[HostSpec, ...]:
    if not isinstance(value, list):
        raise _Invalid("hosts", f"expected an array of tables ([[hosts]]), got {_show(value)}")
    hosts: list[HostSpec] = []
    first_index: dict[str, int] = {}
    for index, item in enumerate(value):
        where = f"hosts[{index}]"
        host = HostSpec(**_read_table(item, where, _FIELDS["hosts"], base_dir, ("name", "address")))
        if host.name.lower() in RESERVED_HOST_NAMES:
            raise _Invalid(f"{where}.name", f"{_quote(host.name)} is reserved for this machine")
        if host.name in first_index:
            also = first_index[host.name]
            raise _Invalid(f"{where}.name", f"duplicate host name {_quote(host.name)} (also hosts[{also}])")
        first_index[host.name] = index
        hosts.append(host)
    return tuple(hosts)


def parse_inventory(text: str, *, source: str, base_dir: Path | None = None) -> Inventory:
    """Parse inventory TOML; relative paths resolve against `base_dir` (the file's folder), else the cwd."""
    try:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            message = (str(err).splitlines() or ["cannot parse"])[0]
            match = _TOML_POSITION.search(message)
            line = match.group(1) if match and match.group(1) else str(text.count("\n") + 1)
            raise _Invalid(f"line {line}", f"invalid TOML: {_TOML_POSITION.sub('', message)}") from None
        except ValueError as err:  # an integer past Python's digit limit for str -> int
            raise _Invalid("", f"invalid TOML: {str(err).split(';')[0]}") from None
        except RecursionError:  # tomllib recurses once per nested array or inline table
            raise _Invalid("", "invalid TOML: arrays or tables nested too deeply") from None
        for key in data:
            if key not in _FIELDS:
                raise _Invalid("", _unknown_key(key, _TOP_LEVEL))
        return Inventory(
            source=source,
            model=_read_model(data.get("model", {}), base_dir),
            head=HeadSpec(**_read_table(data.get("head", {}), "head", _FIELDS["head"], base_dir)),
            ssh=SSHSpec(**_read_table(data.get("ssh", {}), "ssh", _FIELDS["ssh"], base_dir)),
            hosts=_read_hosts(data.get("hosts", []), base_dir),
        )
    except _Invalid as err:
        raise InventoryError(f"{source}: {err}") from None


def load_inventory(path: Path) -> Inventory:
    """Read and validate the inventory file at `path` (relative paths inside resolve against its folder)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as err:
        raise InventoryError(f"{path}: cannot read file: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise InventoryError(f"{path}: cannot read file: not UTF-8 text (byte {err.start})") from None
    return parse_inventory(text, source=str(path), base_dir=path.absolute().parent)
