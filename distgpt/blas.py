"""Which library runs the big 2-D float32 matmuls: NumPy's own BLAS, or Intel MKL when it is
installed. (The bf16 gemm of bf16 models is distgpt/gemm16.py's; its names are re-exported below.)

NumPy's wheels bring OpenBLAS. On Intel CPUs, MKL's sgemm is 15-30% faster on the shapes a rank
sees most when its batch is small (128 x 768 times 768 x 3072 and the like, see benchmarks/README.md)
and ~7% faster on big square ones. `pip install distgpt[mkl]` installs Intel's `mkl` wheel; its
`cblas_sgemm`/`cblas_dgemm` are then called through ctypes (which releases the GIL, so the rank's
threads can split a matmul as they do with NumPy's).

DISTGPT_BLAS chooses (`choose`, a pure function of the value, the CPU and the MKL install):
- `auto` (default): MKL when the `mkl` package is installed and the CPU is an Intel one (on AMD
  MKL may pick slower kernels), else NumPy;
- `mkl`: MKL, or an error if it is not installed;
- `numpy`: NumPy's BLAS.
The choice is made once per process: `use` sets it (tests, benchmarks), else `configure` makes it
from DISTGPT_BLAS on its first call (train's start, or the first gemm).

MKL runs sequential here: a rank's threads come from distgpt.threads, one per core, as with
OpenBLAS held to one thread. (torch, imported after MKL is loaded, takes its default thread count
from MKL's and so starts with 1: a process that uses both should call torch.set_num_threads.)
Results differ from OpenBLAS's in the last bits (another summation order), never in more than
rounding: the tests hold both to PyTorch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from distgpt.cpu import Cpu, this_cpu
from distgpt.native import (
    NO_TRANS,
    ROW_MAJOR,
    BlasError,
    ProcessChoice,
    layout,
    load_mkl,
    mkl_library_path,
    switch,
)

BACKENDS = ("auto", "mkl", "numpy")
SMALL_M = 16     # at most this many rows: NumPy's BLAS (see gemm)


@dataclass(frozen=True)
class Choice:
    """The process's fp32 gemm."""

    asked: str                                              # the DISTGPT_BLAS value it was made for
    library: str                                            # "mkl" or "numpy"
    gemms: Mapping[np.dtype, Callable[..., None]]           # cblas_?gemm by dtype; empty for NumPy's
    description: str                                        # for the run header


NUMPY_NAME = "NumPy's BLAS"


def choose(name: str, cpu: Cpu, mkl_path: str | None) -> str:
    """`mkl` or `numpy` for DISTGPT_BLAS=`name` on `cpu`, with MKL installed at `mkl_path` (None: not
    installed). An unknown name, or `mkl` without MKL, is a BlasError."""
    if name not in BACKENDS:
        raise BlasError(f"DISTGPT_BLAS={name!r}: expected auto, mkl or numpy")
    if name == "mkl" and mkl_path is None:
        raise BlasError("DISTGPT_BLAS=mkl but the `mkl` package is not installed "
                        "(pip install 'distgpt[mkl]', or DISTGPT_BLAS=numpy)")
    return "mkl" if name == "mkl" or (name == "auto" and mkl_path is not None and cpu.intel) else "numpy"


def load(name: str | None = None, *, cpu: Cpu | None = None,
         mkl_path: str | None | Literal["installed"] = "installed") -> Choice:
    """`choose` on this machine, MKL loaded if chosen: `name` (default DISTGPT_BLAS) on `cpu` (default
    this one), MKL from `mkl_path` (default the installed package's). An MKL that does not load is
    a BlasError when named, else a warning and NumPy's BLAS. Sets nothing."""
    name = switch("DISTGPT_BLAS") if name is None else name
    path = mkl_library_path() if mkl_path == "installed" else mkl_path
    if choose(name, this_cpu() if cpu is None else cpu, path) == "mkl":
        assert path is not None                           # choose takes MKL only where there is one
        try:
            mkl = load_mkl(path)
        except (OSError, AttributeError) as exc:          # a broken install: say so, or use NumPy
            if name == "mkl":
                raise BlasError(f"DISTGPT_BLAS=mkl but MKL at {path} cannot be used: {exc}") from exc
            warnings.warn(f"MKL at {path} cannot be used ({exc}); the matmuls use NumPy's BLAS",
                          stacklevel=2)
        else:
            return Choice(name, "mkl", dict(mkl.gemm), f"MKL {mkl.version} ({mkl.mode})")
    return Choice(name, "numpy", {}, NUMPY_NAME)


_choice = ProcessChoice(load)


def use(choice: Choice | str | None) -> Choice | None:
    """Make `choice` the process's fp32 gemm (a DISTGPT_BLAS value is load()ed first; None leaves the choice
    to configure()); returns the one it replaces, for a test to put back."""
    return _choice.use(choice)


def configure() -> Choice:
    """The process's fp32 gemm: the one use() set, else chosen now from DISTGPT_BLAS, once."""
    return _choice.configure()


def using_mkl() -> bool:
    """True when gemm goes to MKL."""
    return configure().library == "mkl"


def describe() -> str:
    """One line for the run header: which library does the matmuls."""
    return configure().description


def gemm(a: np.ndarray, b: np.ndarray, out: np.ndarray, accumulate: bool = False) -> np.ndarray:
    """out = a @ b, or out += a @ b with `accumulate`, for 2-D arrays (views welcome)."""
    fn = configure().gemms.get(out.dtype)
    M, K = a.shape
    N = out.shape[1]
    # a few rows (decoding, a short prompt) make a product bound by reading b from memory, which
    # NumPy's OpenBLAS streams faster than MKL's sgemm (GPT-2 124M sampling with the KV cache:
    # 30 -> 43 tokens/s, a 16-token prefill 97 -> 74 ms; training's row blocks are >= 64 rows)
    if (fn is not None and M > SMALL_M and a.dtype == b.dtype == out.dtype and N and K and out.flags.writeable
            and a.flags.aligned and b.flags.aligned and out.flags.aligned
            and not np.may_share_memory(out, a) and not np.may_share_memory(out, b)):
        la, lb, lc = layout(a), layout(b), layout(out)
        if la and lb and lc and lc[0] == NO_TRANS and b.shape == (K, N) and out.shape == (M, N):
            fn(ROW_MAJOR, la[0], lb[0], M, N, K, 1.0, a.ctypes.data, la[1], b.ctypes.data, lb[1],
               1.0 if accumulate else 0.0, out.ctypes.data, lc[1])
            return out
    if accumulate:
        out += a @ b
    else:
        np.matmul(a, b, out=out)
    return out
