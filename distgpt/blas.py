"""Which library runs the big 2-D matmuls: NumPy's own BLAS, or Intel MKL when it is installed.

NumPy's wheels bring OpenBLAS. On Intel CPUs, MKL's sgemm is 15-30% faster on the shapes a rank
sees most when its batch is small (128 x 768 times 768 x 3072 and the like, see benchmarks/README.md)
and ~7% faster on big square ones. `pip install distgpt[mkl]` installs Intel's `mkl` wheel; its
`cblas_sgemm`/`cblas_dgemm` are then called through ctypes (which releases the GIL, so the rank's
threads can split a matmul as they do with NumPy's).

DISTGPT_BLAS chooses:
- `auto` (default): MKL when the `mkl` package is installed and the CPU is an Intel one (on AMD
  MKL may pick slower kernels), else NumPy;
- `mkl`: MKL, or an error if it is not installed;
- `numpy`: NumPy's BLAS.

MKL runs sequential here: a rank's threads come from distgpt.threads, one per core, as with
OpenBLAS held to one thread. (torch, imported after MKL is loaded, takes its default thread count
from MKL's and so starts with 1: a process that uses both should call torch.set_num_threads.)
Results differ from OpenBLAS's in the last bits (another summation order), never in more than
rounding: the tests hold both to PyTorch.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import os
import threading
import warnings

import numpy as np

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_SEQUENTIAL = 1                                # MKL_THREADING_SEQUENTIAL
_LP64 = 0                                      # MKL_INTERFACE_LP64: 32-bit integer arguments
SMALL_M = 16     # at most this many rows: NumPy's BLAS (see gemm)


class BlasError(RuntimeError):
    pass


@functools.cache
def _mkl_library_path() -> str | None:
    """Path of libmkl_rt from the installed `mkl` package, or None."""
    try:
        files = importlib.metadata.files("mkl") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name.startswith(("libmkl_rt.so", "mkl_rt")) and not f.name.endswith((".a", ".lib")):
            return str(f.locate())
    return None


def _intel_cpu() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "GenuineIntel" in f.read(1 << 16)
    except OSError:
        return False


class _Mkl:
    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        # both before any other MKL call; either may already be fixed if something else in the
        # process (an MKL-linked NumPy, say) set MKL up first
        for setter in ("MKL_Set_Interface_Layer", "MKL_Set_Threading_Layer"):
            getattr(self.lib, setter).restype = ctypes.c_int
        if self.lib.MKL_Set_Interface_Layer(_LP64) != _LP64:
            raise OSError("MKL is set up for 64-bit integers (MKL_INTERFACE_LAYER=ILP64?)")
        self.mode = "sequential"
        if self.lib.MKL_Set_Threading_Layer(_SEQUENTIAL) != _SEQUENTIAL:
            self.lib.MKL_Set_Num_Threads(1)                   # threaded MKL, held to one thread
            self.mode = "threaded MKL held to 1 thread"
        args = [ctypes.c_int] * 6
        for name, real in (("cblas_sgemm", ctypes.c_float), ("cblas_dgemm", ctypes.c_double)):
            fn = getattr(self.lib, name)
            fn.argtypes = [*args, real, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                           real, ctypes.c_void_p, ctypes.c_int]
            fn.restype = None
        self.gemm = {np.dtype(np.float32): self.lib.cblas_sgemm, np.dtype(np.float64): self.lib.cblas_dgemm}
        self.gemm_bf16 = self._bf16_gemm()
        self.version = importlib.metadata.version("mkl")

    def _bf16_gemm(self):
        """cblas_gemm_bf16bf16f32 (bf16 A and B as uint16, float32 alpha, beta and C), or None in an
        MKL too old to have it. MKL picks AMX or AVX512-BF16 kernels where the CPU has them and
        emulates them (slowly) where it does not: bf16.resolve decides whether to use it."""
        try:
            fn = self.lib.cblas_gemm_bf16bf16f32
        except AttributeError:
            return None
        fn.argtypes = [*[ctypes.c_int] * 6, ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                       ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
        fn.restype = None
        return fn


_backend: _Mkl | None = None
_chosen = False
_choosing = threading.Lock()                   # the first gemm may come from several threads at once


def use(name: str) -> None:
    """Choose the backend now: `auto`, `mkl` or `numpy` (what DISTGPT_BLAS says at first use)."""
    global _backend, _chosen
    if name not in ("auto", "mkl", "numpy"):
        raise BlasError(f"DISTGPT_BLAS={name!r}: expected auto, mkl or numpy")
    path = _mkl_library_path()
    if name == "mkl" and path is None:
        raise BlasError("DISTGPT_BLAS=mkl but the `mkl` package is not installed "
                        "(pip install 'distgpt[mkl]', or DISTGPT_BLAS=numpy)")
    want = name == "mkl" or (name == "auto" and path is not None and _intel_cpu())
    _backend = None
    if want:
        try:
            _backend = _Mkl(path)
        except (OSError, AttributeError) as exc:          # a broken install: say so, or use NumPy
            if name == "mkl":
                raise BlasError(f"DISTGPT_BLAS=mkl but MKL at {path} cannot be used: {exc}") from exc
            warnings.warn(f"MKL at {path} cannot be used ({exc}); the matmuls use NumPy's BLAS",
                          stacklevel=2)
    _chosen = True


def _mkl() -> _Mkl | None:
    if not _chosen:
        with _choosing:
            if not _chosen:
                use(os.environ.get("DISTGPT_BLAS", "auto"))
    return _backend


def using_mkl() -> bool:
    """True when gemm goes to MKL (chosen on first use, from DISTGPT_BLAS)."""
    return _mkl() is not None


def describe() -> str:
    """One line for the run header: which library does the matmuls."""
    mkl = _mkl()
    if mkl is not None:
        return f"MKL {mkl.version} ({mkl.mode})"
    return "NumPy's BLAS"


def _layout(a: np.ndarray) -> tuple[int, int] | None:
    """(transpose flag, leading dimension) of a 2-D array as a row-major BLAS operand, or None when
    neither it nor its transpose has unit column stride."""
    rows, cols = a.shape
    s0, s1 = a.strides
    e = a.itemsize
    if (s1 == e or cols == 1) and s0 % e == 0 and s0 // e >= max(1, cols):
        return _NO_TRANS, s0 // e
    if (s0 == e or rows == 1) and s1 % e == 0 and s1 // e >= max(1, rows):
        return _TRANS, s1 // e
    return None


def gemm(a: np.ndarray, b: np.ndarray, out: np.ndarray, accumulate: bool = False) -> np.ndarray:
    """out = a @ b, or out += a @ b with `accumulate`, for 2-D arrays (views welcome)."""
    mkl = _mkl()
    fn = None if mkl is None else mkl.gemm.get(out.dtype)
    M, K = a.shape
    N = out.shape[1]
    # a few rows (decoding, a short prompt) make a product bound by reading b from memory, which
    # NumPy's OpenBLAS streams faster than MKL's sgemm (GPT-2 124M sampling with the KV cache:
    # 30 -> 43 tokens/s, a 16-token prefill 97 -> 74 ms; training's row blocks are >= 64 rows)
    if (fn is not None and M > SMALL_M and a.dtype == b.dtype == out.dtype and N and K and out.flags.writeable
            and a.flags.aligned and b.flags.aligned and out.flags.aligned
            and not np.may_share_memory(out, a) and not np.may_share_memory(out, b)):
        la, lb, lc = _layout(a), _layout(b), _layout(out)
        if la and lb and lc and lc[0] == _NO_TRANS and b.shape == (K, N) and out.shape == (M, N):
            fn(_ROW_MAJOR, la[0], lb[0], M, N, K, 1.0, a.ctypes.data, la[1], b.ctypes.data, lb[1],
               1.0 if accumulate else 0.0, out.ctypes.data, lc[1])
            return out
    if accumulate:
        out += a @ b
    else:
        np.matmul(a, b, out=out)
    return out


# ----------------------------------------------------------------------------- bf16 inputs, fp32 output

def bf16_gemm_available() -> bool:
    """True when MKL is the backend and has cblas_gemm_bf16bf16f32."""
    mkl = _mkl()
    return mkl is not None and mkl.gemm_bf16 is not None


def _bf16_fn():
    mkl = _mkl()
    if mkl is None:
        raise BlasError("bf16 matmuls need MKL (pip install 'distgpt[mkl]'; DISTGPT_BLAS is "
                        f"{os.environ.get('DISTGPT_BLAS', 'auto')!r}, the matmuls use NumPy's BLAS)")
    if mkl.gemm_bf16 is None:
        raise BlasError(f"bf16 matmuls need cblas_gemm_bf16bf16f32, which MKL {mkl.version} does not have")
    return mkl.gemm_bf16


def _bf16_operand(a: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """a (uint16 bf16 bits) and its BLAS layout; a contiguous copy when MKL cannot read it as it is."""
    if a.dtype != np.uint16:
        raise TypeError(f"bf16 operands are uint16 arrays of bf16 bits, not {a.dtype}")
    la = _layout(a) if a.flags.aligned else None
    if la is None:
        a = np.ascontiguousarray(a)
        la = _layout(a)
    return a, la


def gemm_bf16(a: np.ndarray, b: np.ndarray, out: np.ndarray, accumulate: bool = False) -> np.ndarray:
    """out = a @ b, or out += a @ b with `accumulate`: a (M, K) and b (K, N) are bf16 (uint16 bit
    patterns, views welcome), out (M, N) float32; products are accumulated in float32 by MKL."""
    fn = _bf16_fn()
    M, K = a.shape
    if b.shape[0] != K or out.shape != (M, b.shape[1]) or out.dtype != np.float32:
        raise ValueError(f"gemm_bf16: {a.shape} @ {b.shape} into {out.dtype}{out.shape}")
    N = out.shape[1]
    if not out.flags.writeable:
        raise ValueError("gemm_bf16: output array is read-only")
    if not (M and N):
        return out
    if not K:
        if not accumulate:
            out[...] = 0.0
        return out
    a, la = _bf16_operand(a)
    b, lb = _bf16_operand(b)
    lc = _layout(out) if out.flags.aligned else None
    if lc is None or lc[0] != _NO_TRANS:      # MKL writes row-major C only: go through a temporary
        tmp = np.empty((M, N), np.float32)
        gemm_bf16(a, b, tmp)
        if accumulate:
            out += tmp
        else:
            out[...] = tmp
        return out
    fn(_ROW_MAJOR, la[0], lb[0], M, N, K, 1.0, a.ctypes.data, la[1], b.ctypes.data, lb[1],
       1.0 if accumulate else 0.0, out.ctypes.data, lc[1])
    return out
