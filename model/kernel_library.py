"""Building and loading the CPU kernels (cpu_kernels.c) that `cpu_kernels.py` binds.

The kernels are compiled on first use with the system C compiler (about a second) for
the CPU they run on (AVX2, or AVX-512 where the CPU has it with VNNI, which the int4
kernel uses), linked with the OpenMP runtime torch loaded and glibc's vector math library,
cached under ~/.cache/mtpd (or $XDG_CACHE_HOME/mtpd; the last few builds kept), and loaded
with ctypes. Without a compiler, on a CPU without AVX2, or with MTPD_CPU_KERNEL=0, layers
keep PyTorch's ops (linear layers in oneDNN's layout).
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from mtpd.model.user_cache import private_cache_dir, prune

log = logging.getLogger("mtpd.model.cpu_kernels")

SOURCE = Path(__file__).with_name("cpu_kernels.c")  # what cpu_kernels.py binds
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
# Where the CPU has them, the int4 and int8 kernels take 64 byte pairs per instruction
# (VNNI's dpbusd on 512-bit registers), and attention's 256-bit operations all 32
# registers (VL); the library is built on the machine it runs on.
AVX512_VNNI = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni")
_AVX512_VNNI_CPU = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}  # as /proc/cpuinfo names them
# Libraries kept in the cache: one per kernel source and build (AVX-512, AVX2, scalar exp).
KEPT_BUILDS = 8


def cache_dir() -> Path:
    return private_cache_dir() or _process_folder()


@functools.cache
def _process_folder() -> Path:
    """Where no private cache can be: one folder for this process's builds, removed at
    its exit (each build used to make a folder of its own and leave it behind)."""
    folder = Path(tempfile.mkdtemp(prefix="mtpd-kernel-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def openmp_runtime() -> Path | None:
    """The OpenMP library this process already runs (torch's): the kernel links against
    that very file, so it shares torch's thread pool even where torch bundles the
    runtime under another name, instead of bringing a second one whose idle threads
    spin against torch's."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = Path(line.split()[-1])
        if path.name.startswith(("libgomp", "libiomp5")) and ".so" in path.name:
            return path
    return None


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's features as /proc/cpuinfo names them (none where it cannot be read)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_isa() -> tuple[str, ...]:
    """The instruction sets beyond AVX2 to build for: AVX512_VNNI where this CPU has it."""
    return AVX512_VNNI if cpu_flags() >= _AVX512_VNNI_CPU else ()


def build(compiler: str, runtime: Path | None, math: list[str], isa: tuple[str, ...]) -> Path:
    # Compiled with -fopenmp, linked with the runtime torch loaded (or the compiler's).
    link = [str(runtime)] if runtime else []
    command = [compiler, *FLAGS, *isa, str(SOURCE), *link, *math]
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(command).encode()).hexdigest()
    library = cache_dir() / f"mtpd-cpu-kernels-{digest[:16]}.so"
    try:
        os.utime(library)  # the most recently used: pruned last
    except PermissionError:
        pass  # not ours to touch (the cache is private: it should be): loaded as it is
    except FileNotFoundError:
        # Built under a private name and renamed: workers starting together may race.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=library.parent)
        os.close(fd)
        try:
            subprocess.run([*command, "-o", tmp], check=True, capture_output=True, timeout=120)
            os.replace(tmp, library)
        finally:
            Path(tmp).unlink(missing_ok=True)
        # Every kernel source and build leaves a library (a developer's cache held 159).
        prune(library.parent, "mtpd-cpu-kernels-*.so", KEPT_BUILDS, "tmp*.so")
    return library


def build_any(compiler: str, runtime: Path | None) -> Path:
    """For this CPU's instruction sets, or for AVX2 alone where the compiler lacks them."""
    isa = cpu_isa()
    if isa:
        try:
            return build(compiler, runtime, ["-lmvec"], isa)
        except subprocess.SubprocessError as e:
            detail = (getattr(e, "stderr", b"") or b"").decode()
            log.warning("no AVX-512 build here (%s %s): the kernels use AVX2", e, detail)
    return build_avx2(compiler, runtime)


def build_avx2(compiler: str, runtime: Path | None) -> Path:
    """For AVX2 alone, with glibc's vector exp (libmvec) where it links, else the scalar one."""
    try:
        return build(compiler, runtime, ["-lmvec"], ())
    except subprocess.CalledProcessError:
        log.info("libmvec does not link here: the kernels' exp runs lane by lane")
        return build(compiler, runtime, ["-DMTPD_SCALAR_EXP", "-lm"], ())


C_POINTER, C_INT, C_FLOAT, C_STATUS = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {  # name: (argument types, result type)
    "mtpd_linear": ([C_POINTER] * 3 + [C_INT, ctypes.c_int], C_STATUS),
    "mtpd_rms_norm_f32": ([C_POINTER] * 3 + [C_INT] * 2 + [C_FLOAT], None),
    "mtpd_silu_mul_f32": ([C_POINTER] * 2 + [C_INT] * 2, None),
    "mtpd_attend_f32": ([C_POINTER] * 6 + [C_INT] * 6 + [C_FLOAT, ctypes.c_int], C_STATUS),
    "mtpd_mtp_input_f32": (
        # head, E, X, width, Y, rows, threads
        [C_POINTER] * 3 + [C_INT, C_POINTER, C_INT, ctypes.c_int],
        C_STATUS,
    ),
    "mtpd_mtp_pass_f32": (
        # head, step, tokens, X, width, draft_rows, n_draft, states, drafts, rows_seconds,
        # threads
        [C_POINTER] * 4 + [C_INT, C_POINTER, C_INT] + [C_POINTER] * 3 + [ctypes.c_int],
        C_STATUS,
    ),
    "mtpd_decoder_layers_f32": (
        # layers, n, step, first, X, Y, threads, taps, n_taps, T
        [
            C_POINTER,
            C_INT,
            C_POINTER,
            C_INT,
            C_POINTER,
            C_POINTER,
            ctypes.c_int,
            C_POINTER,
            C_INT,
            C_POINTER,
        ],
        C_STATUS,
    ),
}


def load(library: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library))
    for name, (argtypes, restype) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype
    return lib


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """The kernels, built and loaded on first use; None where they cannot be."""
    if os.environ.get("MTPD_CPU_KERNEL", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("no C compiler: float32 CPU layers use PyTorch's ops (slower)")
        return None
    runtime = openmp_runtime()
    try:
        library = build_any(compiler, runtime)
        try:
            return load(library)
        except (OSError, AttributeError):  # a damaged cached copy: build it again, once
            library.unlink(missing_ok=True)
            return load(build_any(compiler, runtime))
    except (OSError, AttributeError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        log.warning("CPU kernels unavailable (%s %s): using PyTorch's ops", e, detail.decode())
        return None


def available() -> bool:
    return kernels() is not None
