#!/usr/bin/env python3
"""The GPU check: a CUDA stage built on a GPU host from the pinned source serves layers to a CPU head.

Two steps, because the GPU machine has no network and no meshtui dependencies:

    .venv/bin/python bench/gpu_check.py prepare DIR   # here: everything the GPU machine lacks, into DIR
    python3 bench/gpu_check.py run DIR --out OUT      # there, with DIR's wheels on PYTHONPATH (see --help)

`prepare` writes: SmolLM2-135M cut to its first N blocks (the real weights, small enough to carry), the
head's llama-cpp-python package (the RPC build, CPU only), wheels of the pure-Python dependencies for
CPython 3.12, and the pinned ggml source tarball that the head pushes to hosts that build their runtime.

`run` starts the embedded lab (an in-process asyncssh host on 127.0.0.1, so the agent runs on the GPU
machine), lets meshtui choose the host's runtime (a GPU, nvcc and cmake: build CUDA there), plans by the
GPU's memory with the head computing nothing but embeddings and the output layer, and generates greedy
replies to bench's fixed prompts. The same prompts then run single-process on the head's CPU. It reports the
plan, the devices the stage serves, the build time, and the share of identical tokens, to OUT/gpu_check.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WHEELS = ("asyncssh", "cryptography", "cffi", "pycparser", "diskcache", "gguf")
CUT_LAYERS = 8


# ---------------------------------------------------------------- prepare (on a machine with the venv)


def cut_model(source: Path, target: Path, n_layers: int) -> None:
    """The first n_layers blocks of a llama-architecture GGUF, every other tensor and key as they are."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(source)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    writer = GGUFWriter(target, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        main_type = field.types[0]
        if key == f"{arch}.block_count":
            writer.add_uint32(key, n_layers)
        elif main_type == GGUFValueType.ARRAY:
            sub_type = field.types[-1]
            values = ([bytes(field.parts[i]) for i in field.data] if sub_type == GGUFValueType.STRING
                      else field.contents())
            writer.add_key_value(key, values, GGUFValueType.ARRAY, sub_type=sub_type)
        elif main_type == GGUFValueType.STRING:
            writer.add_key_value(key, bytes(field.parts[-1]), GGUFValueType.STRING)
        else:
            writer.add_key_value(key, field.contents(), main_type)
    for tensor in reader.tensors:
        if tensor.name.startswith("blk.") and int(tensor.name.split(".")[1]) >= n_layers:
            continue
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def pack_llama_cpp(target: Path) -> None:
    """The installed llama_cpp package with one file per library (symlinks for the other names)."""
    import llama_cpp

    package = Path(llama_cpp.__file__).parent
    with tarfile.open(target, "w:gz") as tar:
        for dist_info in package.parent.glob("llama_cpp_python-*.dist-info"):
            tar.add(dist_info, arcname=dist_info.name)  # the version tells the head which RPC protocol to expect
        for path in sorted(package.rglob("*")):
            if "__pycache__" in path.parts or path.is_dir():
                continue
            arcname = str(path.relative_to(package.parent))
            if path.parent.name == "lib" and ".so" in path.name:
                real = path.name.split(".so")[0] + ".so.0"
                if path.name != real and (path.parent / real).exists():
                    info = tarfile.TarInfo(arcname)
                    info.type, info.linkname = tarfile.SYMTYPE, real
                    tar.addfile(info)
                    continue
            tar.add(path, arcname=arcname)


def prepare(into: Path, n_layers: int) -> None:
    from meshtui.hostbuild import source_tarball
    sys.path.insert(0, str(ROOT / "tests"))
    from synth import SMOLLM2_PATH

    into.mkdir(parents=True, exist_ok=True)
    cut_model(SMOLLM2_PATH, into / "model.gguf", n_layers)
    pack_llama_cpp(into / "llama_cpp.tar.gz")
    tarball, _ = source_tarball()
    shutil.copy(tarball, into / "host-source.tar.gz")
    wheels = into / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                    "--platform", "any", "-d", str(wheels), *WHEELS], check=True)
    total = sum(p.stat().st_size for p in into.rglob("*") if p.is_file())
    print(f"prepared {into}: {total / 2**20:.1f} MiB")


# ---------------------------------------------------------------- run (on the GPU machine)


def nvidia_smi() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,memory.free,driver_version",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except OSError as err:
        return f"nvidia-smi: {err}"


async def reference_replies(model: Path, prompts: list[str], max_tokens: int, threads: int) -> list[list[int]]:
    """The same prompts on the head's CPU alone, through the same engine process and settings."""
    from meshtui.bench import _engine_reply
    from meshtui.engine.client import EngineProcess

    engine = EngineProcess()
    await engine.start()
    try:
        await engine.load(model=str(model), context=512, endpoints=[], n_gpu_layers=0, threads=threads)
        return [(await _engine_reply(engine, i + 1, p, max_tokens)).token_ids for i, p in enumerate(prompts)]
    finally:
        await engine.close()


async def mesh_replies(model: Path, prompts: list[str], max_tokens: int, threads: int, lab_root: Path,
                       runtime: str) -> tuple[dict[str, Any], list[list[int]]]:
    from meshtui import events as ev
    from meshtui.inventory import HeadSpec, ModelSpec
    from meshtui.lab import EmbeddedLab
    from meshtui.mesh import Mesh

    started = time.perf_counter()
    phases: list[str] = []

    def listener(event: ev.Event) -> None:
        if isinstance(event, ev.HostPhaseChanged):
            line = f"{time.perf_counter() - started:7.1f}s {event.host}: {event.phase} {event.detail}"
            phases.append(line)
            print(line, flush=True)
        elif isinstance(event, ev.LogRecorded) and event.level in ("warning", "error"):
            print(f"{event.source}: {event.message}", flush=True)

    lab_root.mkdir(parents=True, exist_ok=True)
    lab = EmbeddedLab(1, root=lab_root)
    await lab.start()
    inventory = lab.inventory(ModelSpec(path=model, name=None, context=512), HeadSpec(compute=False, threads=threads))
    inventory = dataclasses.replace(inventory, hosts=tuple(dataclasses.replace(h, runtime=runtime)
                                                           for h in inventory.hosts))
    mesh = Mesh(inventory, listener=listener)
    try:
        await mesh.up()
        host = mesh.hosts[0]
        assert mesh.plan is not None and host.agent is not None
        report = {
            "plan": mesh.plan.to_json(),
            "placement": mesh.placement,
            "host_gpus_probed": list(host.facts.gpus) if host.facts else [],
            "served_devices": host.agent.devices,
            "backends": host.agent.backends,
            "up_seconds": time.perf_counter() - started,
            "load_bytes_sent": mesh.load_bytes_sent,
            "phases": phases,
        }
        replies = []
        for prompt in prompts:
            reply = await mesh.generate(prompt=prompt, raw=True, max_tokens=max_tokens, temperature=0.0)
            replies.append(list(reply.token_ids))
        return report, replies
    finally:
        await mesh.close()
        await lab.close()


def compare(reference: list[list[int]], mesh: list[list[int]]) -> dict[str, Any]:
    rows = []
    same = total = 0
    for ref, got in zip(reference, mesh, strict=True):
        n = max(len(ref), len(got))
        equal = sum(1 for a, b in zip(ref, got, strict=False) if a == b)
        pairs = zip(ref, got, strict=False)
        prefix = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(ref), len(got)))
        rows.append({"tokens": n, "identical": equal, "identical_prefix": prefix, "reference": ref, "mesh": got})
        same, total = same + equal, total + n
    return {"identical_tokens": same, "tokens": total, "share_identical": same / total if total else None,
            "prompts": rows}


async def run(carry: Path, out: Path, max_tokens: int, threads: int, lab_root: Path, runtime: str) -> int:
    from meshtui.bench import PROMPTS

    os.environ["MESHTUI_HOST_SOURCE"] = str(carry / "host-source.tar.gz")
    model = carry / "model.gguf"
    prompts = list(PROMPTS)
    print(nvidia_smi(), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    try:
        report, mesh_tokens = await mesh_replies(model, prompts, max_tokens, threads, lab_root, runtime)
    except BaseException:
        # What a failed build left behind, for the one look a lent machine allows.
        for log in sorted(lab_root.glob("lab1/.cache/meshtui/build/*/*.log")):
            shutil.copy(log, out / log.name)
        raise
    reference = await reference_replies(model, prompts, max_tokens, threads)
    result = {"gpu": nvidia_smi(), "model": f"SmolLM2-135M-Instruct Q4_1, first {CUT_LAYERS} blocks",
              "max_tokens": max_tokens, **report, "agreement": compare(reference, mesh_tokens)}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    agreement = result["agreement"]
    gpu_plan = [a for a in result["plan"] if a["name"] != "head"]
    print(json.dumps({"plan": gpu_plan, "served_devices": result["served_devices"], "backends": result["backends"],
                      "identical_tokens": agreement["identical_tokens"], "tokens": agreement["tokens"],
                      "share_identical": agreement["share_identical"],
                      "identical_prefixes": [r["identical_prefix"] for r in agreement["prompts"]]}, indent=1))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_prepare = sub.add_parser("prepare")
    p_prepare.add_argument("dir", type=Path)
    p_prepare.add_argument("--layers", type=int, default=CUT_LAYERS)
    p_run = sub.add_parser("run")
    p_run.add_argument("dir", type=Path)
    p_run.add_argument("--out", type=Path, required=True)
    p_run.add_argument("--max-tokens", type=int, default=32)
    p_run.add_argument("--threads", type=int, default=4)
    p_run.add_argument("--lab-root", type=Path, default=Path("/tmp/meshtui-gpu-lab"))
    p_run.add_argument("--runtime", choices=("auto", "build", "push"), default="auto",
                       help="the host's runtime key (auto builds CUDA on a host with a GPU, nvcc and cmake)")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.dir, args.layers)
        return 0
    return asyncio.run(run(args.dir, args.out, args.max_tokens, args.threads, args.lab_root, args.runtime))


if __name__ == "__main__":
    sys.exit(main())
