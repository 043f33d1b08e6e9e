"""Which library runs the big 2-D matmuls: NumPy's own BLAS, or Intel MKL when it is installed;
and for bf16 models (train.precision), which bf16 gemm: oneDNN's or MKL's (the second half below).

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
def _package_library(package: str, prefix: str) -> str | None:
    """Path of the shared library named prefix* that the installed `package` ships, or None."""
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = sorted(str(f.locate()) for f in files
                   if f.name.startswith(prefix) and not f.name.endswith((".a", ".lib")))
    return found[0] if found else None


def _mkl_library_path() -> str | None:
    """Path of libmkl_rt from the installed `mkl` package, or None."""
    return _package_library("mkl", "libmkl_rt.so") or _package_library("mkl", "mkl_rt")


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


@functools.cache
def _load_mkl(path: str) -> _Mkl:
    """One _Mkl per process: the fp32 backend and the bf16 gemm share it."""
    return _Mkl(path)


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
            _backend = _load_mkl(path)
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
#
# Two libraries have a gemm with bf16 inputs and float32 accumulation and output, and which is
# faster depends on the CPU (benchmarks/bench_gemm.py, one core):
# - oneDNN's dnnl_gemm_bf16bf16f32 (the `onednn-cpu-gomp` wheel, a dependency on x86-64 Linux:
#   39 MB download, no dependencies of its own) uses AVX512-BF16 on any vendor's CPU: 370-425
#   GFLOP/s on GPT-2's shapes on an AMD Zen 5, against 78-90 for sgemm.
# - MKL's cblas_gemm_bf16bf16f32 (the optional `mkl` extra, ~700 MB) uses AMX on Intel Xeons
#   (700-1,040 GFLOP/s on a Sapphire Rapids-class core), but on AMD it runs no faster than sgemm
#   (74-92 GFLOP/s on the same Zen 5): it does not use AVX512-BF16 there.
# DISTGPT_BF16_GEMM chooses: `auto` (MKL where the CPU has AMX-BF16 and MKL is installed, else
# oneDNN, else MKL on an Intel CPU with AVX512-BF16), `onednn` or `mkl`. Both are called with
# row-major operands as they lie (transpose flags, leading dimensions) and run single-threaded:
# the rank's threads split the rows, as for sgemm.

BF16_LIBRARIES = ("auto", "onednn", "mkl")
FAST_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def fast_bf16_flags() -> list[str]:
    """The CPU features that make bf16 matmuls fast, of those this CPU has."""
    flags = cpu_flags()
    return [f for f in FAST_BF16_FLAGS if f in flags]


def bf16_emulation_allowed() -> bool:
    """DISTGPT_BF16_EMULATED=1: accept a bf16 gemm that is not fast here (a CPU without bf16
    instructions, where MKL emulates them; MKL's bf16 on AMD): the same numerics, slower than fp32.
    For tests and debugging only."""
    return os.environ.get("DISTGPT_BF16_EMULATED") == "1"


def _onednn_library_path() -> str | None:
    """Path of libdnnl from the installed `onednn-cpu-gomp` package, or None."""
    return _package_library("onednn-cpu-gomp", "libdnnl.so")


_DNNL_UNIMPLEMENTED = 3


class _DnnlVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int),
                ("hash", ctypes.c_char_p), ("cpu_runtime", ctypes.c_uint), ("gpu_runtime", ctypes.c_uint)]


class _OnednnBf16:
    """oneDNN's dnnl_gemm_bf16bf16f32: row-major, 'N'/'T' flags, 64-bit sizes, returns a status."""

    library = "onednn"
    fast_on = "any CPU with AVX512-BF16 or AMX-BF16"
    _FLAG = {False: b"N", True: b"T"}

    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        # the gomp build runs each call on an OpenMP team sized by the calling thread's
        # omp_get_max_threads(); held to one per thread (set once in each), as MKL is sequential
        self._omp = ctypes.CDLL("libgomp.so.1")
        self._one_thread = threading.local()
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self.fn = self.lib.dnnl_gemm_bf16bf16f32
        self.fn.argtypes = [ctypes.c_char, ctypes.c_char, i64, i64, i64, ctypes.c_float, ptr, i64, ptr, i64,
                            ctypes.c_float, ptr, i64]
        self.fn.restype = ctypes.c_int
        self.lib.dnnl_version.restype = ctypes.POINTER(_DnnlVersion)
        v = self.lib.dnnl_version().contents
        self.name = f"oneDNN {v.major}.{v.minor}.{v.patch} dnnl_gemm_bf16bf16f32"

    def __call__(self, ta: bool, tb: bool, M: int, N: int, K: int, alpha: float, a: int, lda: int, b: int,
                 ldb: int, beta: float, c: int, ldc: int) -> None:
        if not getattr(self._one_thread, "set", False):
            self._omp.omp_set_num_threads(1)
            self._one_thread.set = True
        status = self.fn(self._FLAG[ta], self._FLAG[tb], M, N, K, alpha, a, lda, b, ldb, beta, c, ldc)
        if status:
            unimplemented = status == _DNNL_UNIMPLEMENTED
            why = " (unimplemented: oneDNN's bf16 gemm needs AVX-512)" if unimplemented else ""
            raise BlasError(f"oneDNN's dnnl_gemm_bf16bf16f32 failed on {M}x{K} @ {K}x{N}: "
                            f"dnnl_status_t {status}{why}")


class _MklBf16:
    """MKL's cblas_gemm_bf16bf16f32, called as _OnednnBf16 is."""

    library = "mkl"
    fast_on = "Intel CPUs with AVX512-BF16 or AMX-BF16"

    def __init__(self, mkl: _Mkl):
        self.fn = mkl.gemm_bf16
        self.name = f"MKL {mkl.version} cblas_gemm_bf16bf16f32"

    def __call__(self, ta: bool, tb: bool, M: int, N: int, K: int, alpha: float, a: int, lda: int, b: int,
                 ldb: int, beta: float, c: int, ldc: int) -> None:
        self.fn(_ROW_MAJOR, _TRANS if ta else _NO_TRANS, _TRANS if tb else _NO_TRANS, M, N, K, alpha,
                a, lda, b, ldb, beta, c, ldc)


@functools.cache
def _load_bf16(library: str) -> _OnednnBf16 | _MklBf16 | str:
    """The library's bf16 gemm, or why it cannot be had (not installed, does not load)."""
    if library == "onednn":
        path = _onednn_library_path()
        if path is None:
            return "oneDNN is not installed (pip install onednn-cpu-gomp)"
        try:
            return _OnednnBf16(path)
        except (OSError, AttributeError) as exc:
            return f"oneDNN at {path} cannot be used: {exc}"
    path = _mkl_library_path()
    if path is None:
        return "MKL is not installed (pip install 'distgpt[mkl]')"
    try:
        mkl = _load_mkl(path)
    except (OSError, AttributeError) as exc:
        return f"MKL at {path} cannot be used: {exc}"
    if mkl.gemm_bf16 is None:
        return f"MKL {mkl.version} has no cblas_gemm_bf16bf16f32"
    return _MklBf16(mkl)


def _fast_here(library: str) -> bool:
    if not fast_bf16_flags():
        return False
    return library == "onednn" or _intel_cpu()


_bf16: _OnednnBf16 | _MklBf16 | None = None
_bf16_why_not: str | None = None          # why bf16 matmuls are not fast here, or None
_bf16_chosen = False


def use_bf16(name: str) -> None:
    """Choose the bf16 gemm now: `auto`, `onednn` or `mkl` (what DISTGPT_BF16_GEMM says at first
    use). A library that is named but missing is a BlasError; one that would not be fast on this CPU
    is kept, with the reason bf16_unavailable_reason() gives (unless DISTGPT_BF16_EMULATED=1)."""
    global _bf16, _bf16_why_not, _bf16_chosen
    if name not in BF16_LIBRARIES:
        raise BlasError(f"DISTGPT_BF16_GEMM={name!r}: expected {', '.join(BF16_LIBRARIES)}")
    flags = fast_bf16_flags()
    if name == "auto":
        if "amx_bf16" in flags and not isinstance(_load_bf16("mkl"), str):
            order = ["mkl", "onednn"]              # AMX: MKL's kernels use it
        elif flags:
            order = ["onednn", "mkl"]
        else:                                      # nothing is fast; for emulation MKL runs everywhere
            order = ["mkl", "onednn"]
        found = [(lib, _load_bf16(lib)) for lib in order]
        usable = [(lib, got) for lib, got in found if not isinstance(got, str)]
        fast = [(lib, got) for lib, got in usable if _fast_here(lib)]
        library, _bf16 = (fast or usable or [(None, None)])[0]
        missing = "; ".join(got for _, got in found if isinstance(got, str))
    else:
        got = _load_bf16(name)
        if isinstance(got, str):
            raise BlasError(f"DISTGPT_BF16_GEMM={name} but {got}")
        library, _bf16, missing = name, got, ""
    if not flags:
        _bf16_why_not = "this CPU has neither avx512_bf16 nor amx_bf16 (/proc/cpuinfo)"
    elif _bf16 is None:
        _bf16_why_not = f"bf16 matmuls need oneDNN or MKL: {missing}"
    elif not _fast_here(library):
        _bf16_why_not = (f"{_bf16.name} is fast on {_bf16.fast_on} only, and this CPU is not one "
                         "(install onednn-cpu-gomp, or set DISTGPT_BF16_GEMM=onednn)")
    else:
        _bf16_why_not = None
    if _bf16_why_not is not None and _bf16 is not None and bf16_emulation_allowed():
        _bf16_why_not = None
    _bf16_chosen = True


def _bf16_gemm() -> _OnednnBf16 | _MklBf16 | None:
    if not _bf16_chosen:
        with _choosing:
            if not _bf16_chosen:
                use_bf16(os.environ.get("DISTGPT_BF16_GEMM", "auto"))
    return _bf16


def bf16_unavailable_reason() -> str | None:
    """Why bf16 matmuls would not be fast here, or None when they would be (or may be emulated)."""
    _bf16_gemm()
    return _bf16_why_not


def describe_bf16() -> str:
    """The bf16 gemm library for the run header, and whether it is emulated."""
    lib = _bf16_gemm()
    if lib is None:
        return "no bf16 gemm"
    return lib.name + ("" if _fast_here(lib.library) else " (not fast on this CPU: DISTGPT_BF16_EMULATED=1)")


def _bf16_operand(a: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """a (uint16 bf16 bits) and its BLAS layout; a contiguous copy when the gemm cannot read it as it is."""
    if a.dtype != np.uint16:
        raise TypeError(f"bf16 operands are uint16 arrays of bf16 bits, not {a.dtype}")
    la = _layout(a) if a.flags.aligned else None
    if la is None:
        a = np.ascontiguousarray(a)
        la = _layout(a)
    return a, la


def gemm_bf16(a: np.ndarray, b: np.ndarray, out: np.ndarray, accumulate: bool = False,
              alpha: float = 1.0) -> np.ndarray:
    """out = alpha a @ b, or out += alpha a @ b with `accumulate`: a (M, K) and b (K, N) are bf16
    (uint16 bit patterns, views welcome), out (M, N) float32; products are accumulated in float32."""
    fn = _bf16_gemm()
    if fn is None:
        raise BlasError(f"no bf16 gemm: {_bf16_why_not}")
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
    if lc is None or lc[0] != _NO_TRANS:      # the libraries write row-major C only: via a temporary
        tmp = np.empty((M, N), np.float32)
        gemm_bf16(a, b, tmp, alpha=alpha)
        if accumulate:
            out += tmp
        else:
            out[...] = tmp
        return out
    fn(la[0] == _TRANS, lb[0] == _TRANS, M, N, K, alpha, a.ctypes.data, la[1], b.ctypes.data, lb[1],
       1.0 if accumulate else 0.0, out.ctypes.data, lc[1])
    return out
