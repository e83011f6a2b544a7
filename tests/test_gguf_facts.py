from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
from gguf import GGUFWriter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synth import LARGE_SHAPE, SMOLLM2_PATH, synthetic_model, tensor_shapes

from meshtui.errors import ModelError
from meshtui.gguf_facts import ModelFacts, read_model_facts

# ------------------------------------------------------------------------------------------------
# An independent reader: a few lines of struct over the GGUF v3 layout, no gguf package.
# ggml type -> (elements per block, bytes per block), for the types SmolLM2 and the synthetic models use.
_GGML_BLOCKS = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 8: (32, 34)}
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_SCALAR_FORMATS |= {10: "<Q", 11: "<q", 12: "<d"}


def _read(f: BinaryIO, fmt: str) -> object:
    return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def _read_value(f: BinaryIO, vtype: int) -> object:
    if vtype == 8:
        length = _read(f, "<Q")
        return f.read(length).decode()  # type: ignore[arg-type]
    if vtype == 9:
        item_type, count = _read(f, "<I"), _read(f, "<Q")
        return [_read_value(f, item_type) for _ in range(count)]  # type: ignore[arg-type,call-overload]
    return _read(f, _SCALAR_FORMATS[vtype])


def independent_gguf_summary(path: Path) -> tuple[dict[str, object], dict[str, int]]:
    """(scalar metadata, tensor name -> bytes) read straight from the file."""
    meta: dict[str, object] = {}
    sizes: dict[str, int] = {}
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"
        _version, n_tensors, n_kv = _read(f, "<I"), _read(f, "<Q"), _read(f, "<Q")
        for _ in range(n_kv):  # type: ignore[call-overload]
            key = _read_value(f, 8)
            value = _read_value(f, _read(f, "<I"))  # type: ignore[arg-type]
            if not isinstance(value, list):
                meta[key] = value  # type: ignore[index]
        for _ in range(n_tensors):  # type: ignore[call-overload]
            name = _read_value(f, 8)
            dims = [_read(f, "<Q") for _ in range(_read(f, "<I"))]  # type: ignore[call-overload]
            ggml_type = _read(f, "<I")
            _read(f, "<Q")  # offset
            per_block, block_bytes = _GGML_BLOCKS[ggml_type]  # type: ignore[index]
            sizes[name] = int(np.prod(dims)) // per_block * block_bytes  # type: ignore[index]
    return meta, sizes


# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_facts() -> ModelFacts:
    return read_model_facts(SMOLLM2_PATH)


def test_smollm2_facts_match_an_independent_reader(smollm2_facts: ModelFacts) -> None:
    meta, sizes = independent_gguf_summary(SMOLLM2_PATH)
    facts = smollm2_facts
    assert facts.path == SMOLLM2_PATH
    assert facts.architecture == meta["general.architecture"] == "llama"
    assert facts.name == meta["general.name"]
    assert facts.file_size == SMOLLM2_PATH.stat().st_size == 98_362_432
    assert facts.n_layer == meta["llama.block_count"] == 30
    assert facts.n_embd == meta["llama.embedding_length"] == 576
    assert facts.n_head == meta["llama.attention.head_count"] == 9
    assert facts.n_head_kv == meta["llama.attention.head_count_kv"] == 3
    assert facts.head_dim_k == facts.head_dim_v == 576 // 9 == 64
    assert facts.n_ctx_train == meta["llama.context_length"] == 8192
    for i in range(30):
        assert facts.layer_weight_bytes[i] == sum(v for k, v in sizes.items() if k.startswith(f"blk.{i}."))
    assert facts.layer_weight_bytes == (2_216_448,) * 30
    # SmolLM2 ties its output to the embeddings: llama.cpp duplicates token_embd onto the output device.
    assert "output.weight" not in sizes
    assert facts.input_bytes == sizes["token_embd.weight"] == 30_081_024
    assert facts.output_bytes == sizes["token_embd.weight"] + sizes["output_norm.weight"] == 30_083_328
    assert facts.weight_bytes == sum(sizes.values()) + sizes["token_embd.weight"]


def test_kv_and_layer_costs(smollm2_facts: ModelFacts) -> None:
    facts = smollm2_facts
    # f16 K and V: 2048 positions x (3 kv heads x 64) x 2 (K and V) x 2 bytes
    assert facts.kv_bytes_per_layer(2048) == 2048 * 3 * 64 * 2 * 2 == 1_572_864
    costs = facts.node_layer_costs(2048)
    assert len(costs) == 31
    assert costs[:30] == (2_216_448 + 1_572_864,) * 30
    assert costs[30] == facts.output_bytes  # the output layer has no KV cache


# --- bad files: always a one-line ModelError naming the file
def _assert_model_error(path: Path, *fragments: str) -> str:
    with pytest.raises(ModelError) as info:
        read_model_facts(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    _assert_model_error(tmp_path / "nope.gguf", "not found")


def test_directory(tmp_path: Path) -> None:
    _assert_model_error(tmp_path, "directory")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    _assert_model_error(path, "empty")


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "random.gguf"
    path.write_bytes(b"\x00\x01" + np.random.default_rng(0).bytes(4096))
    _assert_model_error(path, "not a GGUF file")


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_text("this is not a model\n")
    _assert_model_error(path, "not a GGUF file")


def test_gguf_magic_then_garbage(tmp_path: Path) -> None:
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"GGUF" + np.random.default_rng(1).bytes(64))
    _assert_model_error(path, "not a valid GGUF file")


def _write_tiny_gguf(path: Path, *, block_count: int | None = 2, with_output: bool = True) -> Path:
    writer = GGUFWriter(path, arch="llama")
    if block_count is not None:
        writer.add_block_count(block_count)
    writer.add_context_length(128)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    for i in range(2):
        writer.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((8, 8), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    if with_output:
        writer.add_tensor("output.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_gguf_facts(tmp_path: Path) -> None:
    facts = read_model_facts(_write_tiny_gguf(tmp_path / "tiny.gguf"))
    assert (facts.n_layer, facts.n_embd, facts.n_head, facts.n_head_kv) == (2, 8, 2, 2)
    assert (facts.head_dim_k, facts.head_dim_v, facts.n_ctx_train) == (4, 4, 128)
    assert facts.name == "tiny"  # no general.name: the file stem
    assert facts.layer_weight_bytes == (256, 256)
    assert facts.input_bytes == 512
    assert facts.output_bytes == 512 + 32


def test_tiny_gguf_tied_output(tmp_path: Path) -> None:
    facts = read_model_facts(_write_tiny_gguf(tmp_path / "tied.gguf", with_output=False))
    assert facts.output_bytes == 512 + 32  # token_embd duplicated + output_norm


def test_truncated_at_half(tmp_path: Path) -> None:
    path = _write_tiny_gguf(tmp_path / "half.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _assert_model_error(path, "not a valid GGUF file")


def test_missing_required_key(tmp_path: Path) -> None:
    path = _write_tiny_gguf(tmp_path / "nokey.gguf", block_count=None)
    _assert_model_error(path, "llama.block_count")


def test_block_without_tensors(tmp_path: Path) -> None:
    path = _write_tiny_gguf(tmp_path / "short.gguf", block_count=3)
    _assert_model_error(path, "block 2")


def test_truncated_inside_the_last_tensor(tmp_path: Path) -> None:
    path = _write_tiny_gguf(tmp_path / "cut.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 16])
    _assert_model_error(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path: Path) -> None:
    path = _write_tiny_gguf(tmp_path / "locked.gguf")
    path.chmod(0)
    _assert_model_error(path, "cannot read")


def test_unreadable_file_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_tiny_gguf(tmp_path / "locked.gguf")

    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refuse)
    _assert_model_error(path, "cannot read model file: Permission denied")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_headers_never_escape_as_tracebacks(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "fuzz.gguf"
    if not (tmp_path / "clean.gguf").exists():
        _write_tiny_gguf(tmp_path / "clean.gguf")
    clean = bytearray((tmp_path / "clean.gguf").read_bytes())
    header_end = 400  # KV pairs and tensor infos of the tiny file
    for _ in range(data.draw(st.integers(1, 4))):
        clean[data.draw(st.integers(4, header_end))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(4, len(clean)))
    path.write_bytes(bytes(clean[:cut]))
    try:
        read_model_facts(path)
    except ModelError as err:
        assert str(path) in str(err)


# --- synthetic models
def test_synthetic_model_facts() -> None:
    path = synthetic_model(4)
    facts = read_model_facts(path)
    assert str(Path.home() / ".cache" / "meshtui" / "models") in str(path)
    assert synthetic_model(4) == path  # cached by its parameters
    assert (facts.architecture, facts.n_layer, facts.n_embd) == ("llama", 4, 64)
    assert (facts.n_head, facts.n_head_kv) == (4, 2)
    assert (facts.head_dim_k, facts.head_dim_v) == (16, 16)
    # per block: q and o 64x64, k and v 32x64, gate/up/down 128x64, two norms of 64; all f32
    block = (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64 + 2 * 64) * 4
    assert facts.layer_weight_bytes == (block,) * 4
    assert facts.input_bytes == 49152 * 64 * 4
    assert facts.output_bytes == 49152 * 64 * 4 + 64 * 4
    meta, sizes = independent_gguf_summary(path)
    assert sum(sizes.values()) == facts.weight_bytes
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert "tokenizer.chat_template" in meta


def test_large_shape_is_large_without_writing_it() -> None:
    shapes = tensor_shapes(LARGE_SHAPE, n_vocab=49152)
    sizes = {name: int(np.prod(dims)) * (4 if len(dims) == 1 else 2) for name, dims in shapes}
    assert sum(sizes.values()) >= 10**9
    block_matrices = [size for name, size in sizes.items() if name.startswith("blk.") and "norm" not in name]
    assert len(block_matrices) == 7 * LARGE_SHAPE.n_layer
    assert min(block_matrices) > 10 * 1024 * 1024  # ggml-rpc hashes (caches) only tensors over 10 MiB


@pytest.mark.slow
def test_llama_cpp_loads_and_generates_deterministically() -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    path = synthetic_model(4, dtype="f16", tied_output=True)
    facts = read_model_facts(path)
    assert facts.output_bytes == facts.input_bytes + 64 * 4
    texts = []
    for _ in range(2):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False)
        out = llm.create_completion("Hello, my name is", max_tokens=8, temperature=0.0)
        assert out["usage"]["completion_tokens"] > 0
        texts.append(out["choices"][0]["text"])
        del llm
    assert texts[0] == texts[1]
    assert texts[0]
