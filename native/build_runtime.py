#!/usr/bin/env python3
"""Build the portable agent runtime: ggml + its RPC server, from llama-cpp-python's own sdist.

Why from the sdist: a stage must speak exactly the RPC protocol of the head's llama.cpp, and the head's
llama-cpp-python was built from that sdist's vendored llama.cpp. Only ggml is built (no llama), as loadable
backends (GGML_BACKEND_DL): one CPU backend per instruction-set level, picked on the host at run time by
ggml's own score function; no OpenMP; libstdc++ linked statically. Result, content-addressed:

    ~/.cache/meshtui/runtime-build/<key>/lib/   libggml-base.so.0 libggml.so.0 libggml-rpc.so
                                                libggml-cpu-<variant>.so ... meshtui-runtime.json

<key> hashes the sdist's sha256, meshtui's patches (native/patches/), the CMake arguments, the CPU variants,
this script's version, the wrapper CMakeLists and the compiler, so a build runs once and a changed input
builds anew. Concurrent runs wait for
each other (flock). The last line on stdout is the lib folder. Stdlib only; see native/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

SCRIPT_VERSION = "2"
DEFAULT_LLAMA_CPP_PYTHON = "0.3.36"
# sha256 of PyPI's sdist, checked after download: the source is pinned, not just named.
KNOWN_SDIST_SHA256 = {"0.3.36": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"}
# ggml's x86 CPU variants (ggml/src/CMakeLists.txt, GGML_CPU_ALL_VARIANTS) built by default. All 14 cost about
# 45 s of CPU each here; these 6 cover the x86-64 machines people have, each picked only where it runs:
#   x64 any x86-64 (SSE2) | sandybridge AVX | haswell AVX2 FMA F16C BMI2 | alderlake + AVX-VNNI
#   skylakex AVX-512 F/CD/VL/DQ/BW | icelake + AVX-512 VBMI/VNNI (also Zen 4)
DEFAULT_X86_VARIANTS = ("x64", "sandybridge", "haswell", "alderlake", "skylakex", "icelake")
JOBS = 2  # the build machines have 2 cores, shared with other work
LINK_FLAGS = " ".join((
    "-static-libstdc++",  # no libstdc++.so.6 on the host
    "-Wl,--exclude-libs,ALL",  # and the copy inside stays private to each library
    "-Wl,--gc-sections",  # drops libstdc++'s unused std::random_device, which needs glibc 2.36 (arc4random)
))
# Not -static-libgcc: libgcc_eh's unwinder calls _dl_find_object (glibc 2.35), while libgcc_s.so.1 is on every
# glibc system (glibc itself loads it for pthread_cancel). See native/README.md.
CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_BACKEND_DL=ON",
    "-DGGML_CPU_ALL_VARIANTS=ON",
    "-DGGML_NATIVE=OFF",
    "-DGGML_RPC=ON",
    "-DGGML_RPC_RDMA=OFF",  # else found libibverbs on the build machine becomes a host dependency
    "-DGGML_OPENMP=OFF",  # ggml's own thread pool: no libgomp.so.1 on the host
    "-DGGML_CCACHE=OFF",
    f"-DCMAKE_SHARED_LINKER_FLAGS={LINK_FLAGS}",
    f"-DCMAKE_MODULE_LINKER_FLAGS={LINK_FLAGS}",  # ggml's backends are MODULE libraries
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
    "-DCMAKE_INSTALL_RPATH=$ORIGIN",
)
# What a runtime library may need on the host. Anything else (libstdc++.so.6, libgomp.so.1) fails the build.
ALLOWED_NEEDED = frozenset({
    "libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1", "ld-linux-x86-64.so.2",
    "libgcc_s.so.1", "libggml-base.so.0", "libggml.so.0",
})
MANIFEST = "meshtui-runtime.json"
HERE = Path(__file__).resolve().parent
PATCHES = HERE / "patches"  # applied to vendor/llama.cpp/ggml of the sdist by every build (patch -p1)
# The symbol the Unix-socket patch adds to libggml-rpc: how the agent and the engine tell a patched build.
UNIX_SOCKET_SYMBOL = "ggml_backend_rpc_unix_socket_support"
# meshtui's weights-cache patch: tensors from 64 KiB offered by hash, cache entries verified before use.
VERIFIED_CACHE_SYMBOL = "ggml_backend_rpc_verified_cache_threshold"
# meshtui's repack patch: CPU servers keep quantized weights in the CPU backend's repacked layouts.
REPACK_SYMBOL = "ggml_backend_rpc_set_weight_repack"


class BuildError(RuntimeError):
    """The build cannot go on; the message says what to do."""


def log(message: str) -> None:
    print(f"build_runtime: {message}", file=sys.stderr, flush=True)


def private_dir(path: Path) -> None:
    """Create `path` and its missing parents with mode 0700, whatever the umask (only the user uses them)."""
    for folder in [*reversed(path.absolute().parents), path.absolute()]:
        try:
            folder.mkdir(mode=0o700)
            os.chmod(folder, 0o700)
        except FileExistsError:
            pass


def default_cache_root() -> Path:
    """Same rule as meshtui/runtime.py's portable_cache_root()."""
    if os.environ.get("MESHTUI_RUNTIME_BUILD_CACHE"):
        return Path(os.environ["MESHTUI_RUNTIME_BUILD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "meshtui" / "runtime-build"


def installed_llama_cpp_python() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run(argv: list[str], cwd: Path | None = None, log_file: Path | None = None) -> str:
    """Run a build step; on failure show the end of its output."""
    proc = subprocess.run(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          check=False)
    if log_file is not None:
        with open(log_file, "a") as f:
            f.write(f"$ {' '.join(argv)}\n{proc.stdout}\n")
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-25:])
        raise BuildError(f"`{' '.join(argv)}` failed ({proc.returncode}):\n{tail}")
    return proc.stdout


# ---------------------------------------------------------------- the source


def fetch_sdist(version: str, cache_root: Path, given: Path | None) -> Path:
    """The sdist of llama-cpp-python==version: given, cached, or fetched with pip."""
    if given is not None:
        path = given
    else:
        folder = cache_root / "sdist"
        path = folder / f"llama_cpp_python-{version}.tar.gz"
        if not path.exists():
            private_dir(folder)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                log(f"fetching the llama-cpp-python {version} sdist with pip")
                run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
                     "--no-binary", ":all:", "-d", tmp, f"llama-cpp-python=={version}"])
                found = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
                if not found:
                    raise BuildError(f"pip downloaded no llama_cpp_python sdist into {tmp}")
                os.replace(found[0], path)
    if not path.is_file():
        raise BuildError(f"no sdist at {path}")
    expected = KNOWN_SDIST_SHA256.get(version)
    actual = sha256_file(path)
    if expected and actual != expected:
        raise BuildError(f"{path} has sha256 {actual}, but llama-cpp-python {version}'s sdist is {expected}")
    return path


def extract_ggml(sdist: Path, into: Path) -> Path:
    """Extract only vendor/llama.cpp/ggml/ (plain files, no links, nothing outside `into`)."""
    marker = "/vendor/llama.cpp/ggml/"
    count = 0
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            index = member.name.find(marker)
            if index < 0 or not member.isfile():
                continue
            rel = Path(member.name[index + len("/vendor/llama.cpp/"):])
            if rel.is_absolute() or ".." in rel.parts:
                raise BuildError(f"unsafe path in {sdist}: {member.name}")
            target = into / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None  # a regular file
            with source, open(target, "wb") as out:
                shutil.copyfileobj(source, out)
            count += 1
    ggml = into / "ggml"
    if count == 0 or not (ggml / "CMakeLists.txt").exists():
        raise BuildError(f"{sdist} holds no vendor/llama.cpp/ggml/CMakeLists.txt")
    return ggml


def patch_files() -> list[Path]:
    return sorted(PATCHES.glob("*.patch"))


def patches_digest() -> str:
    """sha256 over meshtui's patches (names and contents): part of every cache key of a patched build."""
    digest = hashlib.sha256()
    for path in patch_files():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def apply_patches(ggml: Path) -> list[str]:
    """Apply native/patches/*.patch to an extracted ggml folder; returns their names. Fails on any reject."""
    if shutil.which("patch") is None:
        raise BuildError("`patch` is not on PATH (apt-get install patch)")
    names = []
    for path in patch_files():
        run(["patch", "-p1", "--forward", "--batch", "--quiet", "-d", str(ggml), "-i", str(path)])
        names.append(path.name)
    return names


def rpc_protocol(ggml: Path) -> list[int]:
    text = (ggml / "include" / "ggml-rpc.h").read_text()
    parts = [re.search(rf"#define\s+RPC_PROTO_{part}_VERSION\s+(\d+)", text) for part in ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        raise BuildError("cannot read RPC_PROTO_*_VERSION from ggml-rpc.h")
    return [int(m.group(1)) for m in parts if m]


# ---------------------------------------------------------------- building


def compiler_identity() -> str:
    lines = []
    for tool in (os.environ.get("CC", "cc"), os.environ.get("CXX", "c++")):
        try:
            out = subprocess.run([tool, "--version"], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError) as err:
            raise BuildError(f"no working compiler {tool!r}: {err} (apt-get install build-essential)") from err
        lines.append(out.splitlines()[0] if out else tool)
    return " | ".join(lines)


def build_key(sdist_sha256: str, variants: list[str], compiler: str) -> str:
    inputs = {
        "script_version": SCRIPT_VERSION,
        "sdist_sha256": sdist_sha256,
        "patches": patches_digest(),
        "cmake_args": list(CMAKE_ARGS),
        "variants": sorted(variants),
        "wrapper": hashlib.sha256((HERE / "CMakeLists.txt").read_bytes()).hexdigest(),
        "compiler": compiler,
        "arch": platform.machine(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def ninja_targets(build: Path, ninja: str) -> dict[str, str]:
    """{output: rule} for every ninja target of the build tree."""
    out = run([ninja, "-C", str(build), "-t", "targets", "all"])
    targets = {}
    for line in out.splitlines():
        name, _, rule = line.rpartition(": ")
        if name:
            targets[name.strip()] = rule.strip()
    return targets


def build_tree(ggml: Path, build: Path, variants: list[str] | None, ninja: str, jobs: int,
               log_file: Path) -> tuple[dict[str, Path], list[str]]:
    """Configure and build; return {name in the runtime: built file} and the CPU variants built."""
    run(["cmake", "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}", "-S", str(HERE), "-B", str(build),
         f"-DGGML_SOURCE_DIR={ggml}", *CMAKE_ARGS], log_file=log_file)
    targets = ninja_targets(build, ninja)
    available = sorted(t[len("ggml-cpu-"):] for t in targets
                       if t.startswith("ggml-cpu-") and not t.endswith("-feats") and "/" not in t)
    if not available:
        raise BuildError("ggml configured no CPU variants (GGML_CPU_ALL_VARIANTS unsupported on this arch?)")
    chosen = available if variants is None else variants
    missing = sorted(set(chosen) - set(available))
    if missing:
        raise BuildError(f"unknown CPU variants {missing}; this ggml has {available}")
    libggml = [t for t, rule in targets.items() if rule.startswith("CXX_SHARED_LIBRARY_LINKER__ggml_")]
    if len(libggml) != 1:
        raise BuildError(f"cannot find libggml's link target among {sorted(targets)[:20]}...")
    ninja_build = [ninja, "-C", str(build), f"-j{jobs}"]
    if set(chosen) == set(available):
        run([*ninja_build, "ggml", "ggml-rpc"], log_file=log_file)
    else:
        # CMake makes libggml wait for every CPU backend (add_dependencies), though it links none of them.
        # Build the chosen ones, libggml's own objects, then run libggml's own link command.
        query = run([ninja, "-C", str(build), "-t", "query", libggml[0]])
        objects = [line.strip() for line in query.splitlines() if line.strip().endswith(".o")
                   and not line.strip().startswith("|")]
        run([*ninja_build, "ggml-base", "ggml-rpc", *(f"ggml-cpu-{v}" for v in chosen), *objects], log_file=log_file)
        link = run([ninja, "-C", str(build), "-t", "commands", "-s", libggml[0]]).strip().splitlines()[-1]
        run(["sh", "-c", link], cwd=build, log_file=log_file)
    bin_dir = build / "bin"
    files = {
        "libggml-base.so.0": (bin_dir / "libggml-base.so.0").resolve(),
        "libggml.so.0": (build / libggml[0]).resolve(),
        "libggml-rpc.so": bin_dir / "libggml-rpc.so",
    }
    files.update({f"libggml-cpu-{v}.so": bin_dir / f"libggml-cpu-{v}.so" for v in chosen})
    for name, path in files.items():
        if not path.is_file():
            raise BuildError(f"the build made no {name} (expected {path})")
    return files, list(chosen)


# ---------------------------------------------------------------- checking


def _version_key(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def inspect_library(path: Path) -> dict[str, object]:
    """NEEDED entries and the newest GLIBC_/GCC_ symbol versions a library asks for (readelf, objdump)."""
    dynamic = run(["readelf", "-d", "-W", str(path)])
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)
    symbols = run(["objdump", "-T", "-w", str(path)])
    glibc = sorted(set(re.findall(r"\bGLIBC_(\d+\.\d+(?:\.\d+)?)\b", symbols)), key=_version_key)
    gcc = sorted(set(re.findall(r"\bGCC_(\d+\.\d+(?:\.\d+)?)\b", symbols)), key=_version_key)
    return {
        "needed": needed,
        "max_glibc": glibc[-1] if glibc else None,
        "max_gcc": gcc[-1] if gcc else None,
        "glibcxx": bool(re.search(r"\b(GLIBCXX|CXXABI)_", symbols)),
        "exports_backend": "ggml_backend_init" in symbols and "ggml_backend_score" in symbols,
        "unix_socket_patch": UNIX_SOCKET_SYMBOL in symbols,
        "verified_cache_patch": VERIFIED_CACHE_SYMBOL in symbols,
        "repack_patch": REPACK_SYMBOL in symbols,
    }


def check_libraries(libdir: Path) -> dict[str, dict[str, object]]:
    report = {p.name: inspect_library(p) for p in sorted(libdir.glob("*.so*"))}
    problems = []
    for name, info in report.items():
        bad = sorted(set(info["needed"]) - ALLOWED_NEEDED)  # type: ignore[arg-type]
        if bad:
            problems.append(f"{name} needs {', '.join(bad)}")
        if info["glibcxx"]:
            problems.append(f"{name} still asks for GLIBCXX/CXXABI symbol versions")
        if name.startswith("libggml-cpu-") and not info["exports_backend"]:
            problems.append(f"{name} lacks ggml_backend_init/ggml_backend_score")
        if name.startswith("libggml-rpc") and not info["unix_socket_patch"]:
            problems.append(f"{name} lacks {UNIX_SOCKET_SYMBOL} (native/patches/ was not applied)")
        if name.startswith("libggml-rpc") and not info["verified_cache_patch"]:
            problems.append(f"{name} lacks {VERIFIED_CACHE_SYMBOL} (native/patches/ was not applied)")
        if name.startswith("libggml-rpc") and not info["repack_patch"]:
            problems.append(f"{name} lacks {REPACK_SYMBOL} (native/patches/ was not applied)")
    if problems:
        raise BuildError("the runtime is not portable: " + "; ".join(problems))
    return report


# ---------------------------------------------------------------- the whole


def build(version: str, sdist_arg: Path | None, variants: list[str] | None, cache_root: Path, jobs: int,
          force: bool = False, keep_build: bool = False) -> Path:
    """Build (or find in the cache) the runtime; `variants` None means all of ggml's; returns the lib folder."""
    if platform.system() != "Linux":
        raise BuildError(f"the portable runtime is built on Linux only, not {platform.system()}")
    for tool in ("cmake", "readelf", "objdump"):
        if shutil.which(tool) is None:
            raise BuildError(f"`{tool}` is not on PATH (apt-get install cmake binutils)")
    ninja = shutil.which("ninja") or shutil.which("ninja", path=str(Path(sys.executable).parent))
    if ninja is None:
        raise BuildError("`ninja` is not on PATH (apt-get install ninja-build, or pip install ninja)")
    private_dir(cache_root)
    started = time.monotonic()
    sdist = fetch_sdist(version, cache_root, sdist_arg)
    sdist_sha256 = sha256_file(sdist)
    key = build_key(sdist_sha256, variants or ["all"], compiler_identity())
    final = cache_root / key
    with open(cache_root / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent build of the same key finishes first; then we reuse it
        if (final / "lib" / MANIFEST).exists() and not force:
            log(f"already built: {final / 'lib'}")
            _write_pointer(cache_root, version, key)
            return final / "lib"
        work = Path(tempfile.mkdtemp(prefix=f"{key}.work-", dir=cache_root))
        try:
            log_file = work / "build.log"
            ggml = extract_ggml(sdist, work / "src")
            patches = apply_patches(ggml)
            protocol = rpc_protocol(ggml)
            log(f"building ggml (RPC protocol {'.'.join(map(str, protocol))}) for llama-cpp-python {version}, "
                f"CPU variants {', '.join(variants) if variants else 'all'}, -j{jobs}; log: {log_file}")
            t_build = time.monotonic()
            files, built_variants = build_tree(ggml, work / "build", variants, ninja, jobs, log_file)
            build_seconds = time.monotonic() - t_build
            staging = work / "out"
            private_dir(staging / "lib")
            for name, path in files.items():
                shutil.copy2(path, staging / "lib" / name)
                os.chmod(staging / "lib" / name, 0o755)
            report = check_libraries(staging / "lib")
            glibc = sorted({str(i["max_glibc"]) for i in report.values() if i["max_glibc"]}, key=_version_key)
            manifest = {
                "format": 1,
                "kind": "portable",
                "layout": "ggml-backend-dl",
                "llama_cpp_python": version,
                "sdist_sha256": sdist_sha256,
                "rpc_protocol": protocol,
                "patches": patches,
                "rpc_unix_socket": True,
                "rpc_verified_cache": True,
                "rpc_weight_repack": True,
                "arch": platform.machine(),
                "min_glibc": glibc[-1] if glibc else None,
                "core_libs": ["libggml-base.so.0", "libggml.so.0"],
                "rpc_lib": "libggml-rpc.so",
                "cpu_variants": built_variants,
                "key": key,
            }
            (staging / "lib" / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
            details = {
                **manifest,
                "cmake_args": list(CMAKE_ARGS),
                "compiler": compiler_identity(),
                "jobs": jobs,
                "build_seconds": round(build_seconds, 1),
                "total_seconds": round(time.monotonic() - started, 1),
                "libraries": report,
            }
            (staging / "build.json").write_text(json.dumps(details, indent=1) + "\n")
            shutil.copy2(log_file, staging / "build.log")
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        finally:
            if keep_build:
                log(f"build tree kept: {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
        _write_pointer(cache_root, version, key)
    log(f"built in {time.monotonic() - started:.0f} s (compile {build_seconds:.0f} s); needs glibc >= "
        f"{manifest['min_glibc']}; {final / 'lib'}")
    return final / "lib"


def pointer_name(version: str) -> str:
    """Same rule as meshtui/runtime.py's portable_pointer_name(): builds without the patches never share it."""
    return f"llama-cpp-python-{version}-weights-cache.json"


def _write_pointer(cache_root: Path, version: str, key: str) -> None:
    """meshtui/runtime.py finds the build for its llama-cpp-python version through this file."""
    pointer = cache_root / pointer_name(version)
    tmp = pointer.with_name(pointer.name + f".{os.getpid()}")
    tmp.write_text(json.dumps({"key": key}) + "\n")
    os.replace(tmp, pointer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-cpp-python", metavar="VERSION",
                        help="whose sdist to build (default: the installed one, else %(default)s)")
    parser.add_argument("--sdist", type=Path, help="use this sdist file instead of fetching it with pip")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated CPU variants, or 'all' (default: {','.join(DEFAULT_X86_VARIANTS)})")
    parser.add_argument("--jobs", type=int, default=JOBS, help="parallel compile jobs (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="cache folder (default: $MESHTUI_RUNTIME_BUILD_CACHE or ~/.cache/meshtui/runtime-build)")
    parser.add_argument("--force", action="store_true", help="build again even if the cache has this key")
    parser.add_argument("--keep-build", action="store_true", help="keep the source and build tree (debugging)")
    args = parser.parse_args(argv)
    version = args.llama_cpp_python or installed_llama_cpp_python() or DEFAULT_LLAMA_CPP_PYTHON
    variants: list[str] | None
    if args.variants == "all" or (args.variants is None and platform.machine() != "x86_64"):
        variants = None  # every variant ggml defines for this architecture
    elif args.variants is None:
        variants = list(DEFAULT_X86_VARIANTS)
    else:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:
        libdir = build(version, args.sdist, variants, args.cache or default_cache_root(), max(1, args.jobs),
                       force=args.force, keep_build=args.keep_build)
    except BuildError as err:
        log(f"error: {err}")
        return 1
    print(libdir)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
