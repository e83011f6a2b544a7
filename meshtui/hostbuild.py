"""Build the agent runtime on a host, from the same pinned ggml source the head's llama.cpp was built from.

For hosts that cannot load the pushed runtime (another glibc, another OS) or that ask for it
(`runtime = "build"`). The head pushes one source tarball (ggml of llama-cpp-python's sdist with meshtui's
patches applied on the head, plus native/CMakeLists.txt), the host configures it for its own CPU (GGML_NATIVE,
and CUDA when `nvcc` is there) and builds the four libraries the agent loads. Results are cached on the host by
the source's hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import tarfile
import tempfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import asyncssh

from meshtui.errors import HostError, MeshError
from meshtui.hosts import inspect_runtime
from meshtui.integrity import built_runtime_record, make_private_dir, make_private_dir_remote, runtime_problems
from meshtui.inventory import HostSpec
from meshtui.remoteio import MAX_STDERR_CHARS, read_lines, read_tail
from meshtui.runtime import AGENT_FILE, REMOTE_ROOT, agent_source_path, head_cache_dir, load_file_module
from meshtui.text import one_line

NATIVE = Path(__file__).resolve().parent.parent / "native"
BUILD_TIMEOUT = 1800.0


def _native_builder() -> ModuleType:
    path = NATIVE / "build_runtime.py"
    if not path.exists():
        raise MeshError("building on a host needs native/build_runtime.py (a meshtui checkout, not a wheel)")
    return load_file_module(path, "meshtui_native_build")


@lru_cache(maxsize=1)
def source_tarball() -> tuple[Path, str]:
    """(tarball, digest): patched ggml from the pinned sdist, the CMake wrapper and the agent, cached on the head.

    The patches (native/patches/: Unix-socket RPC endpoints) are applied here, so the host needs no `patch`.
    """
    given = os.environ.get("MESHTUI_HOST_SOURCE")
    if given:  # a tarball made earlier by this function, for a head that cannot download the sdist
        path = Path(given)
        if not path.is_file():
            raise OSError(f"MESHTUI_HOST_SOURCE={given}: no such file")
        return path, _native_builder().sha256_file(path)[:16]
    native = _native_builder()
    cache_root = native.default_cache_root()
    version = native.installed_llama_cpp_python() or "0.3.36"
    sdist = native.fetch_sdist(version, cache_root, None)
    digest = hashlib.sha256()
    digest.update(native.sha256_file(sdist).encode())
    digest.update(native.patches_digest().encode())
    digest.update((NATIVE / "CMakeLists.txt").read_bytes())
    digest.update(agent_source_path().read_bytes())
    key = digest.hexdigest()[:16]
    tarball = cache_root / f"host-source-{key}.tar.gz"
    if not tarball.exists():
        make_private_dir(cache_root)
        with tempfile.TemporaryDirectory(dir=cache_root) as tmp:
            ggml = native.extract_ggml(sdist, Path(tmp))
            native.apply_patches(ggml)
            staging = Path(tmp) / "out.tar.gz"
            with tarfile.open(staging, "w:gz") as tar:
                tar.add(ggml, arcname="ggml")
                tar.add(NATIVE / "CMakeLists.txt", arcname="CMakeLists.txt")
                tar.add(agent_source_path(), arcname=AGENT_FILE)
            staging.replace(tarball)
    return tarball, key


@lru_cache(maxsize=1)
def source_agent_sha256() -> str:
    """The sha256 of the agent in the source tarball: the one a runtime built on a host runs."""
    tarball, _key = source_tarball()
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            member = tar.extractfile(AGENT_FILE)
            if member is None:
                raise KeyError(AGENT_FILE)
            return hashlib.sha256(member.read()).hexdigest()
    except (OSError, KeyError, tarfile.TarError) as err:
        raise MeshError(f"{tarball}: cannot read {AGENT_FILE} from it ({one_line(err)})") from err


# Ninja's "[12/345]" and make's "[ 12%]" become one "compiling 3%" line per percent (a shell loop, not awk:
# mawk reads a pipe in large blocks, which would hold every line back until the build ends).
PROGRESS_FILTER = (
    'last=""; while IFS= read -r line; do case "$line" in '
    '"["*"/"*"]"*) f=${line#?}; f=${f%%]*}; n=${f%/*}; d=${f#*/} ;; '
    '"["*"%]"*) f=${line#?}; f=${f%%%]*}; n=${f##* }; d=100 ;; *) continue ;; esac; '
    'case "$n$d" in ""|*[!0-9]*) continue ;; esac; [ "$d" -gt 0 ] || continue; p=$((100 * n / d)); '
    '[ "$p" = "$last" ] || { echo "meshtui-build: compiling $p%"; last=$p; }; done'
)


def remote_build_script(key: str, jobs: int | None) -> str:
    """The shell the host runs: configure for its own CPU and GPU, build, install atomically.

    GPU backends are compiled only where there is a GPU to use, not merely a toolkit: Metal on macOS, CUDA when
    `nvidia-smi -L` lists one and `nvcc` is installed (for that GPU's architecture only, and without the
    flash-attention kernels, which the head never asks for), Vulkan when a Vulkan loader and `glslc` are there.
    Progress lines (`meshtui-build: ...`) go to stdout; the tail of a failing log goes to stderr.
    """
    final = f'"$HOME"/{REMOTE_ROOT}/build-{key}'
    work = f'"$HOME"/.cache/meshtui/build/{key}'
    source = f'"$HOME"/.cache/meshtui/src/{key}.tar.gz'
    # Every core by default: `threads` in the inventory is for serving layers, not for the compiler.
    make_jobs = f"-j {int(jobs)}" if jobs else '-j "$(nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2)"'
    lines = [
        "set -e",
        "umask 077",  # every folder and file the build makes is the user's alone
        f"if [ -f {final}/.complete ]; then echo 'meshtui-build: cached'; exit 0; fi",
        "command -v cmake >/dev/null 2>&1 || { echo 'cmake is not installed there: install cmake and a C++ compiler "
        "(Debian/Ubuntu: sudo apt install cmake g++; Fedora: sudo dnf install cmake gcc-c++)' >&2; exit 3; }",
        "{ command -v c++ || command -v g++ || command -v clang++; } >/dev/null 2>&1 || { echo 'no C++ compiler "
        "there: install one (Debian/Ubuntu: sudo apt install g++; Fedora: sudo dnf install gcc-c++)' >&2; exit 3; }",
        'backends=cpu; gpu_flags=""',
        # macOS: Metal, its shaders embedded; libraries find each other next to themselves (@loader_path).
        'if [ "$(uname -s)" = Darwin ]; then',
        "  backends=metal; gpu_flags='-DGGML_METAL=ON -DGGML_METAL_EMBED_LIBRARY=ON -DGGML_BLAS=OFF "
        "-DCMAKE_BUILD_RPATH=@loader_path'",
        "elif nvidia-smi -L >/dev/null 2>&1 && command -v nvcc >/dev/null 2>&1; then",
        "  backends=cuda; gpu_flags='-DGGML_CUDA=ON -DGGML_CUDA_FA=OFF -DCMAKE_CUDA_ARCHITECTURES=native'",
        "elif command -v glslc >/dev/null 2>&1 && { ldconfig -p 2>/dev/null | grep -q libvulkan; }; then",
        "  backends=vulkan; gpu_flags='-DGGML_VULKAN=ON'",
        "fi",
        'generator=""; if command -v ninja >/dev/null 2>&1; then generator="-G Ninja"; fi',
        f"rm -rf {work} && mkdir -p {work} && tar xzf {source} -C {work}",
        'echo "meshtui-build: configuring ($backends)"',
        f"cmake $generator -S {work} -B {work}/b -DGGML_SOURCE_DIR={work}/ggml -DCMAKE_BUILD_TYPE=Release "
        "-DBUILD_SHARED_LIBS=ON -DGGML_RPC=ON -DGGML_RPC_RDMA=OFF -DGGML_NATIVE=ON -DGGML_BACKEND_DL=OFF "
        f"-DGGML_CCACHE=OFF $gpu_flags >{work}/configure.log 2>&1 "
        f"|| {{ tail -5 {work}/configure.log >&2; exit 4; }}",
        'echo "meshtui-build: compiling ($backends)"',
        f"{{ cmake --build {work}/b {make_jobs} --target ggml ggml-rpc 2>&1; echo $? >{work}/build.rc; }} "
        f"| tee {work}/build.log | {{ {PROGRESS_FILTER}; }}",
        f'[ "$(cat {work}/build.rc)" = 0 ] || {{ tail -5 {work}/build.log >&2; exit 5; }}',
        f"rm -rf {final}.partial && mkdir -p {final}.partial/lib",
        "for lib in libggml-base libggml-cpu libggml-rpc libggml libggml-cuda libggml-vulkan libggml-metal; do "
        f"if [ -f {work}/b/bin/$lib.so ]; then cp -L {work}/b/bin/$lib.so {final}.partial/lib/$lib.so.0; "
        f"elif [ -f {work}/b/bin/$lib.dylib ]; then cp -L {work}/b/bin/$lib.dylib {final}.partial/lib/$lib.0.dylib; "
        "fi; done",
        "if [ $backends = cpu ]; then list='\"cpu\"'; else list=\"\\\"cpu\\\", \\\"$backends\\\"\"; fi",
        f"echo \"{{\\\"backends\\\": [$list]}}\" >{final}.partial/meshtui-build.json",
        f"cp {work}/{AGENT_FILE} {final}.partial/ && touch {final}.partial/.complete",
        f"rm -rf {final} && mv {final}.partial {final} && rm -rf {work}",
        'echo "meshtui-build: done ($backends)"',
    ]
    return "\n".join(lines) + "\n"


def record_path(conn: asyncssh.SSHClientConnection, host: HostSpec, folder: str) -> Path:
    """Where the head keeps the digests of ~/`folder` on this host: by its host key and user, not its name."""
    server_key = conn.get_server_host_key()
    who = server_key.get_fingerprint("sha256") if server_key is not None else f"name:{host.name}"
    user = conn.get_extra_info("username") or ""
    ident = hashlib.sha256(f"{who}\0{user}\0{folder}".encode()).hexdigest()[:24]
    return head_cache_dir() / "host-builds" / f"{ident}.json"


def recorded_digests(conn: asyncssh.SSHClientConnection, host: HostSpec, folder: str) -> dict[str, str] | None:
    """What the head recorded of the runtime it had built at ~/`folder` on this host; None: no record."""
    path = record_path(conn, host, folder)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise MeshError(f"{path}: cannot read the record of the runtime built on {host.name} ({one_line(err)}); "
                        "remove the file to record it again") from err
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise MeshError(f"{path}: not a record of a runtime built on {host.name}; remove the file to record it again")
    return {str(k): v for k, v in files.items()}


def _save_record(conn: asyncssh.SSHClientConnection, path: Path, host: HostSpec, folder: str,
                 files: dict[str, str]) -> None:
    make_private_dir(path.parent)
    staging = path.with_suffix(".partial")
    server_key = conn.get_server_host_key()
    record = {"host": host.name, "host_key": server_key.get_fingerprint("sha256") if server_key else None,
              "folder": folder, "files": files}
    staging.write_text(json.dumps(record, indent=1) + "\n")
    os.chmod(staging, 0o600)
    staging.replace(path)


async def _compile(conn: asyncssh.SSHClientConnection, host: HostSpec, tarball: Path, key: str,
                   on_progress: Callable[[str], None]) -> bool:
    """Push the source (once) and build on the host (once per source); True when the build was there already."""
    cached = False
    try:
        async with conn.start_sftp_client() as sftp:
            remote_source = f".cache/meshtui/src/{key}.tar.gz"
            await make_private_dir_remote(sftp, ".cache/meshtui/src")
            if not await sftp.exists(remote_source):
                on_progress(f"pushing the source ({tarball.stat().st_size} bytes)")
                await sftp.put(str(tarball), remote_source + ".partial")
                with contextlib.suppress(asyncssh.SFTPError):
                    await sftp.remove(remote_source)
                await sftp.rename(remote_source + ".partial", remote_source)
        process = await conn.create_process("sh -s", encoding="utf-8", errors="replace")
        process.stdin.write(remote_build_script(key, None))
        process.stdin.write_eof()

        async def progress() -> None:
            nonlocal cached
            async for line in read_lines(process.stdout):
                if line.startswith("meshtui-build: "):
                    step = one_line(line.removeprefix("meshtui-build: "), 120)
                    cached = cached or step == "cached"
                    on_progress(step)

        try:
            _, stderr = await asyncio.wait_for(
                asyncio.gather(progress(), read_tail(process.stderr, MAX_STDERR_CHARS)), BUILD_TIMEOUT)
            result = await asyncio.wait_for(process.wait(check=False), BUILD_TIMEOUT)
        finally:
            process.close()
    except (OSError, asyncssh.Error) as err:
        raise HostError(f"building the runtime on the host failed: {one_line(err)}", host=host.name) from err
    except asyncio.TimeoutError as err:
        raise HostError(f"building the runtime on the host took more than {BUILD_TIMEOUT:.0f}s",
                        host=host.name) from err
    if result.exit_status != 0:
        detail = one_line(stderr, 10**6)[-300:] or f"exit status {result.exit_status}"
        raise HostError(f"building the runtime on the host failed: {detail}", host=host.name)
    return cached


async def _remove_build(conn: asyncssh.SSHClientConnection, host: HostSpec, folder: str) -> None:
    try:
        async with conn.start_sftp_client() as sftp:
            stale = f"{folder}.stale-{secrets.token_hex(4)}"
            await sftp.rename(folder, stale)
            await sftp.rmtree(stale)
    except (OSError, asyncssh.Error) as err:
        raise HostError(f"cannot remove the changed runtime ~/{folder}: {one_line(err)}", host=host.name) from err


async def build_on_host(
    conn: asyncssh.SSHClientConnection,
    host: HostSpec,
    on_progress: Callable[[str], None] = lambda step: None,
    on_log: Callable[[str, str], None] = lambda line, level: None,
) -> str:
    """Build the runtime on the host (once per source) and vouch for it; returns its folder under ~.

    The head records the digests of what it built, and checks a build it finds there against that record: a
    changed file means the build is removed and made again. A build this head has no record of (made by another
    head, or before the record was kept) is recorded the first time it is met, after the usual owner and mode
    checks, like a new host key under StrictHostKeyChecking=accept-new.
    """
    try:
        tarball, key = source_tarball()
    except (OSError, ValueError, RuntimeError) as err:
        raise HostError(f"cannot prepare the runtime source to build on the host: {err}", host=host.name) from err
    folder = f"{REMOTE_ROOT}/build-{key}"
    record = record_path(conn, host, folder)
    for attempt in range(2):
        cached = await _compile(conn, host, tarball, key, on_progress)
        report = await inspect_runtime(conn, host, folder)
        recorded = recorded_digests(conn, host, folder) if cached else None
        problems = runtime_problems(report, recorded, source_agent_sha256(), AGENT_FILE)
        if not problems:
            if recorded is None:
                _save_record(conn, record, host, folder, built_runtime_record(report))
                on_log(f"runtime ~/{folder} {'found there, not built by this head' if cached else 'built'}: "
                       f"its digests are recorded in {record}", "warning" if cached else "info")
            return folder
        if problems[0].above or attempt:  # a folder above it, or a fresh build that fails the check
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise HostError(f"refusing to run the agent from ~/{folder}: {problems[0]}{more}", host=host.name)
        on_log(f"the runtime built on the host was changed ({problems[0]}); building it again", "warning")
        await _remove_build(conn, host, folder)
    raise AssertionError("unreachable")
