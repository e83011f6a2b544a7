#!/usr/bin/env python3
"""meshtui stage agent: runs on each host, started over SSH by the head.

Stdlib only, Python 3.8+. Commands:

  probe                      print one JSON object describing this host (memory, cores, arch, OS, glibc, GPUs)
  serve --runtime DIR ...    load the ggml runtime from DIR/lib and serve layers with ggml's RPC server on a
                             Unix socket in a fresh 0700 folder (no TCP port: only this user, and through
                             SSH the head, can connect); exit as soon as stdin (the SSH channel) closes.
                             Weight tensors are kept by content hash in a 0700 cache shared by every model,
                             at most --cache-limit bytes (least recently used out), verified on every use
                             DIR/lib holds either the head's llama-cpp-python ggml libraries or the portable
                             build of native/build_runtime.py, whose best CPU variant for this host is loaded
  put --runtime DIR --cache C  take weight tensors the head streams on stdin into the cache C: first the offers
                             (one JSON line), answered by the ones C lacks; then each of those as a 16-byte header
                             (hash, size; little-endian) and its bytes, hashed and written atomically
  down                       stop agents of this user left over from earlier runs, print what was stopped
  inspect DIR                print owner, mode and sha256 of everything in DIR (and of the folders above it,
                             from $HOME): the head checks a runtime this way before it runs it

Protocol with the head: one JSON object per line on stdout. Everything native code prints goes to stderr.
"""

import argparse
import ctypes
import hashlib
import json
import os
import platform
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

AGENT_VERSION = "1"
# The head's llama-cpp-python libraries; the order matters: each one's dependencies are loaded before it.
RUNTIME_LIBS = ("libggml-base.so.0", "libggml-cpu.so.0", "libggml-rpc.so.0", "libggml.so.0")
# GPU backends a runtime built on the host may hold (linked into libggml.so.0, so loaded just before it).
GPU_BACKEND_LIBS = ("libggml-cuda.so.0", "libggml-vulkan.so.0", "libggml-metal.so.0")
BUILD_INFO = "meshtui-build.json"  # written by a build on the host: which backends it compiled
# The portable build (native/build_runtime.py), recognised by its manifest.
PORTABLE_MANIFEST = "meshtui-runtime.json"
PORTABLE_CORE_LIBS = ("libggml-base.so.0", "libggml.so.0")
PORTABLE_RPC_LIB = "libggml-rpc.so"
GGML_BACKEND_DEVICE_TYPE_CPU = 0
GGML_BACKEND_DEVICE_TYPE_GPU = 1
GGML_BACKEND_DEVICE_TYPE_IGPU = 2  # an integrated GPU (Vulkan on a laptop); served like a GPU
# A stage listens on a Unix socket in a fresh 0700 folder, never on TCP, and this is never configurable: only
# this user (and, through a direct-streamlocal SSH channel, the head) can connect. ggml learns Unix sockets
# from meshtui's patch (native/patches/), which exports this symbol; a runtime without it is refused.
UNIX_SOCKET_SYMBOL = "ggml_backend_rpc_unix_socket_support"
# meshtui's weights-cache patch: weight tensors from a threshold (64 KiB) are offered by content hash, and the
# server checks each cache entry against its hash before using it. A runtime without it serves with no cache.
VERIFIED_CACHE_SYMBOL = "ggml_backend_rpc_verified_cache_threshold"
# meshtui's repack patch: a CPU server keeps quantized weights in the CPU backend's repacked layouts, as llama.cpp
# does in one process (native/patches/ggml-rpc-weights-repack.patch); absent from runtimes built before it.
REPACK_SYMBOL = "ggml_backend_rpc_set_weight_repack"
REPACKED_COUNT_SYMBOL = "ggml_backend_rpc_repacked_weights"
CONTENT_HASH_SYMBOL = "ggml_backend_rpc_content_hash"  # the hash entries are named by (same patch)
CACHE_LIMIT = 16 * 1024 ** 3  # bytes of cached tensors kept per host (all models share them); LRU out beyond
CACHE_TRIM_SECONDS = 2.0  # how often a serving agent trims its cache back under the limit
CACHE_TEMP_AGE = 3600.0  # a ".tmp-" file older than this is a write that never finished: removed
SOCKET_NAME = "stage.sock"
MAX_SOCKET_PATH = 103  # bytes: sockaddr_un.sun_path is 108 on Linux, 104 on macOS, with its NUL
# Codes of the "error" event, for the head to act on (meshtui.hosts.AGENT_ERROR_CODES; a test checks they match).
CANNOT_LOAD = "cannot_load"  # the runtime's libraries do not load here: the head builds one on the host
RUNTIME_ERROR = "runtime_error"  # any other problem with the runtime (wrong arch, glibc, manifest, files)
NO_DEVICE = "no_device"
NOT_LISTENING = "not_listening"


def state_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "meshtui")


def run_dir():
    return os.path.join(state_dir(), "run")


def private_dir(path):
    """Create `path` and its missing parents with mode 0700 whatever the umask; tighten meshtui's own."""
    path = os.path.abspath(path)
    ours = state_dir()
    parts = []
    head = path
    while head and head != os.path.dirname(head):
        parts.append(head)
        head = os.path.dirname(head)
    for folder in reversed(parts):
        try:
            os.mkdir(folder, 0o700)
            os.chmod(folder, 0o700)
        except FileExistsError:
            if folder == ours or folder.startswith(ours + os.sep):
                try:
                    os.chmod(folder, 0o700)
                except OSError:  # not ours to change: the head's check reports it
                    pass
    return path


# ---------------------------------------------------------------- probe


def read_meminfo():
    info = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    info[key] = int(parts[0]) * 1024
    except OSError:
        pass
    if "MemTotal" not in info and sys.platform == "darwin":
        try:
            info["MemTotal"] = int(subprocess.check_output(["sysctl", "-n", "hw.memsize"]).strip())
            info["MemAvailable"] = darwin_available(subprocess.check_output(["vm_stat"]).decode())
        except (OSError, subprocess.CalledProcessError, ValueError):
            pass
    return info


def darwin_available(vm_stat):
    """Bytes free for new work on macOS: free, inactive and speculative pages of `vm_stat`'s report."""
    page = 4096
    pages = {}
    for line in vm_stat.splitlines():
        if "page size of" in line:
            page = int(line.split("page size of")[1].split()[0])
            continue
        key, _, value = line.partition(":")
        value = value.strip().rstrip(".")
        if value.isdigit():
            pages[key.strip()] = int(value)
    return page * sum(pages.get(k, 0) for k in ("Pages free", "Pages inactive", "Pages speculative"))


def apple_gpus(mem_total, mem_available):
    """Apple silicon's GPU shares the machine's memory; Metal lets one process use about three quarters."""
    if sys.platform != "darwin" or platform.machine() != "arm64":
        return []
    usable = min(mem_available, mem_total * 3 // 4)
    return [{"name": "%s GPU" % (darwin_chip() or "Apple"), "vendor": "apple", "memory_total": mem_total * 3 // 4,
             "memory_free": usable, "unified": True}]


def darwin_chip():
    try:
        return subprocess.check_output(["sysctl", "-n", "machdep.cpu.brand_string"]).decode().strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def glibc_version():
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36"
    except (ValueError, OSError, AttributeError):
        return None
    if text and text.startswith("glibc "):
        return text.split()[1]
    return None


def nvidia_gpus():
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,memory.free", "--format=csv,noheader,nounits"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=10, check=True,
        ).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            try:
                gpus.append({"name": parts[0], "vendor": "nvidia",
                             "memory_total": int(parts[1]) * 1024 * 1024,
                             "memory_free": int(parts[2]) * 1024 * 1024})
            except ValueError:
                continue
    return gpus


def memory_bandwidth(size=32 * 1024 * 1024, rounds=3):
    """Bytes per second one core copies: decoding on a CPU is bound by it, so it predicts token time."""
    try:
        src = bytearray(b"\x01") * size
        dst = bytearray(size)
        dst[:] = src  # fault the pages in first
        best = 0.0
        for _ in range(rounds):
            start = time.perf_counter()
            dst[:] = src
            elapsed = time.perf_counter() - start
            if elapsed > 0:
                best = max(best, size / elapsed)
        return int(best)
    except MemoryError:
        return None


def probe():
    mem = read_meminfo()
    return {
        "agent_version": AGENT_VERSION,
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "os": platform.system(),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "glibc": glibc_version(),
        "cores": os.cpu_count() or 1,
        "mem_total": mem.get("MemTotal", 0),
        "mem_available": mem.get("MemAvailable", mem.get("MemFree", 0)),
        "gpus": nvidia_gpus() or apple_gpus(mem.get("MemTotal", 0), mem.get("MemAvailable", 0)),
        "mem_bandwidth": memory_bandwidth(),
        "nvcc": on_path("nvcc"),
        "cmake": on_path("cmake"),
    }


def on_path(program):
    return any(os.access(os.path.join(d, program), os.X_OK)
               for d in os.environ.get("PATH", "").split(os.pathsep) if d)


# ---------------------------------------------------------------- serve


class Runtime:
    """The ggml libraries, loaded from one folder.

    Two layouts. The head's own llama-cpp-python libraries (RUNTIME_LIBS, one CPU backend built for the head's
    CPU). Or the portable build of native/build_runtime.py, marked by PORTABLE_MANIFEST: ggml with loadable
    backends, where this host's CPU picks the best of several CPU backend variants.
    """

    def __init__(self, libdir):
        self.kind = "head-build"
        self.cpu_variant = None
        self.backends = ["cpu"]
        manifest = read_manifest(libdir)
        if os.path.exists(os.path.join(os.path.dirname(libdir), BUILD_INFO)):
            self.kind = "host-build"
        if manifest is not None:
            self.kind = "portable"
            ggml, rpc = self._load_portable(libdir, manifest)
        else:
            ggml, rpc = self._load_head_build(libdir)
        ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
        ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
        ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        ggml.ggml_backend_dev_type.restype = ctypes.c_int
        ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_dev_name.restype = ctypes.c_char_p
        ggml.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_dev_description.restype = ctypes.c_char_p
        ggml.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_dev_memory.restype = None
        ggml.ggml_backend_dev_memory.argtypes = [
            ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
        if not hasattr(rpc, UNIX_SOCKET_SYMBOL):
            raise RuntimeError("the ggml runtime in %s lacks meshtui's Unix-socket patch (no %s): it was built "
                               "from an unpatched source; rebuild it with scripts/setup or native/build_runtime.py"
                               % (libdir, UNIX_SOCKET_SYMBOL))
        self.cache_threshold = None  # bytes from which tensors are cached by hash; None: no verified cache
        if hasattr(rpc, VERIFIED_CACHE_SYMBOL):
            getattr(rpc, VERIFIED_CACHE_SYMBOL).restype = ctypes.c_size_t
            self.cache_threshold = int(getattr(rpc, VERIFIED_CACHE_SYMBOL)())
        self.repack = hasattr(rpc, REPACK_SYMBOL) and hasattr(rpc, REPACKED_COUNT_SYMBOL)
        if self.repack:
            getattr(rpc, REPACK_SYMBOL).restype = None
            getattr(rpc, REPACK_SYMBOL).argtypes = [ctypes.c_int]
            getattr(rpc, REPACKED_COUNT_SYMBOL).restype = ctypes.c_uint64
        rpc.ggml_backend_rpc_start_server.restype = None
        rpc.ggml_backend_rpc_start_server.argtypes = [
            ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)]
        self.ggml = ggml
        self.rpc = rpc

    def _load_head_build(self, libdir):
        # The order matters: each library's dependencies are loaded before it, by full path.
        libs = {}
        gpu_libs = [n for n in GPU_BACKEND_LIBS if os.path.exists(os.path.join(libdir, platform_lib(n)))]
        for name in RUNTIME_LIBS[:-1] + tuple(gpu_libs) + RUNTIME_LIBS[-1:]:
            libs[name] = load_library(libdir, platform_lib(name), ctypes.RTLD_GLOBAL)
        self.backends = ["cpu"] + [n[len("libggml-"):-len(".so.0")] for n in gpu_libs]
        return libs["libggml.so.0"], libs["libggml-rpc.so.0"]

    def _load_portable(self, libdir, manifest):
        arch = manifest.get("arch")
        if arch and arch != platform.machine():
            raise RuntimeError("this runtime is built for %s, the host is %s" % (arch, platform.machine()))
        needed, have = manifest.get("min_glibc"), glibc_version()
        if needed and have and version_tuple(have) < version_tuple(needed):
            raise RuntimeError("this runtime needs glibc >= %s, the host has %s" % (needed, have))
        ggml = None
        for name in manifest.get("core_libs") or PORTABLE_CORE_LIBS:
            ggml = load_library(libdir, name, ctypes.RTLD_GLOBAL)  # libggml-base, then libggml
        ggml.ggml_backend_load.restype = ctypes.c_void_p
        ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
        variant, path = pick_cpu_variant(libdir)
        # ggml loads it again (the same mapping) and registers its CPU device.
        if not ggml.ggml_backend_load(path.encode()):
            raise RuntimeError("ggml could not register the CPU backend %s" % os.path.basename(path))
        self.cpu_variant = variant
        # Loaded locally: only its start function is needed, not its backend registration.
        rpc = load_library(libdir, manifest.get("rpc_lib") or PORTABLE_RPC_LIB, ctypes.RTLD_LOCAL)
        return ggml, rpc

    def devices(self):
        found = []
        for i in range(self.ggml.ggml_backend_dev_count()):
            dev = self.ggml.ggml_backend_dev_get(i)
            kind = self.ggml.ggml_backend_dev_type(dev)
            if kind not in (GGML_BACKEND_DEVICE_TYPE_CPU, GGML_BACKEND_DEVICE_TYPE_GPU, GGML_BACKEND_DEVICE_TYPE_IGPU):
                continue
            free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
            self.ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            device = {
                "handle": dev,
                "name": self.ggml.ggml_backend_dev_name(dev).decode(errors="replace"),
                "description": self.ggml.ggml_backend_dev_description(dev).decode(errors="replace"),
                "type": "cpu" if kind == GGML_BACKEND_DEVICE_TYPE_CPU else "gpu",
                "memory_free": free.value,
                "memory_total": total.value,
            }
            if kind == GGML_BACKEND_DEVICE_TYPE_CPU and self.cpu_variant:
                device["variant"] = self.cpu_variant
            found.append(device)
        return found


class RuntimeFailure(RuntimeError):
    """The runtime cannot serve here, with a code the head acts on (the message is for people)."""

    def __init__(self, message, code):
        RuntimeError.__init__(self, message)
        self.code = code


def read_manifest(libdir):
    """The portable build's manifest, or None for the head-build layout."""
    path = os.path.join(libdir, PORTABLE_MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as err:
        raise RuntimeError("unreadable runtime manifest %s: %s" % (path, err)) from err
    if not isinstance(manifest, dict) or manifest.get("layout") != "ggml-backend-dl":
        raise RuntimeError("runtime manifest %s describes an unknown layout" % path)
    return manifest


def version_tuple(text):
    parts = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def platform_lib(name, system=None):
    """A library's file name on this OS: libggml.so.0 on Linux, libggml.0.dylib on macOS (its install name)."""
    if (system or sys.platform) == "darwin" and name.endswith(".so.0"):
        return name[: -len(".so.0")] + ".0.dylib"
    return name


def load_library(libdir, name, mode):
    path = os.path.join(libdir, name)
    if not os.path.exists(path):
        raise RuntimeError("runtime file missing: %s" % path)
    try:
        return ctypes.CDLL(path, mode=mode)
    except OSError as err:
        raise RuntimeFailure("cannot load %s: %s" % (name, err), CANNOT_LOAD) from err


def pick_cpu_variant(libdir):
    """The CPU backend variant that scores highest on this CPU, as ggml's own loader would pick it.

    Each libggml-cpu-<variant>.so says with ggml_backend_score() whether this CPU has the instructions it was
    compiled for (0: it lacks some) and how many. The score code is compiled without the variant's instruction
    flags, and ggml's own ggml_backend_load_best loads every variant to ask it the same way.
    """
    prefix, suffix = "libggml-cpu-", ".so"
    names = sorted(n for n in os.listdir(libdir) if n.startswith(prefix) and n.endswith(suffix))
    if not names:
        raise RuntimeError("the runtime in %s has no CPU backend (%s*%s)" % (libdir, prefix, suffix))
    best, best_score, tried = None, 0, []
    for name in names:
        variant = name[len(prefix):-len(suffix)]
        path = os.path.join(libdir, name)
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
            lib.ggml_backend_score.restype = ctypes.c_int
            lib.ggml_backend_score.argtypes = []
            score = lib.ggml_backend_score()
        except (OSError, AttributeError) as err:
            tried.append("%s: %s" % (variant, err))
            continue
        tried.append("%s: %s" % (variant, "score %d" % score if score else "needs instructions this CPU lacks"))
        if score > best_score:
            best, best_score = (variant, path), score
        unload(lib)
    if best is None:
        raise RuntimeError("no CPU backend of the runtime runs on this host (%s)" % "; ".join(tried))
    return best


def unload(lib):
    """Let go of a library loaded only to be asked something (best effort: CPython's private dlclose)."""
    try:
        import _ctypes

        _ctypes.dlclose(lib._handle)
    except (ImportError, AttributeError, OSError):
        pass


def socket_dir():
    """The stage's socket folder, fresh and only this user's (mkdtemp: 0700, a new random name, whatever the
    umask): in the 0700 run dir, or in the temp dir when that path is too long for AF_UNIX."""
    folder = tempfile.mkdtemp(prefix="stage-", dir=private_dir(run_dir()))
    if len(os.path.join(folder, SOCKET_NAME).encode()) <= MAX_SOCKET_PATH:
        return folder
    os.rmdir(folder)
    return tempfile.mkdtemp(prefix="meshtui-stage-")


def remove_socket_dir(folder):
    try:
        os.unlink(os.path.join(folder, SOCKET_NAME))
    except OSError:
        pass  # never bound, or removed already
    try:
        os.rmdir(folder)
    except OSError:
        pass


def wait_listening(path, server_thread, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server_thread.is_alive():
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                s.connect(path)
                return True
        except OSError:
            time.sleep(0.05)
    return False


class Protocol:
    """Line-delimited JSON on the original stdout; native code's prints are moved to stderr."""

    def __init__(self):
        sys.stdout.flush()
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        self.lock = threading.Lock()

    def send(self, **obj):
        with self.lock:
            self.out.write(json.dumps(obj) + "\n")
            self.out.flush()


def write_pidfile(socket_path):
    private_dir(run_dir())
    path = os.path.join(run_dir(), "agent-%d.json" % os.getpid())
    with open(path, "w") as f:
        json.dump({"pid": os.getpid(), "socket": socket_path, "started": time.time()}, f)
    return path


def serve(args):
    proto = Protocol()
    try:
        runtime = Runtime(os.path.join(args.runtime, "lib"))
    except RuntimeError as err:
        proto.send(event="error", code=getattr(err, "code", RUNTIME_ERROR), reason=str(err))
        return 3
    devices = runtime.devices()
    wanted = [d for d in devices if d["type"] == "gpu"] if args.gpu else []
    if not wanted:
        wanted = [d for d in devices if d["type"] == "cpu"][:1]
    if not wanted:
        proto.send(event="error", code=NO_DEVICE, reason="the ggml runtime reports no usable device")
        return 3
    cache_dir = None
    if runtime.cache_threshold is not None:  # an unverified cache could hand a stage altered weights: none then
        cache_dir = args.cache or os.path.join(state_dir(), "rpc-cache")
        private_dir(cache_dir)  # nobody else writes what later loads trust
        trim_cache(cache_dir, args.cache_limit)
        keep_cache_trimmed(cache_dir, args.cache_limit)
    folder = socket_dir()
    socket_path = os.path.join(folder, SOCKET_NAME)
    endpoint = ("unix:" + socket_path).encode()
    handles = (ctypes.c_void_p * len(wanted))(*[d["handle"] for d in wanted])
    threads = args.threads or os.cpu_count() or 1
    weight_repack = None  # a runtime without the repack patch
    if runtime.repack:
        weight_repack = not args.no_repack
        getattr(runtime.rpc, REPACK_SYMBOL)(1 if weight_repack else 0)

    def repacked():
        return int(getattr(runtime.rpc, REPACKED_COUNT_SYMBOL)()) if runtime.repack else 0

    def run_server():
        cache = cache_dir.encode() if cache_dir is not None else None
        runtime.rpc.ggml_backend_rpc_start_server(endpoint, cache, threads, len(wanted), handles)

    server = threading.Thread(target=run_server, name="ggml-rpc", daemon=True)
    server.start()
    if not wait_listening(socket_path, server, timeout=20.0):
        remove_socket_dir(folder)
        proto.send(event="error", code=NOT_LISTENING,
                   reason="ggml RPC server did not start listening on %s" % socket_path)
        return 3
    pidfile = write_pidfile(socket_path)
    proto.send(event="ready", socket=socket_path, pid=os.getpid(), threads=threads, cache_dir=cache_dir,
               cache_limit=args.cache_limit, cache_threshold=runtime.cache_threshold,
               runtime=runtime.kind, backends=runtime.backends, weight_repack=weight_repack,
               devices=[{k: v for k, v in d.items() if k != "handle"} for d in wanted])
    try:
        # The SSH channel is our lifeline: EOF on stdin means the head is gone.
        for line in sys.stdin:
            words = line.split()
            if words and words[0] == "ping":
                proto.send(event="pong", seq=words[1] if len(words) > 1 else "")
            elif words and words[0] == "stats":
                proto.send(event="stats", seq=words[1] if len(words) > 1 else "", repacked_weights=repacked())
            elif words and words[0] == "seed":
                proto.send(event="seeded", **answer_seed(runtime, cache_dir, line[len("seed"):]))
    finally:
        remove_socket_dir(folder)
        try:
            os.unlink(pidfile)
        except OSError:
            pass
        if cache_dir is not None:
            trim_cache(cache_dir, args.cache_limit)  # what this load wrote since the last trim, too
    # The RPC server thread cannot be stopped cleanly; leave without running finalizers.
    os._exit(0)


# ---------------------------------------------------------------- the weights cache


def is_cache_entry(name):
    """ggml names an entry by the 16 hex digits of its content hash."""
    return len(name) == 16 and all(c in "0123456789abcdef" for c in name)


def trim_cache(folder, limit, now=None):
    """Remove least recently used entries until they total at most `limit` bytes; returns (kept, removed) bytes.

    ggml refreshes an entry's mtime when it uses it, so mtime orders entries by last use. Only files named as
    entries (and stale ".tmp-" writes) are touched; anything else in the folder is left alone.
    """
    now = time.time() if now is None else now
    entries = []
    try:
        names = os.listdir(folder)
    except OSError:
        return 0, 0
    for name in names:
        path = os.path.join(folder, name)
        try:
            info = os.lstat(path)
        except OSError:
            continue  # removed meanwhile (another agent trims too)
        if not stat.S_ISREG(info.st_mode):
            continue
        if ".tmp-" in name and is_cache_entry(name.split(".tmp-")[0]):
            if now - info.st_mtime > CACHE_TEMP_AGE:
                remove_quietly(path)
            continue
        if is_cache_entry(name):
            entries.append((info.st_mtime, name, info.st_size))
    entries.sort(reverse=True)  # most recently used first
    kept = removed = 0
    for _mtime, name, size in entries:
        if kept + size <= limit:
            kept += size
        elif remove_quietly(os.path.join(folder, name)):
            removed += size
    return kept, removed


def remove_quietly(path):
    try:
        os.unlink(path)
        return True
    except OSError:
        return False  # gone already, or not ours to remove


def seed_cache(hash_bytes, folder, threshold, request):
    """Put tensors of a model file on this host into the cache, each named by the hash of its own bytes.

    `request`: {"seq": ..., "model": path, "regions": [[offset, size], ...]} (the head's idea of where the tensors
    of this stage's layers lie in the file). Nothing is trusted by name: an entry is named by the hash of what
    this file holds, so if the file is not the head's model the head's offers simply miss and it sends the bytes.
    """
    import mmap

    seeded = present = skipped = 0
    seeded_bytes = present_bytes = 0
    path = os.path.expanduser(str(request.get("model") or ""))
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ValueError("%s is empty" % path)
        view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable for ctypes, never written
    try:
        for offset, length in request.get("regions") or []:
            offset, length = int(offset), int(length)
            if length < threshold or offset < 0 or offset + length > size:
                skipped += 1
                continue
            pointer = ctypes.c_char.from_buffer(view, offset)
            digest = hash_bytes(ctypes.addressof(pointer), length)
            del pointer
            name = "%016x" % digest
            entry = os.path.join(folder, name)
            if os.path.exists(entry):
                os.utime(entry)  # used now: least recently used goes first (ggml re-checks it when used)
                present += 1
                present_bytes += length
                continue
            tmp = "%s.tmp-seed-%d" % (entry, os.getpid())
            with open(tmp, "wb") as out:
                out.write(memoryview(view)[offset:offset + length])
            os.replace(tmp, entry)
            seeded += 1
            seeded_bytes += length
    finally:
        view.close()
    return {"seeded": seeded, "seeded_bytes": seeded_bytes, "present": present, "present_bytes": present_bytes,
            "skipped": skipped}


OVERLAP_LIMIT = 64 * 1024 * 1024  # entries up to this size are read while the last one is written
PUT_HEADER = 16  # a pushed entry's header: its content hash and its size, two little-endian u64


def content_hasher(runtime):
    """The runtime's content hash (the one ggml names cache entries by), or None when this build lacks it."""
    hash_bytes = getattr(runtime.rpc, CONTENT_HASH_SYMBOL, None)
    if hash_bytes is None:
        return None
    hash_bytes.restype = ctypes.c_uint64
    hash_bytes.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return hash_bytes


def missing_entries(folder, offers):
    """Of [[hash hex, size], ...], the offers the cache lacks (no entry, or one of another size: cut short).

    An entry that is there counts as used now (least recently used goes first). Its content is checked by ggml
    when the load uses it; a wrong one is removed then and the bytes sent over the tunnel.
    """
    missing = []
    for name, size in offers:
        name, size = str(name), int(size)
        if not is_cache_entry(name) or size <= 0:
            raise ValueError("not an offer: %r" % ([name, size],))
        entry = os.path.join(folder, name)
        try:
            if os.stat(entry).st_size == size:
                os.utime(entry)
                continue
        except OSError:
            pass  # no such entry
        missing.append([name, size])
    return missing


def read_exactly(stream, view):
    """Fill `view` from `stream`; False at end of input (a cut stream)."""
    done = 0
    while done < len(view):
        n = stream.readinto(view[done:])
        if not n:
            return False
        done += n
    return True


def store_pushed(hash_bytes, folder, stream, wanted):
    """Write each entry that arrives on `stream` into `folder` once its bytes have the hash it is named by.

    `wanted`: {hash hex: size}, the entries this push may bring; anything else ends the push. Each entry is written
    under a temporary name and renamed, so a push cut midway keeps every entry that arrived whole. Reading the
    next entry overlaps checking and writing the last one (a thread; the hash, the read and the write all release
    the GIL), so a host takes entries at the rate of the slower of the two, not of their sum. Entries over
    OVERLAP_LIMIT are taken one at a time, so the push holds at most the largest entry plus OVERLAP_LIMIT.
    """
    import queue
    import struct

    done = {"stored": 0, "stored_bytes": 0, "rejected": 0}
    free = queue.Queue()
    for _ in range(2):
        free.put(bytearray(0))
    work = queue.Queue(maxsize=1)
    failed = []

    def check_and_write():
        while True:
            item = work.get()
            if item is None:
                return
            name, size, digest, buffer = item
            try:
                if not failed:
                    store_entry(hash_bytes, folder, name, size, digest, buffer, done)
            except Exception as err:  # anything: the reader must never wait on a writer that is gone
                failed.append(err)
            finally:
                free.put(buffer)

    writer = threading.Thread(target=check_and_write, name="put-writer", daemon=True)
    writer.start()
    header = bytearray(PUT_HEADER)
    try:
        while not failed and read_exactly(stream, memoryview(header)):
            digest, size = struct.unpack("<QQ", bytes(header))
            name = "%016x" % digest
            if wanted.get(name) != size:
                raise ValueError("entry %s of %d bytes was not asked for" % (name, size))
            buffer = free.get()
            if size > OVERLAP_LIMIT:  # one large buffer at a time: wait for the other, keep the larger
                other = free.get()
                free.put(bytearray(0))
                buffer = max(buffer, other, key=len)
            if len(buffer) < size:
                buffer = bytearray(size)
            with memoryview(buffer) as whole, whole[:size] as view:
                arrived = read_exactly(stream, view)
            if not arrived:
                free.put(buffer)
                break  # cut midway: this entry is not written
            work.put((name, size, digest, buffer))
    finally:
        work.put(None)
        writer.join()
    if failed:
        raise failed[0]
    return done


def store_entry(hash_bytes, folder, name, size, digest, buffer, done):
    """Write one entry that arrived whole, if its bytes have its hash: under a temporary name, then renamed. A
    buffer is reused for many entries (a file mapped in memory instead costs a page fault a page: three times
    slower here)."""
    pointer = ctypes.c_char.from_buffer(buffer)
    actual = hash_bytes(ctypes.addressof(pointer), size)
    del pointer
    if actual != digest:
        done["rejected"] += 1
        return
    entry = os.path.join(folder, name)
    tmp = "%s.tmp-put-%d" % (entry, os.getpid())
    try:
        with open(tmp, "wb") as out, memoryview(buffer) as whole, whole[:size] as view:
            out.write(view)
        os.replace(tmp, entry)
    except OSError:
        remove_quietly(tmp)
        raise
    done["stored"] += 1
    done["stored_bytes"] += size


def widen_pipe(stream, size=1024 * 1024):
    """Let a pipe on `stream` hold `size` bytes (Linux's default is 64 KiB), so sshd hands over more of the push
    per wake-up. Anything else (a socket, another OS, a limit below `size`) is left as it is."""
    try:
        if stat.S_ISFIFO(os.fstat(stream.fileno()).st_mode):
            import fcntl

            fcntl.fcntl(stream.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except (OSError, ValueError, AttributeError):
        pass


def put(args):
    proto = Protocol()
    try:
        runtime = Runtime(os.path.join(args.runtime, "lib"))
    except RuntimeError as err:
        proto.send(event="error", reason=str(err))
        return 3
    hash_bytes = content_hasher(runtime)
    if hash_bytes is None or runtime.cache_threshold is None:
        proto.send(event="error", reason="this runtime keeps no verified cache (no %s)" % CONTENT_HASH_SYMBOL)
        return 3
    folder = private_dir(args.cache)
    stream = sys.stdin.buffer
    widen_pipe(stream)
    try:
        request = json.loads(stream.readline() or b"{}")
        missing = missing_entries(folder, request.get("offers") or [])
    except (ValueError, TypeError, AttributeError, OSError) as err:
        proto.send(event="error", reason="unreadable offers: %s" % err)
        return 3
    proto.send(event="missing", entries=missing)
    try:
        done = store_pushed(hash_bytes, folder, stream, {name: size for name, size in missing})
    except (ValueError, TypeError, OSError) as err:
        proto.send(event="error", reason=str(err))
        return 3
    proto.send(event="stored", **done)
    return 0


def keep_cache_trimmed(folder, limit, interval=CACHE_TRIM_SECONDS):
    """A daemon thread that keeps the cache under its limit while the server writes entries."""

    def loop():
        while True:
            time.sleep(interval)
            trim_cache(folder, limit)

    thread = threading.Thread(target=loop, name="cache-trim", daemon=True)
    thread.start()
    return thread


def answer_seed(runtime, cache_dir, text):
    """The agent's answer to `seed {json}`: what seed_cache did, or why it could not."""
    try:
        request = json.loads(text)
        seq = request.get("seq", "")
    except (ValueError, AttributeError) as err:
        return {"seq": "", "error": "unreadable seed request: %s" % err}
    if cache_dir is None or runtime.cache_threshold is None:
        return {"seq": seq, "error": "this runtime keeps no verified cache"}
    hash_bytes = content_hasher(runtime)
    if hash_bytes is None:
        return {"seq": seq, "error": "this runtime lacks %s" % CONTENT_HASH_SYMBOL}
    try:
        done = seed_cache(hash_bytes, cache_dir, runtime.cache_threshold, request)
    except (OSError, ValueError, TypeError) as err:
        return {"seq": seq, "error": str(err)}
    done["seq"] = seq
    return done


# ---------------------------------------------------------------- down


def process_cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


def down():
    stopped = []
    folder = run_dir()
    names = os.listdir(folder) if os.path.isdir(folder) else []
    for name in sorted(names):
        if not (name.startswith("agent-") and name.endswith(".json")):
            continue
        path = os.path.join(folder, name)
        socket_path = None
        try:
            with open(path) as f:
                info = json.load(f)
            pid = int(info["pid"])
            socket_path = info.get("socket")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pid = None
        if pid and pid != os.getpid():
            cmdline = process_cmdline(pid)
            if cmdline and "meshtui_agent" in cmdline:
                try:
                    os.kill(pid, signal.SIGKILL)
                    stopped.append({"pid": pid, "cmdline": cmdline.strip()})
                except OSError:
                    pass
        if isinstance(socket_path, str) and os.path.basename(socket_path) == SOCKET_NAME:
            remove_socket_dir(os.path.dirname(socket_path))
        try:
            os.unlink(path)
        except OSError:
            pass
    print(json.dumps({"stopped": stopped}))
    return 0


# ---------------------------------------------------------------- inspect


def inspect_tree(folder, home=None, limit=4096):
    """Owner, mode and kind of `folder`'s ancestors from home, and of everything under it (sha256 of files).

    Links are reported, never followed: the head accepts none in a runtime.
    """
    home = os.path.abspath(home or os.path.expanduser("~"))
    folder = os.path.abspath(os.path.join(home, folder))
    report = {"uid": os.getuid(), "ancestors": [], "entries": {}}
    chain = []
    head = os.path.dirname(folder)
    while head.startswith(home) and head != os.path.dirname(head):
        chain.append(head)
        if head == home:
            break
        head = os.path.dirname(head)
    for path in reversed(chain):
        info = os.lstat(path)
        report["ancestors"].append({"path": os.path.relpath(path, home), "uid": info.st_uid,
                                    "mode": stat.S_IMODE(info.st_mode), "kind": file_kind(info)})
    if not os.path.lexists(folder):
        return report

    def add(path):
        info = os.lstat(path)
        entry = {"uid": info.st_uid, "mode": stat.S_IMODE(info.st_mode), "kind": file_kind(info)}
        if entry["kind"] == "file":
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            entry["sha256"] = digest.hexdigest()
        report["entries"][os.path.relpath(path, folder)] = entry
        if len(report["entries"]) > limit:
            raise RuntimeError("more than %d files in %s" % (limit, folder))
        return entry["kind"]

    if add(folder) == "dir":
        for root, dirs, files in os.walk(folder):
            for name in sorted(dirs + files):
                add(os.path.join(root, name))
    return report


def file_kind(info):
    if stat.S_ISLNK(info.st_mode):
        return "link"
    if stat.S_ISDIR(info.st_mode):
        return "dir"
    return "file" if stat.S_ISREG(info.st_mode) else "other"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="meshtui_agent")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("probe")
    sub.add_parser("down")
    p_inspect = sub.add_parser("inspect")
    p_inspect.add_argument("folder")
    p_serve = sub.add_parser("serve")
    p_serve.add_argument("--runtime", required=True)
    p_serve.add_argument("--threads", type=int, default=0)
    p_serve.add_argument("--cache", default=None)
    p_serve.add_argument("--cache-limit", type=int, default=CACHE_LIMIT)
    p_serve.add_argument("--gpu", action="store_true")
    p_serve.add_argument("--no-repack", action="store_true", help="keep weights in ggml's plain layouts")
    p_put = sub.add_parser("put")
    p_put.add_argument("--runtime", required=True)
    p_put.add_argument("--cache", required=True)
    args = parser.parse_args(argv)
    if args.command == "probe":
        print(json.dumps(probe()))
        return 0
    if args.command == "serve":
        return serve(args)
    if args.command == "put":
        return put(args)
    if args.command == "down":
        return down()
    if args.command == "inspect":
        try:
            print(json.dumps(inspect_tree(args.folder)))
        except (OSError, RuntimeError) as err:
            print(json.dumps({"error": str(err)}))
        return 0
    parser.print_usage(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
