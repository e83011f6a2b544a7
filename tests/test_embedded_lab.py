"""`meshtui up` with no inventory: the embedded lab of in-process asyncssh hosts, end to end."""

from __future__ import annotations

import subprocess

import pytest
from helpers import SMOLLM2, meshtui, meshtui_json
from reference import reference_greedy

pytestmark = pytest.mark.slow


def lab_agents() -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if "meshtui_agent.py serve" in line and "meshtui-lab-" in line]


def test_embedded_lab_answers_like_a_single_process_and_leaves_nothing() -> None:
    before = lab_agents()
    prompt = "Once upon a time"
    result = meshtui_json("up", "--headless", "--prompt", prompt, "--raw", "--temperature", "0",
                          "--max-tokens", "20", "--context", "512", "--lab-hosts", "3")
    expected = reference_greedy(SMOLLM2, prompt, 20, context=512)
    assert result["tokens"] == expected["tokens"]
    assert result["completion_tokens"] == len(expected["tokens"]) == 20
    assert 0 < result["time_to_first_token_seconds"] < result["seconds"]
    assert result["text"] == expected["text"]
    names = [row["name"] for row in result["plan"]]
    assert names == ["head", "lab1", "lab2", "lab3"]
    nodes = {row["name"]: row for row in result["nodes"]}
    for row in result["plan"]:
        if row["layers"][1] > row["layers"][0] or row["output_layer"]:  # the head's is measured too
            assert nodes[row["name"]]["latency_ms"]["mean"] > 0
        if row["name"] != "head" and row["layers"][1] > row["layers"][0]:
            assert nodes[row["name"]]["bytes_per_token"] > 0
    expected = {row["name"]: list(range(*row["layers"])) for row in result["plan"]}
    expected["head"].append(30)  # SmolLM2's output layer stays on the head
    assert result["placement"] == {name: layers for name, layers in expected.items() if layers}
    assert lab_agents() == before


def test_chat_template_reply_streams_and_stops() -> None:
    result = meshtui("up", "--headless", "--prompt", "What is 2+2?", "--max-tokens", "12", "--temperature", "0",
                     "--context", "512")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()  # the reply was streamed to stdout
    assert "tok/s" in result.stderr.splitlines()[-1]


def test_bad_lab_size_is_one_line() -> None:
    result = meshtui("up", "--headless", "--prompt", "x", "--lab-hosts", "0")
    assert result.returncode == 2
    assert result.stderr.strip() == "meshtui: error: --lab-hosts: expected at least 1"


async def test_the_mesh_is_ready_only_once_the_model_is_loaded() -> None:
    """One definition of ready: not while the engine process is up but still loading, nor during recovery."""
    from meshtui import events as ev
    from meshtui.inventory import ModelSpec
    from meshtui.lab import EmbeddedLab
    from meshtui.mesh import Mesh

    seen: list[tuple[str, bool]] = []
    lab = EmbeddedLab(n_hosts=1)
    await lab.start()
    mesh: Mesh | None = None

    def listener(event: ev.Event) -> None:
        assert mesh is not None
        if isinstance(event, ev.HostPhaseChanged) and event.host == "head" and event.phase in ("load", "ready"):
            seen.append((event.phase, mesh.ready))
        elif isinstance(event, ev.MeshReady):
            seen.append(("MeshReady", mesh.ready))

    mesh = Mesh(lab.inventory(ModelSpec(path=None, name="smollm2", context=512)), listener=listener)
    try:
        assert not mesh.ready
        await mesh.up()
        assert mesh.engine is not None and mesh.engine.alive
        assert seen == [("load", False), ("ready", True), ("MeshReady", True)]
        assert mesh.ready
    finally:
        await mesh.close()
        await lab.close()
    assert not mesh.ready


def test_plan_reserves_kv_for_the_parallel_sequences() -> None:
    """`plan` says how many sequences its KV cache holds; --parallel 1 and 8 differ by exactly that cache."""
    one = meshtui_json("plan", "--context", "512", "--parallel", "1")
    eight = meshtui_json("plan", "--context", "512", "--parallel", "8")
    assert (one["context"], one["parallel"], eight["context"], eight["parallel"]) == (512, 1, 512, 8)
    assert [row["layers"] for row in eight["plan"]] == [row["layers"] for row in one["plan"]]
    assert [row["kv_bytes"] for row in eight["plan"]] == [8 * row["kv_bytes"] for row in one["plan"]]
    assert sum(row["kv_bytes"] for row in one["plan"]) == 30 * 512 * 3 * 64 * 2 * 2  # SmolLM2: 3 KV heads of 64
    assert eight["reasons"][-1] == ("the KV cache holds 8 sequences of 512 tokens (replies decoded together, "
                                    "--parallel 8): 90.0 MiB in all, 11.2 MiB each")
    text = meshtui("plan", "--context", "512")  # the default: 4
    assert text.returncode == 0, text.stderr
    assert ", context 512, 4 sequences at once" in text.stdout.splitlines()[0]
    assert "the KV cache holds 4 sequences of 512 tokens" in text.stdout
    refused = meshtui("plan", "--parallel", "0")
    assert (refused.returncode, refused.stderr.strip()) == (2, "meshtui: error: --parallel: expected at least 1, not 0")


async def test_stage_latency_is_measured_once_a_step_while_several_replies_are_in_flight() -> None:
    """Three replies decoded together: each step's round trip on every stage is told once (not once per reply,
    not skipped), and a step of three sequences carries more bytes to a stage than a step of one."""
    import asyncio

    from meshtui import events as ev
    from meshtui.inventory import ModelSpec
    from meshtui.lab import EmbeddedLab
    from meshtui.mesh import Mesh
    from meshtui.replies import ReplyQueue

    events: list[ev.Event] = []
    lab = EmbeddedLab(n_hosts=2)
    await lab.start()
    mesh = Mesh(lab.inventory(ModelSpec(path=None, name="smollm2", context=512)), listener=events.append,
                parallel=3)
    prompts = ("The three primary colors are", "Once upon a time", "The capital of France is")
    try:
        await mesh.up()
        await mesh.generate(prompt=prompts[0], raw=True, max_tokens=12, temperature=0.0, speculative="off")
        alone = [e for e in events if isinstance(e, ev.StageLatencyMeasured)]
        events.clear()
        queue = ReplyQueue(mesh)

        async def reply(prompt: str) -> ev.ReplyFinished:
            async for event in queue.stream(source="api", prompt=prompt, raw=True, max_tokens=12, temperature=0.0,
                                            speculative="off"):
                if isinstance(event, ev.ReplyFinished):
                    return event
            raise AssertionError("no ReplyFinished")

        finished = await asyncio.gather(*(reply(p) for p in prompts))
    finally:
        await mesh.close()
        await lab.close()
    together = [e for e in events if isinstance(e, ev.StageLatencyMeasured)]
    tokens = [len(f.token_ids) for f in finished]
    assert tokens == [12, 12, 12]
    for host in ("lab1", "lab2"):
        mine = [e for e in together if e.host == host]
        # One per step that produced a token past some reply's first: at least the 11 steps of the longest
        # reply, at most one per step of all three (never one per reply per step: that would be up to 33).
        assert 11 <= len(mine) <= 13, (host, len(mine))
        single = max(e.bytes_up for e in alone if e.host == host)
        assert max(e.bytes_up for e in mine) > single  # the steps measured held the three sequences
    assert {e.host for e in together} == {"lab1", "lab2", "head"}
