"""The bf16 gemm for bf16 models (train.precision): bf16 inputs, float32 accumulation and output.

Two libraries have one, and which is faster depends on the CPU (benchmarks/bench_gemm.py, one core):
- oneDNN's dnnl_gemm_bf16bf16f32 (the `onednn-cpu-gomp` wheel, a dependency on x86-64 Linux:
  39 MB download, no dependencies of its own) uses AVX512-BF16 on any vendor's CPU: 370-425
  GFLOP/s on GPT-2's shapes on an AMD Zen 5, against 78-90 for sgemm.
- MKL's cblas_gemm_bf16bf16f32 (the optional `mkl` extra, ~700 MB) uses AMX on Intel Xeons
  (700-1,040 GFLOP/s on a Sapphire Rapids-class core), but on AMD it runs no faster than sgemm
  (74-92 GFLOP/s on the same Zen 5): it does not use AVX512-BF16 there.
Both are called with row-major operands as they lie (transpose flags, leading dimensions) and run
single-threaded: the rank's threads split the rows, as for sgemm.

The choice is made once per process. `choose` is the rule, a pure function of the DISTGPT_BF16_GEMM
value, the CPU, the libraries that load and whether emulation is accepted: `auto` takes MKL where the
CPU has AMX-BF16 and MKL loads, else oneDNN, else MKL on an Intel CPU with AVX512-BF16; a library
that would not be fast here is kept, with the reason (`Choice.why_not`) that makes train.precision
`auto` fall back to fp32 and `bf16` an error, unless DISTGPT_BF16_EMULATED=1 accepts it (MKL
emulates bf16 instructions a CPU lacks: the same numerics, slower than fp32; the tests use it).
`load` applies the rule to this machine, `use` makes a Choice the process's, and `configure` makes
it from the switches on the first call (train's start, or the first bf16 gemm) unless `use` came first.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from distgpt import native
from distgpt.cpu import Cpu, this_cpu
from distgpt.native import NO_TRANS, ROW_MAJOR, TRANS, BlasError, ProcessChoice, layout, switch

BF16_LIBRARIES = ("auto", "onednn", "mkl")
FAST_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
FAST_ON = {"onednn": "any CPU with AVX512-BF16 or AMX-BF16", "mkl": "Intel CPUs with AVX512-BF16 or AMX-BF16"}


def fast_flags(flags: frozenset[str]) -> list[str]:
    """The CPU features that make bf16 matmuls fast, of those in `flags`."""
    return [f for f in FAST_BF16_FLAGS if f in flags]


def fast_on(library: str, cpu: Cpu) -> bool:
    """Whether the library's bf16 gemm uses the CPU's bf16 instructions: oneDNN's on any vendor's,
    MKL's on Intel's only (FAST_ON)."""
    return bool(fast_flags(cpu.flags)) and (library == "onednn" or cpu.intel)


def emulation_allowed() -> bool:
    """DISTGPT_BF16_EMULATED=1: accept a bf16 gemm that is not fast here (a CPU without bf16
    instructions, where MKL emulates them; MKL's bf16 on AMD): the same numerics, slower than fp32.
    For tests and debugging only."""
    return switch("DISTGPT_BF16_EMULATED") == "1"


class Bf16Gemm(Protocol):
    """C = alpha op(A) op(B) + beta C, row-major, A and B bf16 bits, C float32; pointers as ints."""

    name: str                                   # library, version and function, for the run header

    def __call__(self, ta: bool, tb: bool, M: int, N: int, K: int, alpha: float, a: int, lda: int, b: int,
                 ldb: int, beta: float, c: int, ldc: int) -> None: ...


_DNNL_UNIMPLEMENTED = 3


class _DnnlVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int),
                ("hash", ctypes.c_char_p), ("cpu_runtime", ctypes.c_uint), ("gpu_runtime", ctypes.c_uint)]


class _OnednnBf16:
    """oneDNN's dnnl_gemm_bf16bf16f32: row-major, 'N'/'T' flags, 64-bit sizes, returns a status."""

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

    def __init__(self, mkl: native.Mkl):
        self.fn = mkl.gemm_bf16
        self.name = f"MKL {mkl.version} cblas_gemm_bf16bf16f32"

    def __call__(self, ta: bool, tb: bool, M: int, N: int, K: int, alpha: float, a: int, lda: int, b: int,
                 ldb: int, beta: float, c: int, ldc: int) -> None:
        self.fn(ROW_MAJOR, TRANS if ta else NO_TRANS, TRANS if tb else NO_TRANS, M, N, K, alpha,
                a, lda, b, ldb, beta, c, ldc)


@functools.cache
def load_library(library: str) -> Bf16Gemm | str:
    """The library's bf16 gemm (`onednn` or `mkl`), or why it cannot be had (not installed, does not load)."""
    if library == "onednn":
        path = native.onednn_library_path()
        if path is None:
            return "oneDNN is not installed (pip install onednn-cpu-gomp)"
        try:
            return _OnednnBf16(path)
        except (OSError, AttributeError) as exc:
            return f"oneDNN at {path} cannot be used: {exc}"
    path = native.mkl_library_path()
    if path is None:
        return "MKL is not installed (pip install 'distgpt[mkl]')"
    try:
        mkl = native.load_mkl(path)
    except (OSError, AttributeError) as exc:
        return f"MKL at {path} cannot be used: {exc}"
    if mkl.gemm_bf16 is None:
        return f"MKL {mkl.version} has no cblas_gemm_bf16bf16f32"
    return _MklBf16(mkl)


@dataclass(frozen=True)
class Choice:
    """The process's bf16 gemm, and whether bf16 matmuls are fast with it."""

    asked: str                        # the DISTGPT_BF16_GEMM value it was made for
    library: str | None               # "onednn" or "mkl"; None where neither loads
    gemm: Bf16Gemm | None
    fast: bool                        # the library uses this CPU's bf16 instructions
    why_not: str | None               # why bf16 matmuls would not be fast; None if fast or emulation accepted
    fast_flags: tuple[str, ...]       # the CPU's bf16 features (the run header)

    def describe(self) -> str:
        """The library for the run header, and whether it is emulated."""
        if self.gemm is None:
            return "no bf16 gemm"
        return self.gemm.name + ("" if self.fast else " (not fast on this CPU: DISTGPT_BF16_EMULATED=1)")


def choose(name: str, cpu: Cpu, libraries: Mapping[str, Bf16Gemm | str], emulated: bool) -> Choice:
    """The bf16 gemm for DISTGPT_BF16_GEMM=`name` on `cpu`, given what each library's load gave (its
    gemm, or why it cannot be had; `auto` needs both, a named library itself) and whether a gemm that
    is not fast may be used. A named library that is missing, or an unknown name, is a BlasError."""
    if name not in BF16_LIBRARIES:
        raise BlasError(f"DISTGPT_BF16_GEMM={name!r}: expected {', '.join(BF16_LIBRARIES)}")
    flags = fast_flags(cpu.flags)
    if name == "auto":
        if "amx_bf16" in flags and not isinstance(libraries["mkl"], str):
            order = ["mkl", "onednn"]              # AMX: MKL's kernels use it
        elif flags:
            order = ["onednn", "mkl"]
        else:                                      # nothing is fast; for emulation MKL runs everywhere
            order = ["mkl", "onednn"]
        usable = [lib for lib in order if not isinstance(libraries[lib], str)]
        quick = [lib for lib in usable if fast_on(lib, cpu)]
        library = (quick or usable or [None])[0]
        missing = "; ".join(got for lib in order if isinstance(got := libraries[lib], str))
    else:
        if isinstance(got := libraries[name], str):
            raise BlasError(f"DISTGPT_BF16_GEMM={name} but {got}")
        library, missing = name, ""
    gemm = None if library is None else libraries[library]
    fast = library is not None and fast_on(library, cpu)
    if not flags:
        why_not = "this CPU has neither avx512_bf16 nor amx_bf16 (/proc/cpuinfo)"
    elif gemm is None:
        why_not = f"bf16 matmuls need oneDNN or MKL: {missing}"
    elif not fast:
        why_not = (f"{gemm.name} is fast on {FAST_ON[library]} only, and this CPU is not one "
                   "(install onednn-cpu-gomp, or set DISTGPT_BF16_GEMM=onednn)")
    else:
        why_not = None
    if why_not is not None and gemm is not None and emulated:
        why_not = None
    return Choice(name, library, gemm, fast, why_not, tuple(flags))


def load(name: str | None = None, *, cpu: Cpu | None = None, emulated: bool | None = None,
         loader: Callable[[str], Bf16Gemm | str] = load_library) -> Choice:
    """`choose` on this machine: `name` (default DISTGPT_BF16_GEMM) on `cpu` (default this one) with
    the libraries `loader` loads, `emulated` defaulting to DISTGPT_BF16_EMULATED. Sets nothing."""
    name = switch("DISTGPT_BF16_GEMM") if name is None else name
    cpu = this_cpu() if cpu is None else cpu
    emulated = emulation_allowed() if emulated is None else emulated
    if name not in BF16_LIBRARIES:
        wanted: tuple[str, ...] = ()               # choose says why
    elif name != "auto":
        wanted = (name,)
    elif fast_flags(cpu.flags) and "amx_bf16" not in cpu.flags:
        wanted = ("onednn", "mkl")                 # loaded in the order choose tries them
    else:
        wanted = ("mkl", "onednn")
    return choose(name, cpu, {lib: loader(lib) for lib in wanted}, emulated)


_choice = ProcessChoice(load)


def use(choice: Choice | str | None) -> Choice | None:
    """Make `choice` the process's bf16 gemm (a DISTGPT_BF16_GEMM value is load()ed first; None
    leaves the choice to configure()); returns the one it replaces, for a test to put back."""
    return _choice.use(choice)


def configure() -> Choice:
    """The process's bf16 gemm: the one use() set, else chosen now from DISTGPT_BF16_GEMM, once."""
    return _choice.configure()


def describe() -> str:
    """The bf16 gemm library for the run header, and whether it is emulated."""
    return configure().describe()


def _operand(a: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """a (uint16 bf16 bits) and its BLAS layout; a contiguous copy when the gemm cannot read it as it is."""
    if a.dtype != np.uint16:
        raise TypeError(f"bf16 operands are uint16 arrays of bf16 bits, not {a.dtype}")
    la = layout(a) if a.flags.aligned else None
    if la is None:
        a = np.ascontiguousarray(a)
        la = layout(a)
    return a, la


def gemm_bf16(a: np.ndarray, b: np.ndarray, out: np.ndarray, accumulate: bool = False,
              alpha: float = 1.0) -> np.ndarray:
    """out = alpha a @ b, or out += alpha a @ b with `accumulate`: a (M, K) and b (K, N) are bf16
    (uint16 bit patterns, views welcome), out (M, N) float32; products are accumulated in float32."""
    choice = configure()
    fn = choice.gemm
    if fn is None:
        raise BlasError(f"no bf16 gemm: {choice.why_not}")
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
    a, la = _operand(a)
    b, lb = _operand(b)
    lc = layout(out) if out.flags.aligned else None
    if lc is None or lc[0] != NO_TRANS:      # the libraries write row-major C only: via a temporary
        tmp = np.empty((M, N), np.float32)
        gemm_bf16(a, b, tmp, alpha=alpha)
        if accumulate:
            out += tmp
        else:
            out[...] = tmp
        return out
    fn(la[0] == TRANS, lb[0] == TRANS, M, N, K, alpha, a.ctypes.data, la[1], b.ctypes.data, lb[1],
       1.0 if accumulate else 0.0, out.ctypes.data, lc[1])
    return out
