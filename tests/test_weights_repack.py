"""CPU stages keep quantized weights in their CPU's repacked layouts, as llama.cpp does in one process.

ggml's RPC server allocates every buffer with the CPU backend's default type, so without meshtui's patch
(native/patches/ggml-rpc-weights-repack.patch) a stage runs a Q4_0 model on the plain kernels where llama.cpp in
one process uses the repacked ones (about half the prompt rate, docs/performance.md). SmolLM2 requantized to Q4_0
by llama.cpp's own quantizer is the model: Q4_0 and Q4_K have repacked layouts on x86 CPUs with AVX2, Q4_1 has
none. (Q4_K_M of SmolLM2 has Q4_K only in 16 of its ffn_down matrices: its other rows are not multiples of 256.)
"""

from __future__ import annotations

import os
import re
import socket
import struct
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType, GGUFReader
from helpers import SMOLLM2
from reference import reference_logprobs
from synth import requantized

from meshtui import events as ev
from meshtui.inventory import ModelSpec
from meshtui.lab import EmbeddedLab
from meshtui.localstage import LocalStage
from meshtui.mesh import Mesh
from meshtui.rpcwire import CMD_HELLO, CONN_CAPS_SIZE
from meshtui.runtime import local_runtime_bundle

CONTEXT = 512
PROMPT = "The three primary colors are"
MAX_TOKENS = 16


def cpu_has_avx2() -> bool:
    try:
        return " avx2 " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


# what ggml-cpu's ggml_repack_get_optimal_repack_type takes on an x86 CPU with AVX2 (Q2_K needs AVX-512)
AVX2_REPACKED = {GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_K, GGMLQuantizationType.IQ4_NL,
                 GGMLQuantizationType.MXFP4}


def repackable(model: Path, layers: list[int]) -> int:
    """The matrices of these blocks the patched server repacks on an AVX2 CPU: attention and feed-forward ones (by
    name), of a type above, two dimensions, rows in eights."""
    count = 0
    for tensor in GGUFReader(model).tensors:
        block = re.match(r"blk\.(\d+)\.(attn_(q|k|v|qkv|output)|ffn_(gate|up|down)(_shexp)?)\.weight$", tensor.name)
        if (block and int(block.group(1)) in layers and tensor.tensor_type in AVX2_REPACKED
                and len(tensor.shape) == 2 and int(tensor.shape[1]) % 8 == 0):
            count += 1
    return count


Counts = dict[str, tuple[int | None, int]]


async def reply_on_mesh(model: Path) -> tuple[list[float], Counts, dict[str, bool | None], int | None]:
    """The logprobs of the greedy tokens of PROMPT on a 2-host embedded lab; per host, (weights repacked,
    repackable in its layers); per host, what its agent said about repacking when it started; the weights the
    head's output stage holds repacked."""
    events: list[ev.Event] = []
    lab = EmbeddedLab(n_hosts=2)
    await lab.start()
    mesh = Mesh(lab.inventory(ModelSpec(path=model, name=None, context=CONTEXT)), speculative="off",
                listener=events.append)
    try:
        await mesh.up()
        assert mesh.plan is not None
        reply = await mesh.generate(prompt=PROMPT, raw=True, max_tokens=MAX_TOKENS, temperature=0.0,
                                    speculative="off", sampling={"logprobs": 1})
        counts = {name: (load.repacked, repackable(model, mesh.plan.layers_of(name)))
                  for name, load in mesh.host_loads.items()}
        said = {name: stage.agent.weight_repack if stage.agent else None for name, stage in mesh.stages.items()}
        assert mesh.local_stage is not None  # the plan keeps the output on the head
        head = await mesh.local_stage.repacked_weights()
    finally:
        await mesh.close()
        await lab.close()
    tokens = [e for e in events if isinstance(e, ev.TokenGenerated)]
    assert [t.token_id for t in tokens] == list(reply.token_ids) and len(tokens) == MAX_TOKENS
    return [t.logprob for t in tokens if t.logprob is not None], counts, said, head


@pytest.fixture(scope="module")
def q4_0_model() -> Path:
    return requantized(SMOLLM2, "q4_0")


@pytest.mark.slow
@pytest.mark.parametrize("ftype", ["q4_0", "q4_k_m"])
async def test_a_stage_holds_its_weights_repacked_and_answers_as_one_process(
        ftype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if not cpu_has_avx2():
        pytest.skip("this CPU has no AVX2: ggml-cpu has no repacked Q4_0 or Q4_K layout for it")
    model = requantized(SMOLLM2, ftype)
    monkeypatch.delenv("MESHTUI_WEIGHT_REPACK", raising=False)
    monkeypatch.setenv("MESHTUI_RUNTIME", "head-build")  # the head's own kernels on the stages: exact equality
    logprobs, counts, said, head = await reply_on_mesh(model)
    assert said == {"lab1": True, "lab2": True}
    assert set(counts) == {"lab1", "lab2"}
    for name, (repacked, expected) in counts.items():
        assert expected > 0 and repacked == expected, (name, counts)
    assert head == 0  # the output matrix (tied: token_embd) is Q8_0 in both: no repacked layout on x86
    # llama-cpp-python in one process repacks the same weights: the same numbers, to float32 rounding (measured
    # 1.7e-7; with the plain layouts on the stages they part by 0.1, next test)
    reference = reference_logprobs(model, PROMPT, MAX_TOKENS, top=1, context=CONTEXT)["logprobs"]
    assert logprobs == pytest.approx(reference["token_logprobs"], abs=1e-5)


@pytest.mark.slow
async def test_with_repacking_off_no_weight_is_repacked_and_the_reply_still_completes(
        q4_0_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHTUI_WEIGHT_REPACK", "0")
    monkeypatch.setenv("MESHTUI_RUNTIME", "head-build")
    logprobs, counts, said, head = await reply_on_mesh(q4_0_model)
    assert said == {"lab1": False, "lab2": False}
    assert {name: repacked for name, (repacked, _) in counts.items()} == {"lab1": 0, "lab2": 0}
    assert head == 0
    assert len(logprobs) == MAX_TOKENS
    if cpu_has_avx2():  # the plain kernels: not what one process computes (which is why the patch exists)
        reference = reference_logprobs(q4_0_model, PROMPT, MAX_TOKENS, top=1, context=CONTEXT)["logprobs"]
        assert max(abs(a - b) for a, b in zip(logprobs, reference["token_logprobs"], strict=True)) > 1e-3


@pytest.mark.slow
async def test_the_head_output_stage_repacks_a_tied_output_matrix_as_one_process_does(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """SmolLM2 ties its output matrix to its token embedding (`token_embd.weight`). llama.cpp reads the embedding's
    rows on the head's CPU (the input layer stays there) and gives the head's output stage its own copy, used only
    as the output matrix, which llama.cpp in one process repacks ("repack tensor token_embd.weight"): so does the
    stage. Here the embedding is Q4_0 (it is Q8_0 in the plain requantization, which x86 has no repacked layout
    for)."""
    if not cpu_has_avx2():
        pytest.skip("this CPU has no AVX2: ggml-cpu has no repacked Q4_0 layout for it")
    model = requantized(SMOLLM2, "q4_0", embedding="q4_0")
    monkeypatch.delenv("MESHTUI_WEIGHT_REPACK", raising=False)
    monkeypatch.setenv("MESHTUI_RUNTIME", "head-build")
    logprobs, counts, _, head = await reply_on_mesh(model)
    assert head == 1
    assert all(repacked == expected for repacked, expected in counts.values()), counts
    reference = reference_logprobs(model, PROMPT, MAX_TOKENS, top=1, context=CONTEXT)["logprobs"]
    assert logprobs == pytest.approx(reference["token_logprobs"], abs=1e-5)


@pytest.mark.slow
async def test_the_builtin_q4_1_model_has_nothing_to_repack() -> None:
    lab = EmbeddedLab(n_hosts=1)
    await lab.start()
    mesh = Mesh(lab.inventory(ModelSpec(path=None, name="smollm2", context=CONTEXT)), speculative="off")
    try:
        await mesh.up()
        repacked = {name: load.repacked for name, load in mesh.host_loads.items()}
        assert repackable(SMOLLM2, list(range(64))) == 0
    finally:
        await mesh.close()
        await lab.close()
    assert repacked == {"lab1": 0}


# ---------------------------------------------------------------- the patched server on its own, over its wire

RPC_TENSOR = struct.Struct("<QIQ4I4II16iI10QQQQ64si")  # ggml-rpc.cpp's rpc_tensor (packed, 296 bytes)
ALLOC_BUFFER, BUFFER_GET_BASE, SET_TENSOR, GET_TENSOR = 0, 3, 6, 8
Q4_0 = 2  # ggml_type: 32 values a block of 18 bytes
SHAPE = (256, 64, 1, 1)
STRIDES = (18, 144, 144 * 64, 144 * 64)
NBYTES = 144 * 64
PLAIN_NAME = "blk.0.ssm_conv1d.weight"  # a block's weight that is not in the server's list of matrices


def rpc_tensor(name: str, buffer: int, data: int) -> bytes:
    return RPC_TENSOR.pack(1, Q4_0, buffer, *SHAPE, *STRIDES, 0, *[0] * 16, 0, *[0] * 10, 0, 0, data,
                           name.encode(), 0)


class RpcClient:
    """Just enough of ggml's RPC client to set and read tensors by hand."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(path)
        assert len(self.call(CMD_HELLO, bytes(CONN_CAPS_SIZE))) >= 3

    def call(self, cmd: int, payload: bytes, reply: bool = True) -> bytes:
        self.sock.sendall(bytes([cmd]) + struct.pack("<Q", len(payload)) + payload)
        if not reply:
            return b""
        (size,) = struct.unpack("<Q", self.recv(8))
        return self.recv(size)

    def recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError(f"the server closed the connection after {len(data)} of {n} bytes")
            data += chunk
        return data


async def test_the_server_repacks_only_matrix_weights_and_never_hands_repacked_bytes_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A Q4_0 matrix named like an attention weight is repacked as it arrives; the same bytes named like a weight
    that is not only multiplied by (a convolution's) stay as sent; reading the repacked one back is refused (the client
    would get bytes in a layout it never wrote), and the weights the connection held are forgotten with it."""
    if not cpu_has_avx2():
        pytest.skip("this CPU has no AVX2: ggml-cpu has no repacked Q4_0 layout for it")
    monkeypatch.delenv("MESHTUI_WEIGHT_REPACK", raising=False)
    stage = LocalStage(local_runtime_bundle("head-build"), threads=1)
    await stage.start()
    try:
        assert await stage.repacked_weights() == 0
        rpc = RpcClient(stage.socket_path)
        buffer, _size = struct.unpack("<QQ", rpc.call(ALLOC_BUFFER, struct.pack("<IQ", 0, 1 << 20)))
        (base,) = struct.unpack("<Q", rpc.call(BUFFER_GET_BASE, struct.pack("<Q", buffer)))
        weights = os.urandom(NBYTES)
        for name, data in (("blk.0.attn_q.weight", base), (PLAIN_NAME, base + NBYTES)):
            rpc.call(SET_TENSOR, rpc_tensor(name, buffer, data) + b"\0" + struct.pack("<Q", 0) + weights,
                     reply=False)
        plain = rpc.call(GET_TENSOR, rpc_tensor(PLAIN_NAME, buffer, base + NBYTES) +
                         struct.pack("<QQ", 0, NBYTES))
        assert plain == weights
        assert await stage.repacked_weights() == 1
        with pytest.raises(ConnectionError):
            rpc.call(GET_TENSOR, rpc_tensor("blk.0.attn_q.weight", buffer, base) + struct.pack("<QQ", 0, 64))
        rpc.sock.close()
        assert await stage.repacked_weights() == 0
    finally:
        await stage.close()
