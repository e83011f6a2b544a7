"""bench/gpu_check.py's pieces that run here: the model cut it carries, and how replies are compared."""

from __future__ import annotations

from pathlib import Path

from synth import SMOLLM2_PATH

from meshtui.gguf_facts import read_model_facts
from meshtui.runtime import load_file_module

GPU_CHECK = load_file_module(Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py", "gpu_check_under_test")


def test_the_cut_model_keeps_the_first_blocks_and_everything_else(tmp_path: Path) -> None:
    target = tmp_path / "cut.gguf"
    GPU_CHECK.cut_model(SMOLLM2_PATH, target, 2)
    full, cut = read_model_facts(SMOLLM2_PATH), read_model_facts(target)
    assert (full.n_layer, cut.n_layer) == (30, 2)
    assert cut.layer_weight_bytes == full.layer_weight_bytes[:2]
    assert (cut.input_bytes, cut.output_bytes, cut.n_embd) == (full.input_bytes, full.output_bytes, full.n_embd)


def test_replies_are_compared_token_by_token() -> None:
    result = GPU_CHECK.compare([[1, 2, 3, 4], [5, 6]], [[1, 2, 9, 4], [5, 6, 7]])
    assert (result["identical_tokens"], result["tokens"]) == (5, 7)
    assert [row["identical_prefix"] for row in result["prompts"]] == [2, 2]
    assert result["share_identical"] == 5 / 7
