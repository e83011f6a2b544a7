"""The portable agent runtime (native/build_runtime.py) and how the head chooses what to push.

The tests that need the build skip, saying so, when it is not in the cache: it is opt-in (scripts/setup
--portable-runtime, about 4 minutes on 2 cores, once), also under CI=true. The rest run everywhere.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest

from meshtui import runtime
from meshtui.errors import HostError, MeshError
from meshtui.rpcwire import rpc_hello
from meshtui.runtime import (
    PORTABLE_MANIFEST,
    RuntimeBundle,
    expected_rpc_protocol,
    installed_llama_cpp_python,
    local_runtime_bundle,
    portable_runtime_dir,
)

PORTABLE = portable_runtime_dir()
needs_portable = pytest.mark.skipif(
    PORTABLE is None,
    reason=f"the portable runtime is not built for llama-cpp-python {installed_llama_cpp_python()} in "
    f"{runtime.portable_cache_root()} (opt-in: scripts/setup --portable-runtime, ~4 min once)",
)
# The libraries a host without a C++ toolchain runtime lacks. The head-build runtime needs both.
MULTIARCH_LIB = Path("/usr/lib") / (sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu")
HIDDEN = (MULTIARCH_LIB / "libgomp.so.1", MULTIARCH_LIB / "libstdc++.so.6")
# ggml's x86 CPU variants: the cpuinfo flags each needs, and the score ggml gives it
# (ggml/src/CMakeLists.txt and ggml-cpu/arch/x86/cpu-feats.cpp), to know which one a host must get.
_FEATURE_SCORE = {"fma": 1, "f16c": 2, "sse4_2": 4, "bmi2": 8, "avx": 16, "avx2": 32, "avx_vnni": 64,
                  "avx512": 128, "avx512vbmi": 256, "avx512_bf16": 512, "avx512_vnni": 1024, "amx_int8": 2048}
_HASWELL = ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2")
_SKYLAKEX = (*_HASWELL, "avx512")
VARIANT_FEATURES = {
    "x64": (), "sse42": ("sse4_2",), "sandybridge": ("sse4_2", "avx"), "ivybridge": ("sse4_2", "avx", "f16c"),
    "piledriver": ("sse4_2", "avx", "f16c", "fma"), "haswell": _HASWELL, "alderlake": (*_HASWELL, "avx_vnni"),
    "skylakex": _SKYLAKEX, "cannonlake": (*_SKYLAKEX, "avx512vbmi"), "cascadelake": (*_SKYLAKEX, "avx512_vnni"),
    "icelake": (*_SKYLAKEX, "avx512vbmi", "avx512_vnni"), "cooperlake": (*_SKYLAKEX, "avx512_vnni", "avx512_bf16"),
    "zen4": (*_SKYLAKEX, "avx512vbmi", "avx512_vnni", "avx512_bf16"),
    "sapphirerapids": (*_SKYLAKEX, "avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_int8"),
}


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            if {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"} <= flags:
                flags.add("avx512")
            return flags
    return set()


def variant_score(variant: str, flags: set[str]) -> int:
    needed = VARIANT_FEATURES[variant]
    return 0 if not set(needed) <= flags else 1 + sum(_FEATURE_SCORE[f] for f in needed)


def best_variant(variants: list[str]) -> str | None:
    flags = cpu_flags()
    scored = [(variant_score(v, flags), v) for v in variants]
    score, variant = max(scored)
    return variant if score > 0 else None


def install(bundle: RuntimeBundle, into: Path) -> Path:
    for rel, local in bundle.files:
        (into / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(local, into / rel)
    return into


def serve(runtime_dir: Path, home: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(runtime_dir / "meshtui_agent.py"), "serve", "--runtime",
                             str(runtime_dir), "--threads", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={"HOME": str(home), "PATH": "/usr/bin:/bin"})


def first_message(runtime_dir: Path, home: Path) -> dict:
    """What the agent says first when started on `runtime_dir` (then it is told to go)."""
    agent = serve(runtime_dir, home)
    try:
        assert agent.stdout is not None
        return json.loads(agent.stdout.readline())
    finally:
        agent.kill()
        agent.wait(timeout=10)


@pytest.fixture
def fresh_bundles():
    """local_runtime_bundle caches per kind; tests that change the cache folder start and end clean."""
    runtime._bundle.cache_clear()
    yield
    runtime._bundle.cache_clear()


# ---------------------------------------------------------------- choosing what to push (no build needed)


def test_head_build_bundle_is_the_heads_own_libraries(fresh_bundles) -> None:
    bundle = local_runtime_bundle("head-build")
    assert bundle.kind == "head-build"
    assert [rel for rel, _ in bundle.files] == ["meshtui_agent.py", *(f"lib/{n}" for n in runtime.RUNTIME_LIBS)]


def test_runtime_choice_from_the_environment(monkeypatch, tmp_path: Path, fresh_bundles) -> None:
    monkeypatch.setenv("MESHTUI_RUNTIME_BUILD_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("MESHTUI_RUNTIME", "portable")
    with pytest.raises(MeshError, match="scripts/setup --portable-runtime"):
        local_runtime_bundle()
    monkeypatch.setenv("MESHTUI_RUNTIME", "auto")
    assert local_runtime_bundle().kind == "head-build"  # nothing built: the head's libraries
    monkeypatch.setenv("MESHTUI_RUNTIME", "fastest")
    with pytest.raises(MeshError, match="MESHTUI_RUNTIME='fastest' is not one of auto, portable, head-build"):
        local_runtime_bundle()


def _fake_build(root: Path, **manifest: object) -> Path:
    libdir = root / "k1" / "lib"
    libdir.mkdir(parents=True)
    for name in ("libggml-base.so.0", "libggml.so.0", "libggml-rpc.so", "libggml-cpu-x64.so"):
        (libdir / name).write_bytes(name.encode())
    (libdir / "notes.txt").write_text("not part of the runtime")
    values = {"layout": "ggml-backend-dl", "llama_cpp_python": installed_llama_cpp_python(),
              "rpc_protocol": list(expected_rpc_protocol() or ()), "rpc_unix_socket": True,
              "rpc_verified_cache": True}
    values.update(manifest)
    (libdir / PORTABLE_MANIFEST).write_text(json.dumps({k: v for k, v in values.items() if v is not None}))
    pointer = runtime.portable_pointer_name(str(installed_llama_cpp_python()))
    (root / pointer).write_text(json.dumps({"key": "k1"}))
    return libdir


def test_auto_prefers_a_portable_build_of_the_same_source(monkeypatch, tmp_path: Path, fresh_bundles) -> None:
    monkeypatch.setenv("MESHTUI_RUNTIME_BUILD_CACHE", str(tmp_path))
    monkeypatch.delenv("MESHTUI_RUNTIME", raising=False)
    libdir = _fake_build(tmp_path)
    bundle = local_runtime_bundle()
    assert bundle.kind == "portable"
    assert dict(bundle.files) == {
        "meshtui_agent.py": runtime.agent_source_path(),
        **{f"lib/{n}": libdir / n for n in ("libggml-base.so.0", "libggml-cpu-x64.so", "libggml-rpc.so",
                                             "libggml.so.0", PORTABLE_MANIFEST)},
    }
    assert bundle.digest != local_runtime_bundle("head-build").digest


@pytest.mark.parametrize("manifest", [{"llama_cpp_python": "0.0.1"}, {"rpc_protocol": [6, 0, 0]},
                                      {"rpc_unix_socket": None}, {"rpc_verified_cache": None}],
                         ids=["version", "protocol", "unpatched", "unverified-cache"])
def test_a_portable_build_of_other_source_is_never_pushed(monkeypatch, tmp_path: Path, fresh_bundles,
                                                          manifest: dict) -> None:
    monkeypatch.setenv("MESHTUI_RUNTIME_BUILD_CACHE", str(tmp_path))
    _fake_build(tmp_path, **manifest)
    assert portable_runtime_dir() is None
    assert local_runtime_bundle("auto").kind == "head-build"


def test_every_build_of_the_pinned_source_carries_the_unix_socket_patch() -> None:
    """The head's llama-cpp-python, and the source a host builds (CPU or CUDA, same CMake flags as before)."""
    from meshtui import hostbuild

    head_rpc = ctypes.CDLL(str(runtime.llama_cpp_lib_dir() / "libggml-rpc.so.0"))
    assert hasattr(head_rpc, "ggml_backend_rpc_unix_socket_support")
    assert hasattr(head_rpc, "ggml_backend_rpc_verified_cache_threshold")
    assert hasattr(head_rpc, "ggml_backend_rpc_set_weight_repack")
    native = hostbuild._native_builder()
    assert native.pointer_name("0.3.36") == runtime.portable_pointer_name("0.3.36")
    tarball, _ = hostbuild.source_tarball()
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
        transport = tar.extractfile("ggml/src/ggml-rpc/transport.cpp").read().decode()  # type: ignore[union-attr]
        header = tar.extractfile("ggml/include/ggml-rpc.h").read().decode()  # type: ignore[union-attr]
    assert "socket(AF_UNIX, SOCK_STREAM, 0)" in transport
    assert "int ggml_backend_rpc_unix_socket_support(void);" in header
    assert "size_t ggml_backend_rpc_verified_cache_threshold(void);" in header
    assert "void ggml_backend_rpc_set_weight_repack(int enable);" in header
    assert not any(name.endswith((".orig", ".rej")) for name in names)


# ---------------------------------------------------------------- the agent (no build needed)


def test_agent_still_serves_the_head_build_layout(tmp_path: Path) -> None:
    runtime_dir = install(local_runtime_bundle("head-build"), tmp_path / "runtime")
    agent = serve(runtime_dir, tmp_path)
    try:
        assert agent.stdout is not None and agent.stdin is not None
        ready = json.loads(agent.stdout.readline())
        assert ready["event"] == "ready" and ready["runtime"] == "head-build"
        assert "variant" not in ready["devices"][0]
        assert ready["weight_repack"] is True  # the head's build carries the repack patch too
        assert asyncio.run(rpc_hello(ready["socket"])) == (7, 0, 0)
        agent.stdin.write("stats 7\n")
        agent.stdin.flush()
        assert json.loads(agent.stdout.readline()) == {"event": "stats", "seq": "7", "repacked_weights": 0}
        agent.stdin.close()
        assert agent.wait(timeout=10) == 0
    finally:
        if agent.poll() is None:
            agent.kill()


@pytest.mark.parametrize(("manifest", "reason"), [
    ({"min_glibc": "99.0"}, r"this runtime needs glibc >= 99\.0, the host has 2\.\d+"),
    ({"arch": "riscv64"}, r"this runtime is built for riscv64, the host is \S+"),
    ({"layout": "something-else"}, r"runtime manifest .* describes an unknown layout"),
])
def test_agent_refuses_a_portable_runtime_this_host_cannot_run(tmp_path: Path, manifest: dict, reason: str) -> None:
    runtime_dir = tmp_path / "runtime"
    (runtime_dir / "lib").mkdir(parents=True)
    shutil.copy(runtime.agent_source_path(), runtime_dir)
    (runtime_dir / "lib" / PORTABLE_MANIFEST).write_text(json.dumps({"layout": "ggml-backend-dl", **manifest}))
    message = first_message(runtime_dir, tmp_path)
    assert message["event"] == "error"
    assert re.fullmatch(reason, message["reason"]), message["reason"]


# ---------------------------------------------------------------- the build itself


def _libraries() -> list[Path]:
    assert PORTABLE is not None
    return sorted(p for p in PORTABLE.iterdir() if ".so" in p.name)


def _glibc_versions(path: Path) -> list[tuple[int, ...]]:
    symbols = subprocess.run(["objdump", "-T", "-w", str(path)], capture_output=True, text=True, check=True).stdout
    return [tuple(map(int, v.split("."))) for v in re.findall(r"\bGLIBC_(\d+\.\d+(?:\.\d+)?)\b", symbols)]


@needs_portable
def test_portable_libraries_need_neither_libstdcxx_nor_libgomp() -> None:
    assert PORTABLE is not None
    manifest = json.loads((PORTABLE / PORTABLE_MANIFEST).read_text())
    newest = (0,)
    for lib in _libraries():
        dynamic = subprocess.run(["readelf", "-d", "-W", str(lib)], capture_output=True, text=True,
                                 check=True).stdout
        needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic))
        assert not needed & {"libstdc++.so.6", "libgomp.so.1"}, (lib.name, needed)
        assert needed <= {"libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "ld-linux-x86-64.so.2",
                          "libgcc_s.so.1", "libggml-base.so.0"}, (lib.name, needed)
        symbols = subprocess.run(["objdump", "-T", "-w", str(lib)], capture_output=True, text=True,
                                 check=True).stdout
        assert "GLIBCXX_" not in symbols and "CXXABI_" not in symbols, lib.name
        newest = max(newest, *_glibc_versions(lib))
    # The manifest's minimum glibc is the newest symbol version any library asks for.
    assert manifest["min_glibc"] == ".".join(map(str, newest))
    assert manifest["llama_cpp_python"] == installed_llama_cpp_python()
    assert tuple(manifest["rpc_protocol"]) == expected_rpc_protocol() == (7, 0, 0)
    assert {f"libggml-cpu-{v}.so" for v in manifest["cpu_variants"]} <= {p.name for p in _libraries()}
    assert {"x64", "haswell", "skylakex"} <= set(manifest["cpu_variants"])  # baseline, AVX2, AVX-512


@needs_portable
def test_agent_serves_the_portable_runtime_with_the_hosts_best_cpu_variant(tmp_path: Path) -> None:
    bundle = local_runtime_bundle("portable")
    assert bundle.kind == "portable"
    runtime_dir = install(bundle, tmp_path / "runtime")
    variants = json.loads((runtime_dir / "lib" / PORTABLE_MANIFEST).read_text())["cpu_variants"]
    agent = serve(runtime_dir, tmp_path)
    try:
        assert agent.stdout is not None and agent.stdin is not None
        ready = json.loads(agent.stdout.readline())
        assert ready["event"] == "ready" and ready["runtime"] == "portable"
        cpu = ready["devices"][0]
        assert cpu["type"] == "cpu" and cpu["description"]
        assert cpu["variant"] == best_variant(variants)
        assert asyncio.run(rpc_hello(ready["socket"])) == expected_rpc_protocol() == (7, 0, 0)
        agent.stdin.write("ping 3\n")
        agent.stdin.flush()
        assert json.loads(agent.stdout.readline()) == {"event": "pong", "seq": "3"}
        agent.stdin.close()
        assert agent.wait(timeout=10) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.stderr is not None
    assert f"libggml-cpu-{cpu['variant']}.so" in agent.stderr.read()  # ggml's own "loaded CPU backend from"


@needs_portable
def test_agent_falls_back_to_the_next_best_cpu_variant(tmp_path: Path) -> None:
    runtime_dir = install(local_runtime_bundle("portable"), tmp_path / "runtime")
    variants = json.loads((runtime_dir / "lib" / PORTABLE_MANIFEST).read_text())["cpu_variants"]
    best = best_variant(variants)
    (runtime_dir / "lib" / f"libggml-cpu-{best}.so").unlink()
    rest = [v for v in variants if v != best]
    ready = first_message(runtime_dir, tmp_path)
    assert ready["event"] == "ready"
    assert ready["devices"][0]["variant"] == best_variant(rest)


@needs_portable
def test_agent_says_when_no_cpu_variant_runs_on_the_host(tmp_path: Path) -> None:
    runtime_dir = install(local_runtime_bundle("portable"), tmp_path / "runtime")
    variants = json.loads((runtime_dir / "lib" / PORTABLE_MANIFEST).read_text())["cpu_variants"]
    flags = cpu_flags()
    runnable = [v for v in variants if variant_score(v, flags)]
    if len(runnable) == len(variants):
        pytest.skip("this CPU runs every variant built")
    for variant in runnable:
        (runtime_dir / "lib" / f"libggml-cpu-{variant}.so").unlink()
    message = first_message(runtime_dir, tmp_path)
    assert message["event"] == "error"
    assert message["reason"].startswith("no CPU backend of the runtime runs on this host (")
    assert "needs instructions this CPU lacks" in message["reason"]


# ---------------------------------------------------------------- a host without libgomp and libstdc++


def _hidden_libs_lab(lab_factory):
    missing = [str(p) for p in HIDDEN if not p.exists()]
    if missing:
        pytest.skip(f"this machine has no {', '.join(missing)} to hide")
    return lab_factory(2, hide_libs={"h2": [str(p) for p in HIDDEN]})


@pytest.mark.lab
@pytest.mark.slow
async def test_head_build_runtime_cannot_load_where_libgomp_and_libstdcxx_are_missing(
        lab_factory, tmp_path: Path, monkeypatch) -> None:
    from meshtui.inventory import load_inventory
    from meshtui.mesh import Mesh

    lab = _hidden_libs_lab(lab_factory)
    monkeypatch.setenv("MESHTUI_RUNTIME", "head-build")
    inventory_file = tmp_path / "inventory.toml"
    # runtime = "push": report the pushed runtime's failure rather than fall back to building on the host
    # (which this host could not do either: its compiler needs the libstdc++ that is hidden).
    inventory_file.write_text(lab.inventory_toml('name = "smollm2"', {"h2": {"runtime": "push"}}))
    mesh = Mesh(load_inventory(inventory_file))
    with pytest.raises(HostError) as failure:
        await mesh.up()
    message = str(failure.value)
    assert message.startswith("h2: agent cannot serve: cannot load libggml"), message
    assert (failure.value.host, failure.value.code) == ("h2", "cannot_load")  # what the head acts on
    assert re.search(r"(libgomp\.so\.1|libstdc\+\+\.so\.6): file too short", message), message


@pytest.mark.lab
@pytest.mark.slow
@needs_portable
async def test_portable_runtime_serves_where_libgomp_and_libstdcxx_are_missing(
        lab_factory, tmp_path: Path, monkeypatch) -> None:
    from helpers import SMOLLM2
    from reference import reference_greedy

    from meshtui.inventory import load_inventory
    from meshtui.mesh import Mesh

    lab = _hidden_libs_lab(lab_factory)
    monkeypatch.setenv("MESHTUI_RUNTIME", "portable")
    inventory_file = tmp_path / "inventory.toml"
    inventory_file.write_text(lab.inventory_toml('name = "smollm2"'))
    mesh = Mesh(load_inventory(inventory_file))
    prompt, max_tokens = "The three primary colors are", 24
    try:
        await mesh.up()
        assert mesh.plan is not None
        planned = {a.name for a in mesh.plan.assignments if a.n_layers}
        assert planned == {"head", "h1", "h2"}  # h2, without libgomp and libstdc++, holds layers
        variants = {}
        for node in mesh.hosts:
            variants[node.name] = mesh.stages[node.name].running_agent().devices[0].get("variant")
        assert variants["h1"] and variants["h2"] == variants["h1"]
        reply = await mesh.generate(prompt=prompt, raw=True, max_tokens=max_tokens, temperature=0.0)
    finally:
        await mesh.close()
    expected = reference_greedy(SMOLLM2, prompt, max_tokens, context=512)
    assert list(reply.token_ids) == expected["tokens"]
    assert reply.text == expected["text"]
