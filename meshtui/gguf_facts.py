"""What the planner needs to know about a GGUF model, read once from its header.

Sizes are per llama.cpp "layer" as `load_tensors` places them: the input embeddings stay on the head's CPU,
block i is layer i, and the output head is layer n_layer (see notes/FINDINGS.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFReader, GGUFValueType

from meshtui.errors import ModelError
from meshtui.text import printable

GGUF_MAGIC = b"GGUF"

_BLOCK_TENSOR_RE = re.compile(r"^blk\.(\d+)\.")
_INTEGER_TYPES = frozenset(
    {
        GGUFValueType.UINT8,
        GGUFValueType.INT8,
        GGUFValueType.UINT16,
        GGUFValueType.INT16,
        GGUFValueType.UINT32,
        GGUFValueType.INT32,
        GGUFValueType.UINT64,
        GGUFValueType.INT64,
    }
)
# What GGUFReader raises on a damaged header or a file cut short (seen by fuzzing gguf 0.19):
# ValueError (bad version, bad value type, numpy reshape/view of a short buffer, UnicodeDecodeError),
# IndexError (reading past the end), KeyError (duplicate key), OverflowError (absurd counts).
_READER_ERRORS = (ValueError, IndexError, KeyError, OverflowError)

# The f16 K and V cache llama.cpp allocates by default.
_KV_BYTES_PER_ELEMENT = 2


@dataclass(frozen=True)
class ModelFacts:
    path: Path
    architecture: str
    name: str
    file_size: int
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_ctx_train: int
    layer_weight_bytes: tuple[int, ...]  # every blk.{i}.* tensor; len == n_layer
    output_bytes: int  # output.weight + output_norm.*, or token_embd when the output is tied to it
    input_bytes: int  # token_embd.*: always on the head's CPU
    tensors: tuple[tuple[str, int, int], ...] = ()  # (name, file offset, bytes) of every tensor
    n_vocab: int = 0  # tokens in the vocabulary (token_embd's rows): the ids a request may name

    @property
    def weight_bytes(self) -> int:
        """All weights llama.cpp allocates, the tied output's duplicate included."""
        return self.input_bytes + sum(self.layer_weight_bytes) + self.output_bytes

    def kv_bytes_per_layer(self, context: int) -> int:
        per_token = self.n_head_kv * self.head_dim_k + self.n_head_kv * self.head_dim_v
        return context * per_token * _KV_BYTES_PER_ELEMENT

    def node_layer_costs(self, context: int) -> tuple[int, ...]:
        """Bytes each llama.cpp layer costs its device: blocks 0..n_layer-1, then the output layer."""
        kv = self.kv_bytes_per_layer(context)
        return tuple(weights + kv for weights in self.layer_weight_bytes) + (self.output_bytes,)


def read_model_facts(path: Path) -> ModelFacts:
    """Read a GGUF header; every problem with the file becomes a one-line ModelError naming it."""
    path = Path(path)
    return _facts_from_reader(path, _reader(path))


def _reader(path: Path) -> GGUFReader:
    _check_is_gguf(path)
    try:
        return GGUFReader(path)
    except OSError as err:
        raise ModelError(f"{path}: cannot read model file: {err.strerror or err}") from err
    except _READER_ERRORS as err:
        raise ModelError(f"{path}: not a valid GGUF file (damaged or truncated: {_one_line(err)})") from err


def _check_is_gguf(path: Path) -> None:
    if not path.exists():
        raise ModelError(f"{path}: model file not found")
    if path.is_dir():
        raise ModelError(f"{path}: is a directory, not a GGUF model file")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise ModelError(f"{path}: cannot read model file: {err.strerror or err}") from err
    if not magic:
        raise ModelError(f"{path}: model file is empty")
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:120] if text else type(err).__name__


def _facts_from_reader(path: Path, reader: GGUFReader) -> ModelFacts:
    file_size = path.stat().st_size
    arch = _string_field(path, reader, "general.architecture")
    name_field = reader.fields.get("general.name")
    name = _string_field(path, reader, "general.name") if name_field is not None else path.stem
    name = printable(name)  # shown in the TUI, the log and `serve`'s banner: no escape sequence gets there

    n_layer = _int_field(path, reader, f"{arch}.block_count")
    n_embd = _int_field(path, reader, f"{arch}.embedding_length")
    n_head = _int_field(path, reader, f"{arch}.attention.head_count")
    n_head_kv = _int_field(path, reader, f"{arch}.attention.head_count_kv", default=n_head)
    n_ctx_train = _int_field(path, reader, f"{arch}.context_length")
    if n_layer <= 0 or n_embd <= 0 or n_head <= 0:
        raise ModelError(
            f"{path}: unusable model shape "
            f"(block_count {n_layer}, embedding_length {n_embd}, head_count {n_head})"
        )
    head_dim_k = _int_field(path, reader, f"{arch}.attention.key_length", default=n_embd // n_head)
    head_dim_v = _int_field(path, reader, f"{arch}.attention.value_length", default=n_embd // n_head)

    layer_bytes = [0] * n_layer
    output_bytes = 0
    input_bytes = 0
    has_output_weight = False
    data_end = 0
    for tensor in reader.tensors:
        n_bytes = int(tensor.n_bytes)
        data_end = max(data_end, int(tensor.data_offset) + n_bytes)
        tensor_name = tensor.name
        block = _BLOCK_TENSOR_RE.match(tensor_name)
        if block is not None:
            index = int(block.group(1))
            if index < n_layer:  # extra blocks (e.g. next-token-prediction heads) are not offloaded as layers
                layer_bytes[index] += n_bytes
        elif tensor_name.startswith("token_embd."):
            input_bytes += n_bytes
        elif tensor_name == "output.weight":
            output_bytes += n_bytes
            has_output_weight = True
        elif tensor_name.startswith("output_norm.") or tensor_name.startswith("output."):
            output_bytes += n_bytes
    if data_end > file_size:
        raise ModelError(f"{path}: truncated GGUF file: tensor data ends at byte {data_end} of {file_size}")
    if input_bytes == 0:
        raise ModelError(f"{path}: GGUF file has no token_embd tensor")
    if not has_output_weight:
        # Tied embeddings: llama.cpp loads token_embd again as the output matrix, on the output device.
        output_bytes += sum(int(t.n_bytes) for t in reader.tensors if t.name == "token_embd.weight")
    missing_blocks = [i for i, size in enumerate(layer_bytes) if size == 0]
    if missing_blocks:
        raise ModelError(
            f"{path}: GGUF file declares {n_layer} blocks but has no tensors for block {missing_blocks[0]}"
        )

    return ModelFacts(
        path=path,
        architecture=arch,
        name=name,
        file_size=file_size,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        n_ctx_train=n_ctx_train,
        layer_weight_bytes=tuple(layer_bytes),
        output_bytes=output_bytes,
        input_bytes=input_bytes,
        tensors=tuple((t.name, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors),
        n_vocab=next((int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight"), 0),
    )


def tensor_regions(facts: ModelFacts, layers: list[int]) -> list[tuple[int, int]]:
    """(file offset, bytes) of every tensor llama.cpp puts in these layers (layer n_layer: the output layer)."""
    wanted = set(layers)
    has_output = any(name == "output.weight" for name, _, _ in facts.tensors)
    regions = []
    for name, offset, size in facts.tensors:
        block = _BLOCK_TENSOR_RE.match(name)
        if block is not None:
            layer = int(block.group(1))
        elif name.startswith("output") or (name == "token_embd.weight" and not has_output):
            layer = facts.n_layer
        else:
            continue
        if layer in wanted:
            regions.append((offset, size))
    return regions


def _field_contents(path: Path, reader: GGUFReader, key: str) -> tuple[Any, list[GGUFValueType]]:
    field = reader.fields.get(key)
    if field is None:
        raise ModelError(f"{path}: GGUF file lacks the required key {key}")
    try:
        return field.contents(), list(field.types)
    except _READER_ERRORS as err:
        raise ModelError(f"{path}: GGUF key {key} is damaged ({_one_line(err)})") from err


def _string_field(path: Path, reader: GGUFReader, key: str) -> str:
    value, types = _field_contents(path, reader, key)
    if types != [GGUFValueType.STRING] or not isinstance(value, str) or not value:
        raise ModelError(f"{path}: GGUF key {key} should be a non-empty string")
    return value


def _int_field(path: Path, reader: GGUFReader, key: str, *, default: int | None = None) -> int:
    if default is not None and key not in reader.fields:
        return default
    value, types = _field_contents(path, reader, key)
    if types and types[0] == GGUFValueType.ARRAY and types[-1] in _INTEGER_TYPES and value:
        # Per-layer arrays (e.g. head counts that vary by layer): size the cache for the largest.
        return int(max(value))
    if len(types) == 1 and types[0] in _INTEGER_TYPES and isinstance(value, int):
        return value
    raise ModelError(f"{path}: GGUF key {key} should be an integer, got {value!r:.40}")
