"""How much each node can hold and on what: the reserves, the GPU verdict, the planner's capacities. Pure.

One rule for `up`, `plan`, `bench` and the tests: the orchestrator only passes in what it probed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from meshtui.gguf_facts import ModelFacts
from meshtui.hosts import HostFacts
from meshtui.inventory import HeadSpec, HostSpec
from meshtui.planner import NODE_OVERHEAD_BYTES, NodeCapacity

HEAD_NAME = "head"
HEAD_RESERVE_BYTES = 512 * 1024**2  # left free on the head for the OS, the TUI and the engine process
HOST_RESERVE_BYTES = 256 * 1024**2  # left free on each host for the OS and the agent itself
GPU_RESERVE_BYTES = 1024**3  # left free on each GPU for the CUDA context and the RPC server's buffers


@dataclass(frozen=True)
class GpuVerdict:
    """Whether a host's layers go to its GPUs, and when it has GPUs but they are not used, why not."""

    serves: bool
    why_not: str = ""


@dataclass(frozen=True)
class ProbedHost:
    """A host as the planner needs it: what the inventory says and what its probe found."""

    spec: HostSpec
    facts: HostFacts


def gpu_verdict(spec: HostSpec, facts: HostFacts) -> GpuVerdict:
    """A host's layers go to its GPUs when it has some (NVIDIA, or Apple silicon's), the inventory allows it and
    a GPU runtime can be built there (the pushed one is CPU-only)."""
    if not facts.gpus:
        return GpuVerdict(False)
    if not spec.gpu:
        return GpuVerdict(False, "gpu = false in the inventory")
    if spec.runtime == "push":
        return GpuVerdict(False, 'runtime = "push" (the pushed runtime is CPU-only)')
    apple = all(g.get("vendor") == "apple" for g in facts.gpus)
    backend = "Metal" if apple else "CUDA"
    if not apple and not facts.nvcc:
        return GpuVerdict(False, "no nvcc on the host: install the CUDA toolkit so meshtui can build a CUDA "
                                 "runtime there")
    if not facts.cmake:
        return GpuVerdict(False, f"no cmake on the host: install cmake so meshtui can build a {backend} runtime "
                                 "there")
    return GpuVerdict(True)


def head_capacity(model: ModelFacts, head: HeadSpec, mem_available: int) -> NodeCapacity:
    """The head holds layers in its RAM less a reserve, or (compute = false) room for the embeddings only."""
    if head.compute:
        usable = mem_available - HEAD_RESERVE_BYTES
        if head.max_memory is not None:
            usable = min(usable, head.max_memory)
    else:
        usable = model.input_bytes + NODE_OVERHEAD_BYTES
    return NodeCapacity(HEAD_NAME, max(0, usable), is_head=True)


def host_capacity(host: ProbedHost) -> NodeCapacity:
    """A GPU host is sized by its GPUs' free memory, a CPU host by its RAM; both capped by max_memory."""
    facts, spec = host.facts, host.spec
    usable = facts.mem_available - HOST_RESERVE_BYTES
    device = "cpu"
    if gpu_verdict(spec, facts).serves:
        gpus = facts.gpus
        usable = sum(max(0, int(g.get("memory_free") or 0) - GPU_RESERVE_BYTES) for g in gpus)
        names = sorted({str(g.get("name") or "GPU") for g in gpus})
        device = (f"{len(gpus)}x " if len(gpus) > 1 else "") + ", ".join(names)
    if spec.max_memory is not None:
        usable = min(usable, spec.max_memory)
    return NodeCapacity(spec.name, max(0, usable), device=device)


def capacities(model: ModelFacts, head: HeadSpec, head_facts: HostFacts,
               hosts: Sequence[ProbedHost]) -> list[NodeCapacity]:
    """The planner's input: the head first, then the hosts in inventory order."""
    return [head_capacity(model, head, head_facts.mem_available), *(host_capacity(h) for h in hosts)]


def bandwidth_speeds(names: Sequence[str], bandwidth: Mapping[str, int | None]) -> tuple[list[float] | None, str]:
    """Each planned node's probed memory bandwidth, for a split that follows speed. Without a measurement for
    every node: None, and the first node that lacks one (the split then follows memory only)."""
    speeds = []
    for name in names:
        measured = bandwidth.get(name)
        if not measured:
            return None, name
        speeds.append(float(measured))
    return speeds, ""
