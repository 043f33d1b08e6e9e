"""The native matmul libraries as ctypes sees them: where the installed wheels keep them, Intel MKL
loaded once per process (blas's sgemm and gemm16's bf16 gemm share it), and how a NumPy array is
passed as a row-major BLAS operand. distgpt/blas.py and distgpt/gemm16.py choose among them.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import numpy as np

from distgpt import switches

T = TypeVar("T")

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
_SEQUENTIAL = 1                                # MKL_THREADING_SEQUENTIAL
_LP64 = 0                                      # MKL_INTERFACE_LP64: 32-bit integer arguments


class BlasError(RuntimeError):
    """A matmul library that is asked for and cannot be had, or fails: a one-line user error."""


def switch(name: str) -> str:
    """switches.get(name), a bad value raised as a BlasError (the user error train reports in one line)."""
    try:
        return switches.get(name)
    except switches.SwitchError as exc:
        raise BlasError(str(exc)) from exc


@functools.cache
def package_library(package: str, prefix: str) -> str | None:
    """Path of the shared library named prefix* that the installed `package` ships, or None."""
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = sorted(str(f.locate()) for f in files
                   if f.name.startswith(prefix) and not f.name.endswith((".a", ".lib")))
    return found[0] if found else None


def mkl_library_path() -> str | None:
    """Path of libmkl_rt from the installed `mkl` package, or None."""
    return package_library("mkl", "libmkl_rt.so") or package_library("mkl", "mkl_rt")


def onednn_library_path() -> str | None:
    """Path of libdnnl from the installed `onednn-cpu-gomp` package, or None."""
    return package_library("onednn-cpu-gomp", "libdnnl.so")


class Mkl:
    """libmkl_rt, sequential, 32-bit integers: its sgemm and dgemm, and its bf16 gemm where it has one."""

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
        emulates them (slowly) where it does not: gemm16.choose decides whether to use it."""
        try:
            fn = self.lib.cblas_gemm_bf16bf16f32
        except AttributeError:
            return None
        fn.argtypes = [*[ctypes.c_int] * 6, ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                       ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
        fn.restype = None
        return fn


@functools.cache
def load_mkl(path: str) -> Mkl:
    """One Mkl per process and path: the fp32 gemm and the bf16 gemm share it. OSError or
    AttributeError where the library does not load or lacks a symbol (a broken install)."""
    return Mkl(path)


def layout(a: np.ndarray) -> tuple[int, int] | None:
    """(transpose flag, leading dimension) of a 2-D array as a row-major BLAS operand, or None when
    neither it nor its transpose has unit column stride."""
    rows, cols = a.shape
    s0, s1 = a.strides
    e = a.itemsize
    if (s1 == e or cols == 1) and s0 % e == 0 and s0 // e >= max(1, cols):
        return NO_TRANS, s0 // e
    if (s0 == e or rows == 1) and s1 % e == 0 and s1 // e >= max(1, rows):
        return TRANS, s1 // e
    return None


class ProcessChoice(Generic[T]):
    """A library choice made once per process: set explicitly (`use`, which returns the choice it
    replaces, for a test to put back), or made by `load()` on first need (`configure`). The first
    need may come from several threads at once, hence the lock."""

    def __init__(self, load: Callable[..., T]):
        self._load = load
        self._current: T | None = None
        self._lock = threading.Lock()

    def use(self, choice: T | str | None) -> T | None:
        new = self._load(choice) if isinstance(choice, str) else choice
        with self._lock:
            previous, self._current = self._current, new
        return previous

    def configure(self) -> T:
        choice = self._current
        if choice is None:
            with self._lock:
                if self._current is None:
                    self._current = self._load()
                choice = self._current
        return choice
