"""bfloat16 for the matmuls: conversions, the model's bf16 weight copy, and which precision a run uses.

bf16 is the top half of a float32 (sign, 8 exponent bits, 7 mantissa bits). NumPy has no bf16
dtype, so bf16 arrays here are uint16 arrays of those bit patterns, which the bf16 gemms (oneDNN's
or MKL's, chosen in distgpt/gemm16.py; the CPU's flags are read in distgpt/cpu.py) read directly;
they accumulate in float32.

float32 -> bf16 rounds to nearest, ties to even, as PyTorch's `.to(torch.bfloat16)` does; every
NaN becomes 0xFFFF, PyTorch's NaN on CPUs (the tests compare the bits). bf16 -> float32 is exact.
The conversion is a compiled loop (jit.Kernel) with a NumPy twin doing the same integer
operations, so both give the same bits.

Mixed precision (train.precision) follows PyTorch autocast: float32 master parameters, moments and
gradients; bf16 copies of the matmul weights (Bf16Weights), made once per optimizer step; matmul
inputs rounded to bf16, products accumulated and returned in float32 (attention's too: its
probabilities and their gradient are rounded for the matmuls); LayerNorm, softmax, GELU and the
loss in float32. `auto` uses bf16 only where it is fast: a CPU with AVX512-BF16 or AMX-BF16 and a
bf16 gemm library that uses them (gemm16.configure() says which, and why not).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from distgpt import blas, gemm16, jit
from distgpt.threads import parallel_for

PRECISIONS = ("fp32", "bf16", "auto")
_NAN_BF16 = 0xFFFF
_SIGN_OFF = np.uint32(0x7FFFFFFF)
_INF_BITS = np.uint32(0x7F800000)
_HALF = np.uint32(0x7FFF)            # half a bf16 unit in the low 16 bits, minus one: ties go to the odd bit
_CHUNK = 1 << 16                     # elements per NumPy-twin pass (temporaries stay in cache)


# ----------------------------------------------------------------------------- conversions

def _to_bf16_loop(u, out, half, sign_off, inf_bits):
    one = np.uint32(1)
    for i in range(u.shape[0]):
        x = u[i]
        r = (x + half + ((x >> 16) & one)) >> 16
        out[i] = 0xFFFF if (x & sign_off) > inf_bits else r


_to_bf16_kernel = jit.Kernel(_to_bf16_loop)


def _to_bf16_numpy(u: np.ndarray, out: np.ndarray) -> None:
    """The kernel's twin on flat uint32 bits: the same integer operations, in chunks."""
    for i in range(0, u.shape[0], _CHUNK):
        x = u[i : i + _CHUNK]
        r = (x >> 16) & np.uint32(1)
        r += x
        r += _HALF                   # wraps only for NaNs with the top bits set, which are replaced
        r >>= 16
        r[(x & _SIGN_OFF) > _INF_BITS] = _NAN_BF16
        out[i : i + _CHUNK] = r


def _convert_block(x: np.ndarray, out: np.ndarray) -> None:
    if not (x.flags.c_contiguous and out.flags.c_contiguous):     # strided views: through a copy
        out[...] = to_bf16(np.ascontiguousarray(x))
        return
    u, o = x.view(np.uint32).reshape(-1), out.reshape(-1)
    if jit.enabled():
        _to_bf16_kernel(u, o, _HALF, _SIGN_OFF, _INF_BITS)
    else:
        _to_bf16_numpy(u, o)


def to_bf16(x: np.ndarray, out: np.ndarray | None = None, parallel: bool = False) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even; NaN -> 0xFFFF. With `parallel`, the
    rows (first axis) are split over the rank's threads."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise TypeError(f"to_bf16 takes float32, not {x.dtype}")
    if out is None:
        out = np.empty(x.shape, np.uint16)
    if out.shape != x.shape or out.dtype != np.uint16:
        raise ValueError(f"to_bf16: output {out.dtype}{out.shape} for input {x.shape}")
    if x.ndim == 0:
        _convert_block(x.reshape(1), out.reshape(1))
    elif parallel and x.ndim >= 1:
        parallel_for(x.shape[0], lambda lo, hi: _convert_block(x[lo:hi], out[lo:hi]), grain=16)
    else:
        _convert_block(x, out)
    return out


def to_float32(b: np.ndarray, out: np.ndarray | None = None, parallel: bool = False) -> np.ndarray:
    """bf16 bits (uint16) -> float32, exact; into `out` (C-contiguous, b's shape) when given, rows
    split over the threads with `parallel`."""
    b = np.asarray(b)
    if b.dtype != np.uint16:
        raise TypeError(f"to_float32 takes uint16 bf16 bits, not {b.dtype}")
    if out is None:
        return (b.astype(np.uint32) << 16).view(np.float32)
    if out.shape != b.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"to_float32: output {out.dtype}{out.shape} for input {b.shape}")

    b2, o2 = b.reshape(b.shape[0] if b.ndim else 1, -1), out.reshape(b.shape[0] if b.ndim else 1, -1)

    def work(lo: int, hi: int) -> None:
        np.left_shift(b2[lo:hi], 16, out=o2[lo:hi].view(np.uint32), dtype=np.uint32)
    if parallel:
        parallel_for(b2.shape[0], work, grain=16)
    else:
        work(0, b2.shape[0])
    return out


def _sum_bf16_loop(parts, out):
    # (a blocked version, a vectorisable shift pass then an add pass per part, measured slower:
    # 0.20 s against 0.13 for 2 x 62M on one core of the AMD EPYC)
    bits = np.empty(1, np.uint32)
    value = bits.view(np.float32)       # the bits reinterpreted: a bf16 widened to float32, exactly
    for i in range(parts.shape[1]):
        acc = np.float32(0.0)
        for q in range(parts.shape[0]):
            bits[0] = np.uint32(parts[q, i]) << np.uint32(16)
            acc += value[0]
        out[i] = acc


_sum_bf16_kernel = jit.Kernel(_sum_bf16_loop)


def sum_bf16(parts: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[i] = parts[0, i] + parts[1, i] + ... in float32, in that order: bf16 gradients from
    every rank (rows of uint16 bits) summed on arrival. No float32 temporaries of the parts."""
    if parts.dtype != np.uint16 or parts.ndim != 2 or out.dtype != np.float32 or out.shape != parts.shape[1:]:
        raise ValueError(f"sum_bf16: parts {parts.dtype}{parts.shape} into {out.dtype}{out.shape}")
    if jit.enabled():
        _sum_bf16_kernel(parts, out)
        return out
    wide = np.empty(min(_CHUNK, out.shape[0]), np.uint32)
    for i in range(0, out.shape[0], _CHUNK):          # the twin: the same additions, in chunks
        blk = out[i : i + _CHUNK]
        w = wide[: blk.shape[0]]
        blk[:] = 0.0
        for q in range(parts.shape[0]):
            np.left_shift(parts[q, i : i + _CHUNK], 16, out=w, dtype=np.uint32)
            blk += w.view(np.float32)
    return out


def round_bf16(x: np.ndarray) -> np.ndarray:
    """x rounded to the nearest bf16, as float32 (what a bf16 matmul sees of x)."""
    return to_float32(to_bf16(np.asarray(x, np.float32)))


# ----------------------------------------------------------------------------- the weight copy

class Bf16Weights:
    """The bf16 copy of a model's matmul weights, and the one owner of its state: the buffer, the
    flat ranges it holds (Layout.matmul_weight_ranges), when it is stale, and which slice this rank
    remakes. The model only reads it (for_pass); whoever updates the parameters says so (changed).

    The copy is a uint16 vector in the parameters' flat layout; only `ranges` are ever written.
    - Private (the default, one per process): a change marks it stale, and the next pass
      (for_pass) converts all of it.
    - Shared (`shared`: one buffer for the ranks of a node, whose parameters are shared too, as
      ZeRO-1 on one node keeps them): changed(lo, hi) converts this rank's part of [lo, hi) at
      once (`rank_slice`: the parameters this rank updates); after the node's barrier, current().
      A pass never converts a shared copy: each rank would convert all of it, the node's work
      times its ranks, rewriting slices the others read.
    `converted` counts the elements converted so far (profiles and tests: one slice per rank per
    step)."""

    def __init__(self, params: np.ndarray, ranges: Sequence[tuple[int, int]],
                 shared: np.ndarray | None = None, rank_slice: tuple[int, int] | None = None):
        if params.dtype != np.float32 or params.ndim != 1:
            raise ValueError(f"bf16 weight copy of {params.dtype}{params.shape} parameters: expected a flat "
                             "float32 vector")
        if shared is not None and (shared.shape != params.shape or shared.dtype != np.uint16):
            raise ValueError(f"bf16 weight buffer {shared.dtype}{shared.shape}, "
                             f"expected uint16{params.shape}")
        self.params = params
        self.ranges = tuple((int(a), int(b)) for a, b in ranges)
        self.shared = shared is not None
        self.bits = shared if shared is not None else np.zeros(params.shape, np.uint16)
        self.rank_slice = (0, params.size) if rank_slice is None else (int(rank_slice[0]), int(rank_slice[1]))
        self.stale = True               # nothing converted yet (a shared buffer may hold anything)
        self.converted = 0

    def elements(self, lo: int = 0, hi: int | None = None) -> int:
        """How many elements of the copy lie in the flat range [lo, hi) (all of them by default)."""
        hi = self.params.size if hi is None else hi
        return sum(max(0, min(b, hi) - max(a, lo)) for a, b in self.ranges)

    def convert(self, lo: int = 0, hi: int | None = None) -> None:
        """Remake the copy's elements in the flat range [lo, hi) (all of them by default), now."""
        hi = self.params.size if hi is None else hi
        for a, b in self.ranges:
            s, e = max(a, lo), min(b, hi)
            if s < e:
                to_bf16(self.params[s:e], self.bits[s:e], parallel=True)
                self.converted += e - s

    def changed(self, lo: int = 0, hi: int | None = None) -> None:
        """This rank updated the parameters in [lo, hi). Private: the next pass remakes the copy.
        Shared: this rank's part of [lo, hi) is converted now; the copy is current again once
        every rank has converted its part (the caller's barrier, then current())."""
        if self.shared:
            a, b = self.rank_slice
            self.convert(max(a, lo), min(b, self.params.size if hi is None else hi))
        self.stale = True

    def changed_all(self) -> None:
        """Every parameter changed (a broadcast, a checkpoint load): changed(0, all)."""
        self.changed(0, self.params.size)

    def current(self) -> None:
        """Shared: every rank has converted its slice (the caller is past the node's barrier). A
        private copy is remade by its next pass, so this changes nothing there."""
        if self.shared:
            self.stale = False

    def for_pass(self) -> np.ndarray:
        """The copy, up to date for a forward or backward pass: a stale private copy is remade here,
        whole. A stale shared copy is a caller's bug: its ranks remake it between changed() and
        current()."""
        if self.stale:
            if self.shared:
                raise RuntimeError("the shared bf16 weight copy is not current: after changed(), every rank "
                                   "converts its slice, then current() (after the node's barrier)")
            self.convert()
            self.stale = False
        return self.bits


# ----------------------------------------------------------------------------- scratch

class Workspace:
    """Reused bf16 buffers for the matmul inputs a layer converts per call, one per slot name, grown
    as needed: a fresh array per call would be page-faulted in on every step."""

    def __init__(self):
        self._bufs: dict[str, np.ndarray] = {}

    def get(self, slot: str, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape))
        buf = self._bufs.get(slot)
        if buf is None or buf.size < n:
            buf = self._bufs[slot] = np.empty(n, np.uint16)
        return buf[:n].reshape(shape)


# ----------------------------------------------------------------------------- which precision

def resolve(precision: str) -> str:
    """`fp32` or `bf16` for train.precision: `auto` is bf16 where it is fast, else fp32; an explicit
    `bf16` where it is not is a BlasError (a one-line user error) naming why."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return "fp32"
    reason = gemm16.configure().why_not
    if reason is None:
        return "bf16"
    if precision == "bf16":
        raise blas.BlasError(f"train.precision=bf16 but {reason}; use train.precision=fp32 or auto")
    return "fp32"


def describe(precision: str) -> str:
    """One line for the run header: the precision, and for bf16 the library and CPU features."""
    if precision == "fp32":
        return "precision: fp32"
    choice = gemm16.configure()
    cpu = ", ".join(choice.fast_flags) or "no bf16 instructions"
    return (f"precision: bf16 matmuls (fp32 master weights, accumulation, norms, softmax, loss) via "
            f"{choice.describe()}; CPU: {cpu}")
