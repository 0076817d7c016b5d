"""float32 linear layers on x86 CPUs through a small AVX2 kernel (cpu_linear.c).

Decoding multiplies each weight matrix by one row, verification by a few: the step
streams every weight once, so its speed is the speed at which weights are read. On the
2-core AVX2 machines this project targets, oneDNN's packed layout (what PyTorch offers)
reads them at ~10 GB/s and MKL's plain matmul at ~10 GB/s, while the memory delivers
~21 GB/s; a plain loop of 8-wide FMAs over four weight rows at a time, threads splitting
the rows, reads at that bandwidth and multiplies a few more rows nearly for free
(`python benchmarks/cpu_linear.py`). It also keeps the weight in its plain layout, so a
tied LM head shares the embedding's memory instead of holding a reordered copy.

The kernel is compiled on first use with the system C compiler (about a second), linked
with the OpenMP runtime torch loaded, cached under ~/.cache/mtpd (or
$XDG_CACHE_HOME/mtpd), and loaded with ctypes. Without a
compiler, on a CPU without AVX2, or with MTPD_CPU_KERNEL=0, layers keep oneDNN's layout.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_linear.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
K_MULTIPLE = 8  # the kernel reads 8 inputs at a time


def _cache_dir() -> Path:
    """Where the library is kept: a directory only this user can write to, since what
    lies there is loaded as code."""
    try:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mtpd"
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = base.stat()
        if st.st_uid == os.getuid() and not st.st_mode & 0o022 and os.access(base, os.W_OK):
            return base
    except (OSError, RuntimeError):  # RuntimeError: no home directory
        pass
    return Path(tempfile.mkdtemp(prefix="mtpd-kernel-"))  # private, built afresh


def _openmp_runtime() -> Path | None:
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


def _build(compiler: str, runtime: Path | None) -> Path:
    # Compiled with -fopenmp, linked with the runtime torch loaded (or the compiler's).
    link = [str(runtime)] if runtime else []
    command = [compiler, *FLAGS, str(SOURCE), *link]
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(command).encode()).hexdigest()
    library = _cache_dir() / f"mtpd-cpu-linear-{digest[:16]}.so"
    if not library.exists():
        # Built under a private name and renamed: workers starting together may race.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=library.parent)
        os.close(fd)
        try:
            subprocess.run([*command, "-o", tmp], check=True, capture_output=True, timeout=120)
            os.replace(tmp, library)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return library


@functools.cache
def _kernel() -> Callable[..., None] | None:
    if os.environ.get("MTPD_CPU_KERNEL", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("no C compiler: float32 CPU layers use oneDNN's layout (slower)")
        return None
    runtime = _openmp_runtime()
    try:
        library = _build(compiler, runtime)
        try:
            function = ctypes.CDLL(str(library)).mtpd_linear_f32
        except OSError:  # a damaged cached copy: build it again, once
            library.unlink(missing_ok=True)
            function = ctypes.CDLL(str(_build(compiler, runtime))).mtpd_linear_f32
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        log.warning("CPU linear kernel unavailable (%s %s): using oneDNN", e, detail.decode())
        return None
    function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    function.restype = None
    return function


def available_for(weight: torch.Tensor) -> bool:
    """Whether the kernel can serve this [out, in] weight."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and weight.is_contiguous()
        and weight.shape[1] % K_MULTIPLE == 0
        and _kernel() is not None
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear for a weight that `available_for` accepted (inference only: no
    gradients)."""
    # What C would otherwise read through a wrong pointer (after a .to(), say).
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise TypeError(f"the float32 CPU kernel got {x.dtype} inputs on {x.device}")
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        raise TypeError(f"the float32 CPU kernel got a {weight.dtype} weight on {weight.device}")
    n, k = weight.shape
    rows = x.reshape(-1, k).contiguous()
    out = torch.empty(rows.shape[0], n, dtype=torch.float32)
    if rows.shape[0]:
        _kernel()(
            rows.data_ptr(),
            weight.data_ptr(),
            out.data_ptr(),
            rows.shape[0],
            n,
            k,
            torch.get_num_threads(),
        )
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], n)
