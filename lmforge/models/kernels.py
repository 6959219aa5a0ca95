"""Fused fp32 CPU kernels for the engine's decode step: `kernels.c`, built with the system's C compiler on first use.

At 16 sequences a SmolLM2 decode step spent ~15 ms of its ~71 outside the matrix products, in chains of small
PyTorch ops, each paying its dispatch and a pass over memory: an RMSNorm is six ops, SwiGLU's SiLU and product
three, RoPE five, the decode attention on the dense KV copy eight a layer. Four kernels do each chain in one
pass: `rms_norm`, `silu_mul`, `rope_` (in place) and `dense_decode_attention` (which also appends the step's
keys and values to the copy, and reads each cached key once for all the query heads of its group). A
16-sequence step: 77.5 -> 69.3 ms (bench/decode_step.py; docs/engine.md).

The engine turns them on with `layers.packed_weights(fused_kernels=True)` (its steps and `generate()`, for fp32
CPU models), and each layer passes them only tensors they take; everywhere else the PyTorch ops run. The two
compute the same values up to fp32 rounding (the sums run in another order; exp is Cephes' polynomial, as in
PyTorch's vectorised exp).

Built with `cc -O3 -march=native -fopenmp` (~2 s, once per machine) into a private cache keyed by the source,
the compiler and the CPU's flags, written atomically, and loaded with ctypes, whose calls release the GIL. No
compiler, a CPU without AVX2 and FMA, or a failed build: `lib()` is None (logged once) and the PyTorch ops run.
`LMFORGE_KERNELS=0` turns them off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

from lmforge import atomic

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "lmf_rms_norm": [_P, _P, _P, _I, _I, _F],
    "lmf_silu_mul": [_P, _P, _I, _I],
    "lmf_rope": [_P, _I, _I, _I, _I, _P, _P],
    "lmf_dense_decode_attention": [_P, _I, _P, _I, _P, _I, _P, _P, _P, _P, _P, _P]
    + [_I] * 5
    + [_F, _P, _I, ctypes.c_int],
}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_threads: int | None = None  # None: PyTorch's thread count; 1 where two OpenMP runtimes are loaded


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_dirs() -> list[Path]:
    """Where the library may be built and kept: the user's cache, else a private (0700, own) temporary folder."""
    dirs = []
    try:
        root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        dirs.append(Path(root) / "lmforge" / "kernels")
    except RuntimeError:  # no home directory
        pass
    return [*dirs, Path(tempfile.gettempdir()) / f"lmforge-kernels-{os.getuid()}"]


def _private(folder: Path) -> bool:
    """A folder only this user can write to: nobody else can have planted a library in it."""
    st = folder.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _build(compiler: list[str], cpu_flags: set[str]) -> Path:
    """The shared library for this source, compiler and CPU: from the cache, or compiled into it."""
    source = SOURCE.read_bytes()
    version = subprocess.run(
        [*compiler, "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    key = hashlib.sha256(
        b"\0".join([source, " ".join(FLAGS).encode(), version.encode(), " ".join(sorted(cpu_flags)).encode()])
    ).hexdigest()[:16]
    tried = []
    for cache in _cache_dirs():
        path = cache / f"kernels-{key}.so"
        try:
            cache.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not _private(cache):
                raise PermissionError(f"{cache} is writable by others")
            if path.exists():
                return path
            started = time.monotonic()
            with atomic.file(path) as tmp:  # a concurrent build's reader sees a whole library or none
                subprocess.run(
                    [*compiler, *FLAGS, "-o", str(tmp), str(SOURCE)],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=120,
                )
        except OSError as e:  # not writable, full, ...: the next folder
            tried.append(f"{cache}: {e}")
            continue
        log.info("built the fused decode kernels in %.1f s: %s", time.monotonic() - started, path)
        return path
    raise OSError(f"no usable cache folder for the kernels ({'; '.join(tried)})")


def lib() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot be had here (the reason logged once)."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            _lib = _load()
        except Exception as e:  # noqa: BLE001 - any failure means the PyTorch ops, never a failed step
            log.warning("fused decode kernels unavailable, using PyTorch's ops: %s", e)
            _lib = None
        _tried = True
    return _lib


def _load() -> ctypes.CDLL | None:
    global _threads
    if os.environ.get("LMFORGE_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise OSError(f"they are written for x86-64 (AVX2, FMA), not {platform.machine()}")
    cpu_flags = _cpu_flags()
    if not {"avx2", "fma"} <= cpu_flags:
        raise OSError("this CPU lacks AVX2 or FMA")
    compiler = shlex.split(os.environ.get("CC") or "") or [shutil.which("cc") or shutil.which("gcc") or ""]
    if not compiler[0]:
        raise OSError("no C compiler (cc) on PATH")
    try:
        path = _build(compiler, cpu_flags)
    except subprocess.CalledProcessError as e:
        raise OSError(f"{compiler[0]} failed: {e.stderr.strip()[-500:]}") from None
    # after torch: the library's libgomp.so.1 is then torch's own, so its parallel loop uses the same OpenMP
    # runtime as torch's ops (two runtimes' thread teams would fight over the cores)
    library = ctypes.CDLL(str(path))
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(library, name)
        fn.argtypes, fn.restype = argtypes, None
    runtimes = _openmp_runtimes()
    if len(runtimes) > 1:  # e.g. a PyTorch built with another runtime: the attention runs on one thread
        log.warning(
            "two OpenMP runtimes loaded (%s): the fused attention kernel runs single-threaded", runtimes
        )
        _threads = 1
    return library


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtime libraries mapped into this process."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    names = ("libgomp", "libomp", "libiomp")
    return {
        line.split()[-1] for line in maps.splitlines() if any(n in line.rsplit("/", 1)[-1] for n in names)
    }


def suited(weight: torch.Tensor) -> bool:
    """Whether a model with this weight could use the kernels at all (fp32 on the CPU): callers ask before
    `lib()` builds them."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32


def fits(*tensors: torch.Tensor) -> bool:
    """fp32 CPU tensors whose rows the kernels can read: last dimension a multiple of 8 floats, contiguous."""
    return all(
        t.dtype == torch.float32 and t.device.type == "cpu" and t.shape[-1] % 8 == 0 and t.stride(-1) == 1
        for t in tensors
    )


def fits_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """rms_norm's operands: x wholly contiguous, a weight as long as its rows (fits() for both)."""
    return x.is_contiguous() and weight.shape == x.shape[-1:] and fits(x, weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm(x, weight.shape, weight, eps) for a contiguous fp32 x."""
    y = torch.empty_like(x)
    dim = x.shape[-1]
    _lib.lmf_rms_norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // dim, dim, eps)
    return y


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for rows laid out [gate | up] (the fused gate/up product), contiguous fp32."""
    n = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], n)
    _lib.lmf_silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * n), n)
    return out


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """layers.apply_rope in place on x (N, heads, hd), whose heads are contiguous (its rows may be apart), with
    rope_cos_sin's cos and sin (N, 1, hd) contiguous; returns x."""
    n, heads, hd = x.shape
    _lib.lmf_rope(x.data_ptr(), x.stride(0), n, heads, hd, cos.data_ptr(), sin.data_ptr())
    return x


def dense_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_dense: torch.Tensor,
    v_dense: torch.Tensor,
    order: torch.Tensor,
    last: torch.Tensor,
    first: torch.Tensor,
    longest: int,
    y: torch.Tensor,
) -> torch.Tensor:
    """Append the decode tokens' k/v (N, nkv, hd) to the dense copy (rows, nkv, cap, hd) at `last`, then attend
    each decode token's query heads q (N, nh, hd) to its row's positions first..last (at most `longest`); written
    into y (N, nh, hd), at the rows `order` (one per dense row). Each head's rows must be contiguous, y and the
    copy wholly; order, last and first int64."""
    nkv, cap, hd = k_dense.shape[1], k_dense.shape[2], k_dense.shape[3]
    group = q.shape[1] // nkv
    bd = order.numel()
    scratch = q.new_empty(bd * nkv * group * longest)
    _lib.lmf_dense_decode_attention(
        q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0),
        k_dense.data_ptr(), v_dense.data_ptr(), y.data_ptr(), order.data_ptr(), last.data_ptr(),
        first.data_ptr(), bd, nkv, group, cap, hd, hd**-0.5, scratch.data_ptr(), group * longest,
        _threads or torch.get_num_threads(),
    )  # fmt: skip
    return y
