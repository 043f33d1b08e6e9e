"""Compiled loops (numba) for the few kernels NumPy cannot fuse.

NumPy runs every ufunc as its own pass over the data. That is fine for matmuls, but an update like
AdamW's is fourteen ufuncs per element, each a pass over memory even on cache-sized chunks, where
one compiled loop reads each array once (measured by benchmarks/bench_adamw.py). numba compiles such
a loop from plain Python on first use and caches the machine code next to this package, or in
~/.cache/numba, or in $NUMBA_CACHE_DIR; with none of them writable it compiles on every run (about
half a second) and says so.

Every compiled kernel has a NumPy twin doing the same float operations in the same order; the twin
runs when numba is not installed or DISTGPT_JIT=0 is set, and the tests hold the two to bitwise
equality. Kernels run with `nogil`, so the rank's threads (threads.parallel_for) can split them.
numba (and LLVM) are imported on a kernel's first call, so commands that never run one (sampling,
data preparation) do not pay the ~0.3 s it takes.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
import warnings
from collections.abc import Callable
from typing import Any

from distgpt import switches

_compile_lock = threading.Lock()


@functools.cache                               # enabled() runs once per elementwise block
def numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None


def enabled() -> bool:
    """True when compiled kernels are used: numba is installed and DISTGPT_JIT is not 0."""
    return switches.get("DISTGPT_JIT") == "1" and numba_installed()


class Kernel:
    """A plain-Python loop, compiled to machine code by numba on its first call. IEEE arithmetic:
    no fast-math reordering or fused multiply-adds, so results match the NumPy twin exactly."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self._compiled: Callable | None = None

    def _compile(self) -> Callable:
        import numba

        # error_model="numpy": x / 0 gives inf or nan as in NumPy instead of raising, which also
        # leaves the loop free of checks, so LLVM can vectorise it.
        options = dict(nogil=True, error_model="numpy", boundscheck=False)
        try:
            return numba.njit(cache=True, **options)(self.fn)
        except RuntimeError as e:              # "cannot cache function ...: no locator available"
            warnings.warn(f"numba cannot cache {self.fn.__name__} ({e}); compiling it on every run. "
                          f"Set NUMBA_CACHE_DIR to a writable directory to keep it.", stacklevel=3)
            return numba.njit(**options)(self.fn)

    def __call__(self, *args: Any) -> Any:
        if self._compiled is None:
            with _compile_lock:                # the rank's threads may all arrive at once
                if self._compiled is None:
                    self._compiled = self._compile()
        return self._compiled(*args)
