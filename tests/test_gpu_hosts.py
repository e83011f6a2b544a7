"""How a host's GPUs enter the plan: which hosts serve from GPUs, by whose memory, and the build on the host."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from typing import Any

import pytest

from meshtui.capacity import GPU_RESERVE_BYTES, HOST_RESERVE_BYTES, GpuVerdict, ProbedHost, gpu_verdict, host_capacity
from meshtui.hostbuild import PROGRESS_FILTER, remote_build_script
from meshtui.hosts import HostFacts
from meshtui.inventory import HostSpec

GiB = 1024**3
H200 = {"name": "NVIDIA H200", "vendor": "nvidia", "memory_total": 141 * GiB, "memory_free": 140 * GiB}
M2 = {"name": "Apple M2 Pro GPU", "vendor": "apple", "memory_total": 24 * GiB, "memory_free": 20 * GiB, "unified": True}


def facts(**overrides: Any) -> HostFacts:
    base = HostFacts(hostname="h", os="Linux", arch="x86_64", python="3.11", glibc="2.36", cores=16,
                     mem_total=128 * GiB, mem_available=100 * GiB, gpus=(H200,), nvcc=True, cmake=True)
    return replace(base, **overrides)


@pytest.mark.parametrize(
    ("spec", "host_facts", "serves", "why"),
    [
        (HostSpec("g", "a"), facts(), True, ""),
        (HostSpec("g", "a", gpu=False), facts(), False, "gpu = false in the inventory"),
        (HostSpec("g", "a", runtime="push"), facts(), False, 'runtime = "push" (the pushed runtime is CPU-only)'),
        (HostSpec("g", "a"), facts(nvcc=False), False,
         "no nvcc on the host: install the CUDA toolkit so meshtui can build a CUDA runtime there"),
        (HostSpec("g", "a"), facts(cmake=False), False,
         "no cmake on the host: install cmake so meshtui can build a CUDA runtime there"),
        (HostSpec("g", "a"), facts(gpus=()), False, ""),
        (HostSpec("g", "a"), facts(gpus=(M2,), nvcc=False), True, ""),  # Metal needs no nvcc
        (HostSpec("g", "a"), facts(gpus=(M2,), cmake=False), False,
         "no cmake on the host: install cmake so meshtui can build a Metal runtime there"),
    ],
)
def test_which_hosts_serve_from_their_gpus(spec: HostSpec, host_facts: HostFacts, serves: bool, why: str) -> None:
    assert gpu_verdict(spec, host_facts) == GpuVerdict(serves, why)


def test_a_gpu_host_is_sized_by_its_gpus_free_memory() -> None:
    cap = host_capacity(ProbedHost(HostSpec("g", "a"), facts(gpus=(H200, {**H200, "memory_free": 10 * GiB}))))
    assert cap.usable_bytes == 140 * GiB + 10 * GiB - 2 * GPU_RESERVE_BYTES
    assert cap.device == "2x NVIDIA H200"


def test_max_memory_caps_a_gpu_host_and_a_cpu_host_is_sized_by_its_ram() -> None:
    gpu = host_capacity(ProbedHost(HostSpec("g", "a", max_memory=3 * GiB), facts()))
    assert (gpu.usable_bytes, gpu.device) == (3 * GiB, "NVIDIA H200")
    cpu = host_capacity(ProbedHost(HostSpec("g", "a", gpu=False), facts()))
    assert (cpu.usable_bytes, cpu.device) == (100 * GiB - HOST_RESERVE_BYTES, "cpu")


def _run_build_script(tmp_path: Any, path_dirs: str) -> subprocess.CompletedProcess[str]:
    """The host's build script up to configure, with fake `nvidia-smi`, `nvcc` and `cmake` on PATH."""
    (tmp_path / ".cache/meshtui/src").mkdir(parents=True)
    (tmp_path / "source").mkdir()
    tarball = tmp_path / ".cache/meshtui/src/k.tar.gz"
    subprocess.run(["tar", "czf", str(tarball), "-C", str(tmp_path), "source"], check=True)
    return subprocess.run(["sh", "-s"], input=remote_build_script("k", 2), capture_output=True, text=True,
                          env={"HOME": str(tmp_path), "PATH": path_dirs})


UNAME_DARWIN = "#!/bin/sh\necho Darwin\n"


@pytest.mark.parametrize(("tools", "backend", "flags"), [
    (("nvidia-smi", "nvcc"), "cuda", "-DGGML_CUDA=ON -DGGML_CUDA_FA=OFF -DCMAKE_CUDA_ARCHITECTURES=native"),
    (("uname",), "metal", "-DGGML_METAL=ON -DGGML_METAL_EMBED_LIBRARY=ON -DGGML_BLAS=OFF "
                          "-DCMAKE_BUILD_RPATH=@loader_path"),  # a stand-in uname that says Darwin
    (("nvcc",), "cpu", ""),  # a toolkit but no GPU: nothing to build CUDA for
    (("nvidia-smi",), "cpu", ""),  # a GPU but no compiler
])
def test_the_host_build_enables_cuda_only_with_a_gpu_and_nvcc(tmp_path: Any, tools: tuple[str, ...], backend: str,
                                                              flags: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        (bin_dir / tool).write_text(UNAME_DARWIN if tool == "uname" else "#!/bin/sh\nexit 0\n")
    # A cmake that records its arguments and fails configure, so the script stops there.
    (bin_dir / "cmake").write_text(f'#!/bin/sh\necho "$@" >{tmp_path}/cmake-args\nexit 1\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    result = _run_build_script(tmp_path, f"{bin_dir}:/usr/bin:/bin")
    assert result.returncode == 4
    assert f"meshtui-build: configuring ({backend})" in result.stdout
    args = (tmp_path / "cmake-args").read_text()
    assert ("-DGGML_CUDA=ON" in args) is (backend == "cuda")
    assert flags in args


def test_build_output_becomes_one_progress_line_per_percent() -> None:
    build_output = "[1/300] cc a\n[3/300] cc b\nwarning: x\n[150/300] cc c\n[ 50%] make d\n[ 51%] make e\n" \
                   "[x/3] odd\n[300/300] link\n"
    result = subprocess.run(["sh", "-c", PROGRESS_FILTER], input=build_output, capture_output=True, text=True,
                            check=True)
    assert result.stdout.splitlines() == [f"meshtui-build: compiling {p}%" for p in (0, 1, 50, 51, 100)]


def test_the_host_build_says_what_to_install_when_cmake_is_missing(tmp_path: Any) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "tar", "gzip", "mkdir", "rm", "cat"):
        (bin_dir / tool).symlink_to(shutil.which(tool) or f"/bin/{tool}")
    result = _run_build_script(tmp_path, str(bin_dir))
    assert result.returncode == 3
    assert result.stderr.strip() == (
        "cmake is not installed there: install cmake and a C++ compiler "
        "(Debian/Ubuntu: sudo apt install cmake g++; Fedora: sudo dnf install cmake gcc-c++)")
