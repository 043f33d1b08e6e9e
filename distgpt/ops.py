"""Forward/backward pairs for the GPT-2 layers, written against NumPy/BLAS.

Conventions:
- Activations are 2-D (rows = batch x time, cols = features) so every big matmul is one BLAS gemm.
- Weights are stored (in_features, out_features), as Hugging Face's GPT-2 Conv1D stores them,
  so a layer is `x @ w + b`.
- A backward function *accumulates* into the weight-gradient arrays it is given (gradient
  accumulation over micro-batches and the tied embedding both need `+=`), or overwrites them when
  called with accumulate=False (the first micro-batch of a step), and writes the gradient of its
  input.

Speed: NumPy runs each ufunc as one pass over memory on one thread. The elementwise kernels here
therefore walk their rows in cache-sized blocks (a chain of ufuncs on a block stays in cache) and
split the blocks over the rank's threads (distgpt.threads): ufuncs and BLAS calls release the GIL.
Big matmuls are split by rows over the same threads, BLAS itself running single-threaded inside them.
The big 2-D matmuls go through blas.gemm: NumPy's BLAS, or MKL where it is installed and faster.

Mixed precision (distgpt/bf16.py): the layers that multiply matrices come in two versions, float32
and bf16 (`linear_forward` and `linear_forward_bf16`, ...), and a model picks one table of them
once, from its precision (`kernels`: Fp32Kernels or Bf16Kernels). The bf16 ones take the bf16 copy
of a weight (`w16`, uint16 bits), round their other matmul inputs to bf16 into the buffers of a
bf16.Workspace their caller owns, and multiply through the bf16 gemm (gemm16.gemm_bf16),
accumulating in float32; bf16 attention takes q/k/v as bf16 bits. Everything else (bias, norms,
softmax, the loss) stays float32.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from distgpt import bf16, blas, gemm16, jit
from distgpt.threads import n_threads, parallel_for

GELU_C = math.sqrt(2.0 / math.pi)
LN_EPS = 1e-5
# Elements per block of the elementwise kernels: 512 KiB of float32. Smaller blocks lose more to
# per-call overhead than they gain in cache (one thread, GELU backward on 1024 x 3072: 32K 18.2 ms,
# 128K 17.0 ms; LayerNorm 3.6 vs 2.2 ms), and with two threads they queue for the GIL between
# their many short ufunc calls (LayerNorm 3x slower with 32K).
BLOCK_ELEMS = 1 << 17
ATTN_BLOCK = 128               # query rows per attention block
# bf16: twice the rows, half the calls into the bf16 gemm, each more efficient (one core, GPT-2
# heads: attention forward + backward 8.2 -> 5.7 ms at T = 256, no change at T = 1024)
ATTN_BLOCK_BF16 = 256


def _row_split(gemm, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    def work(lo: int, hi: int) -> None:
        gemm(a[lo:hi], b, out[lo:hi])
    parallel_for(a.shape[0], work, grain=64)
    return out


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = a @ b for 2-D float arrays, rows of `a` split over the threads (blas.gemm)."""
    if a.dtype == np.uint16 or b.dtype == np.uint16:    # NumPy would multiply the bits as integers
        raise TypeError("ops.matmul multiplies floats: bf16 bits (uint16) go through ops.matmul_bf16")
    return _row_split(blas.gemm, a, b, out)


def matmul_bf16(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = a @ b for bf16 bits (uint16) a and b, float32 out, rows of `a` split over the threads
    (gemm16.gemm_bf16)."""
    return _row_split(gemm16.gemm_bf16, a, b, out)


def _bf16_input(x: np.ndarray) -> bool:
    """True if a bf16 layer's input x is stored as bf16 bits already (a bf16 model keeps the
    activations that only feed matmuls so), False if it is float32 and the layer rounds it."""
    if x.dtype not in (np.float32, np.uint16):
        raise TypeError(f"a bf16 layer takes float32 or bf16 bits (uint16) inputs, not {x.dtype}")
    return x.dtype == np.uint16


def _row_blocks(lo: int, hi: int, cols: int, min_rows: int = 1):
    """Row slices of [lo, hi) holding about BLOCK_ELEMS elements each (at least min_rows rows)."""
    step = max(min_rows, BLOCK_ELEMS // max(1, cols))
    for r in range(lo, hi, step):
        yield slice(r, min(hi, r + step))


# ----------------------------------------------------------------------------- layernorm

def layernorm_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, out: np.ndarray,
                      xhat: np.ndarray) -> np.ndarray:
    """out = (x - mean) / std * w + b over the last axis. Fills `xhat`, returns rstd (rows,)."""
    N, C = x.shape
    rstd = np.empty(N, x.dtype)

    def work(lo: int, hi: int) -> None:
        for s in _row_blocks(lo, hi, C):
            xs, xh = x[s], xhat[s]
            np.subtract(xs, xs.mean(axis=1, keepdims=True), out=xh)
            var = np.einsum("ij,ij->i", xh, xh) / C
            r = rstd[s]
            np.add(var, LN_EPS, out=r)
            np.sqrt(r, out=r)
            np.divide(1.0, r, out=r)
            xh *= r[:, None]
            np.multiply(xh, w, out=out[s])
            out[s] += b
    parallel_for(N, work)
    return rstd


def layernorm_backward(dout: np.ndarray, xhat: np.ndarray, rstd: np.ndarray, w: np.ndarray,
                       dw: np.ndarray | None, db: np.ndarray | None, dx: np.ndarray,
                       accumulate: bool = True) -> None:
    """Writes dx (may alias dout); accumulates dw, db (overwrites them if not `accumulate`). dw and
    db None: a frozen LayerNorm (LoRA), whose gains and biases get no gradient, only its input."""
    N, C = dout.shape
    frozen = dw is None
    partial = np.zeros((min(n_threads(), N), 2, C), np.float64)
    lock = threading.Lock()

    def work(lo: int, hi: int) -> None:
        acc = np.zeros((2, C), np.float64)
        for s in _row_blocks(lo, hi, C):
            do, xh = dout[s], xhat[s]
            if not frozen:
                acc[0] += np.einsum("ij,ij->j", do, xh)
                acc[1] += do.sum(axis=0)
            dxhat = do * w
            mean_dxhat = dxhat.sum(axis=1, keepdims=True) / C
            mean_dxhat_xhat = np.einsum("ij,ij->i", dxhat, xh)[:, None] / C
            # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
            d = dx[s]
            np.multiply(xh, mean_dxhat_xhat, out=d)
            np.subtract(dxhat, d, out=d)
            d -= mean_dxhat
            d *= rstd[s, None]
        with lock:
            partial[0] += acc
    parallel_for(N, work)
    if frozen:
        return
    if accumulate:
        dw += partial[0, 0].astype(dw.dtype)
        db += partial[0, 1].astype(db.dtype)
    else:
        dw[:], db[:] = partial[0, 0], partial[0, 1]


# ----------------------------------------------------------------------------- linear

def linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = x @ w + b."""
    def work(lo: int, hi: int) -> None:
        blas.gemm(x[lo:hi], w, out[lo:hi])
        out[lo:hi] += b
    parallel_for(x.shape[0], work, grain=64)
    return out


def linear_forward_bf16(x: np.ndarray, w16: np.ndarray, b: np.ndarray, out: np.ndarray,
                        ws: bf16.Workspace) -> np.ndarray:
    """out = x16 @ w16 + b, w16 being w's bf16 copy and x16 x's bf16 rounding (made in `ws`), or x
    itself if it is stored as bf16 bits."""
    stored = _bf16_input(x)
    x16 = x if stored else ws.get("x", x.shape)

    def work(lo: int, hi: int) -> None:
        # each thread converts the rows it multiplies: no pass over x16 between the two
        if not stored:
            bf16.to_bf16(x[lo:hi], x16[lo:hi])
        gemm16.gemm_bf16(x16[lo:hi], w16, out[lo:hi])
        out[lo:hi] += b
    parallel_for(x.shape[0], work, grain=64)
    return out


def linear_backward(dout: np.ndarray, x: np.ndarray, w: np.ndarray, dw: np.ndarray | None,
                    db: np.ndarray | None, dx: np.ndarray | None, accumulate: bool = True) -> None:
    """Accumulates dw, db (overwrites them if not `accumulate`: the first micro-batch of a step
    saves zeroing the gradients and a read-add-write pass over them); writes dx unless it is None
    (dx may alias x). dw, db None: a frozen layer (LoRA's base): no weight-gradient matmul, no bias
    sum, only dx."""
    _linear_backward(blas.gemm, x, dout, w.T, dout, dw, db, dx, accumulate)


def linear_backward_bf16(dout: np.ndarray, x: np.ndarray, w16: np.ndarray, dw: np.ndarray | None,
                         db: np.ndarray | None, dx: np.ndarray | None, accumulate: bool,
                         ws: bf16.Workspace, dout16: np.ndarray | None = None) -> None:
    """linear_backward with w's bf16 copy w16: the matmuls take bf16 roundings of dout and x (made
    in `ws`; x may already be bf16 bits, as a bf16 model stores it), and dw still accumulates in
    float32. dw None (frozen): x is not needed, and not rounded. dout16: dout's rounding, if the
    caller has it already (a LoRA adapter's backward made it): not made again."""
    # a frozen layer's backward never reads x: nothing to round (x's buffer may be dx's, too)
    stored = _bf16_input(x) or dw is None
    x16 = x if stored else ws.get("x", x.shape)
    rounded = dout16 is not None
    if not rounded:
        dout16 = ws.get("dout", dout.shape)
    elif dout16.shape != dout.shape or dout16.dtype != np.uint16:
        raise ValueError(f"dout16 {dout16.dtype}{dout16.shape} is not the rounding of dout {dout.shape}")

    def convert(lo: int, hi: int) -> None:
        if not stored:
            bf16.to_bf16(x[lo:hi], x16[lo:hi])
        if not rounded:
            bf16.to_bf16(dout[lo:hi], dout16[lo:hi])
    if not (stored and rounded):
        parallel_for(x.shape[0], convert, grain=64)
    _linear_backward(gemm16.gemm_bf16, x16, dout16, w16.T, dout, dw, db, dx, accumulate)


def _linear_backward(gemm, a: np.ndarray, d: np.ndarray, wt: np.ndarray, dout: np.ndarray, dw: np.ndarray,
                     db: np.ndarray, dx: np.ndarray | None, accumulate: bool) -> None:
    """The products of linear's backward on its matmul operands (a: the input, d: dout, wt: the
    weight transposed, in gemm's precision); the bias gradient from dout itself."""
    def weight_grad(lo: int, hi: int) -> None:
        # rows [lo, hi) of dw are the input features [lo, hi): each thread owns its part of dw
        gemm(a[:, lo:hi].T, d, dw[lo:hi], accumulate=accumulate)
    if dw is not None:
        parallel_for(a.shape[1], weight_grad, grain=64)
    if db is not None:
        if accumulate:
            db += dout.sum(axis=0)
        else:
            dout.sum(axis=0, out=db)
    if dx is not None:
        _row_split(gemm, d, wt, dx)


# ----------------------------------------------------------------------------- LoRA adapters
# A target's adapter adds scale * (x @ A.T) @ B.T to its linear's output; A (r, in), B (out, r) as
# peft stores them (distgpt/lora.py). r is small (4-64): these products are thin and bound by the
# passes over x and dout, not by arithmetic. They run in the model's matmul precision: float32 in
# an fp32 model; in a bf16 model on bf16 operands (x, dout, A, B and u rounded, as torch's autocast
# rounds every input of peft's adapter Linears) with float32 accumulation, which reads the stored
# bf16 activations as they are (half the bytes of float32, and no widening pass: on GPT-2 XL's
# shapes the adapters' work per block halves, ~5% of a LoRA step). u = scale * x @ A.T (rows, r)
# is not saved for backward: backward remakes it from x, which is saved anyway, for r/out of the
# layer's work.

def _lora_gemm(a: np.ndarray):
    """The gemm of an adapter whose weight is `a`: bf16's for bf16 bits (uint16), else float32's."""
    return gemm16.gemm_bf16 if a.dtype == np.uint16 else blas.gemm


def _rounded(x: np.ndarray, x16: np.ndarray | None) -> np.ndarray:
    """x itself (float32 adapters), or its bf16 rounding written into x16 (bf16 adapters)."""
    return x if x16 is None else bf16.to_bf16(x, x16)


def lora_forward(x: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float, out: np.ndarray,
                 u: np.ndarray, u16: np.ndarray | None = None) -> None:
    """out += scale * (x @ a.T) @ b.T; u (rows, r) scratch, left holding scale * x @ a.T. bf16
    adapters (a, b and x bf16 bits): u16 (rows, r) takes u's rounding for the second product."""
    gemm = _lora_gemm(a)

    def work(lo: int, hi: int) -> None:
        gemm(x[lo:hi], a.T, u[lo:hi])
        u[lo:hi] *= scale
        gemm(_rounded(u[lo:hi], None if u16 is None else u16[lo:hi]), b.T, out[lo:hi], accumulate=True)
    parallel_for(x.shape[0], work, grain=64)


def lora_backward(dout: np.ndarray, x: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float,
                  da: np.ndarray, db: np.ndarray, u: np.ndarray, du: np.ndarray, accumulate: bool,
                  u16: np.ndarray | None = None, du16: np.ndarray | None = None) -> np.ndarray:
    """The adapter's weight gradients from its output's gradient dout (rows, out) and its input x
    (rows, in): db (out, r) = dout.T @ u, da (r, in) = du.T @ x, accumulated (written if not
    `accumulate`), with u = scale * x @ a.T remade here and du = scale * dout @ b. Returns du (du16,
    its rounding, for bf16 adapters, whose dout and x are bf16 bits too) for lora_input_grad, which
    adds the input's part once x's buffer may be overwritten."""
    gemm = _lora_gemm(a)

    def rows(lo: int, hi: int) -> None:
        gemm(x[lo:hi], a.T, u[lo:hi])
        u[lo:hi] *= scale
        _rounded(u[lo:hi], None if u16 is None else u16[lo:hi])
        gemm(dout[lo:hi], b, du[lo:hi])
        du[lo:hi] *= scale
        _rounded(du[lo:hi], None if du16 is None else du16[lo:hi])
    parallel_for(x.shape[0], rows, grain=64)
    u_in = u if u16 is None else u16
    du_in = du if du16 is None else du16

    def b_grad(lo: int, hi: int) -> None:
        # rows [lo, hi) of db are the output features [lo, hi): each thread owns its part
        gemm(dout[:, lo:hi].T, u_in, db[lo:hi], accumulate=accumulate)
    parallel_for(dout.shape[1], b_grad, grain=64)

    def a_grad(lo: int, hi: int) -> None:
        # da has only r rows: split its columns, the input features [lo, hi)
        gemm(du_in.T, x[:, lo:hi], da[:, lo:hi], accumulate=accumulate)
    parallel_for(x.shape[1], a_grad, grain=64)
    return du_in


def lora_input_grad(du: np.ndarray, a: np.ndarray, dx: np.ndarray, keep: np.ndarray | None = None,
                    keep_scale: float = 1.0, tmp: np.ndarray | None = None) -> None:
    """dx += du @ a: the adapter's part of its input's gradient (du as lora_backward returned it:
    bf16 bits for bf16 adapters); with dropout on the adapter's input, through its mask:
    dx += (du @ a) * keep * keep_scale, the product made in `tmp` (dx's shape, float32)."""
    gemm = _lora_gemm(a)

    def work(lo: int, hi: int) -> None:
        if keep is None:
            gemm(du[lo:hi], a, dx[lo:hi], accumulate=True)
            return
        t = gemm(du[lo:hi], a, tmp[lo:hi])
        t *= keep[lo:hi]
        t *= keep_scale
        dx[lo:hi] += t
    parallel_for(du.shape[0], work, grain=64)


# ----------------------------------------------------------------------------- gelu (tanh)
# GPT-2's GELU is 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3). Since
# 0.5 (1 + tanh(u)) = sigmoid(2u), it is x * s with s = 1 / (1 + exp(-2u)): exp is much cheaper than
# tanh in NumPy, and the derivative reuses s: gelu'(x) = s + 2 x s (1 - s) du/dx.
#
# Each block takes three passes: -2u (compiled), exp (NumPy's), and the rest (compiled), instead of
# 8 ufuncs for the output and 17 for the gradient. The NumPy twin below does the same float32
# operations in the same order, so both give identical bits (jit.py).

_GELU_K1 = -2.0 * GELU_C * 0.044715     # -2u = (x^2 K1 + K0) x
_GELU_K0 = -2.0 * GELU_C
_GELU_D1 = 3.0 * 0.044715 * GELU_C      # du/dx = x^2 D1 + GELU_C


def _gelu_exponent_loop(x, e, k1, k0):
    for i in range(x.shape[0]):
        xi = x[i]
        e[i] = ((xi * xi) * k1 + k0) * xi


def _gelu_output_loop(x, e, out):
    one = e.dtype.type(1.0)
    for i in range(x.shape[0]):
        out[i] = (one / (e[i] + one)) * x[i]


def _gelu_output_slope_loop(x, e, out, slope, d1, c):
    one, two = e.dtype.type(1.0), e.dtype.type(2.0)
    for i in range(x.shape[0]):
        xi = x[i]
        s = one / (e[i] + one)
        out[i] = s * xi
        t = ((((xi * xi) * d1 + c) * xi) * two) * s
        slope[i] = t * (one - s) + s


_gelu_exponent = jit.Kernel(_gelu_exponent_loop)
_gelu_output = jit.Kernel(_gelu_output_loop)
_gelu_output_slope = jit.Kernel(_gelu_output_slope_loop)


def _gelu_block(x: np.ndarray, out: np.ndarray, slope: np.ndarray | None, e: np.ndarray) -> None:
    """out = gelu(x) and, if given, slope = gelu'(x), for one contiguous block; e is scratch
    (may be `out` when there is no slope)."""
    if jit.enabled():
        xf, ef, of = x.reshape(-1), e.reshape(-1), out.reshape(-1)
        dt = x.dtype.type
        _gelu_exponent(xf, ef, dt(_GELU_K1), dt(_GELU_K0))
        with np.errstate(over="ignore"):       # exp(-2u) = inf for x << 0: s = 0, as it should be
            np.exp(ef, out=ef)
        if slope is None:
            _gelu_output(xf, ef, of)
        else:
            _gelu_output_slope(xf, ef, of, slope.reshape(-1), dt(_GELU_D1), dt(GELU_C))
        return
    np.multiply(x, x, out=e)
    e *= _GELU_K1
    e += _GELU_K0
    e *= x
    with np.errstate(over="ignore"):
        np.exp(e, out=e)
    e += 1.0
    np.divide(1.0, e, out=e)                   # e is now s = sigmoid(2u)
    if slope is not None:
        t = x * x
        t *= _GELU_D1
        t += GELU_C
        t *= x
        t *= 2.0
        t *= e
        q = 1.0 - e
        t *= q                                 # 2 x s (1 - s) du/dx
        t += e
        slope[...] = t
    np.multiply(e, x, out=out)


def gelu_forward(x: np.ndarray, out: np.ndarray, slope: np.ndarray | None = None) -> np.ndarray:
    """out = gelu(x); with `slope`, also slope = gelu'(x) (backward recomputes the output for the
    next layer's weight gradient and gets the derivative from the same exp). x, out, slope: C-contiguous."""
    N, C = x.shape
    arrays = (x, out) + ((slope,) if slope is not None else ())
    if not all(a.flags.c_contiguous and a.shape == x.shape and a.dtype == x.dtype for a in arrays):
        raise ValueError("gelu_forward needs C-contiguous x, out and slope of one shape and dtype")

    def work(lo: int, hi: int) -> None:
        # without a slope the exponent is built in `out`; with one, in a block of scratch
        scratch = None if slope is None else np.empty((min(hi - lo, max(1, BLOCK_ELEMS // C)), C), x.dtype)
        for sl in _row_blocks(lo, hi, C):
            o = out[sl]
            if slope is None:
                _gelu_block(x[sl], o, None, o)
            else:
                _gelu_block(x[sl], o, slope[sl], scratch[: o.shape[0]])
    parallel_for(N, work)
    return out


def multiply_(a: np.ndarray, b: np.ndarray) -> None:
    """a *= b, in row blocks over the threads."""
    def work(lo: int, hi: int) -> None:
        for sl in _row_blocks(lo, hi, a.shape[1]):
            a[sl] *= b[sl]
    parallel_for(a.shape[0], work)


def gelu_backward(dout: np.ndarray, x: np.ndarray, dx: np.ndarray) -> None:
    """dx = dout * gelu'(x). dx may alias dout. (The model's backward does the same in two steps:
    gelu_forward with a slope, which it needs for the output anyway, then multiply_.)"""
    slope = np.empty_like(x)
    gelu_forward(x, np.empty_like(x), slope=slope)
    np.multiply(dout, slope, out=dx)


# ----------------------------------------------------------------------------- attention
# Causal attention in query blocks, flash-attention style: block [q0, q1) only meets the keys it can
# see ([0, q1), or the band for local layers), so the masked upper triangle is never computed, and
# only the softmax's log-normaliser (B, nh, T) is kept for backward, which recomputes each block's
# probabilities. q, k, v, y and their gradients are (B, nh, T, hs) arrays or strided views (the
# model passes views straight into its (B*T, 3C) and (B*T, C) buffers: no head reshuffling copies).

def causal_mask(T: int, window: int | None = None) -> np.ndarray:
    """Boolean (T, T): True where query t may NOT attend key s (the future, or beyond the band)."""
    t = np.arange(T)
    blocked = t[None, :] > t[:, None]
    if window is not None:
        blocked |= t[None, :] <= t[:, None] - window
    return blocked


_mask_cache: dict = {}


def _additive_mask(T: int, window: int | None, dtype) -> np.ndarray:
    """0 / -inf (T', T') mask for some T' >= T: a mask depends only on the two positions, so any
    square corner of a bigger one serves (sampling asks for every T up to block_size)."""
    key = (window, np.dtype(dtype))
    if key not in _mask_cache or _mask_cache[key].shape[0] < T:
        _mask_cache[key] = np.where(causal_mask(T, window), -np.inf, 0.0).astype(dtype)
    return _mask_cache[key]


def _head_groups(lo: int, hi: int, nh: int, Tq: int, Tk: int, one_head: bool = False):
    """(b, heads): the flat (batch, head) range [lo, hi) cut into runs of heads of one sequence,
    each run small enough that its score blocks (heads x ATTN_BLOCK x Tk) stay in cache. At short T
    a run is all heads, so every step is one batched ufunc or matmul instead of a Python loop over
    heads (T = 64: attention 1.5x faster); at T = 1024 a run is one head. A one-head run is given
    as an int, so its arrays stay 2-D (stacked matmuls cost more than plain ones); `one_head`
    (bf16, whose gemm takes 2-D operands only) gives one-head runs at every T."""
    per_run = 1 if one_head else max(1, BLOCK_ELEMS // (min(Tq, ATTN_BLOCK) * Tk))
    i = lo
    while i < hi:
        b, h0 = divmod(i, nh)
        h1 = min(nh, h0 + per_run, h0 + hi - i)
        yield b, (h0 if h1 - h0 == 1 else slice(h0, h1))
        i += h1 - h0


def _query_blocks(Tq: int, rows: int, window: int | None, q_offset: int):
    """(q0, q1, p0, p1, k0): blocks [q0, q1) of `rows` query rows, their positions [p0, p1) (the
    queries sit at q_offset..), and k0, the first key any of the block's queries can see (all keys
    up to p1 without a window, the band's start with one)."""
    for q0 in range(0, Tq, rows):
        q1 = min(Tq, q0 + rows)
        p0, p1 = q_offset + q0, q_offset + q1
        yield q0, q1, p0, p1, 0 if window is None else max(0, p0 - window + 1)


def _mask_(s: np.ndarray, mask: np.ndarray, window: int | None, p0: int, p1: int, k0: int) -> None:
    """Add the causal (or banded) mask to a block's scores against keys [k0, p1). Without a window
    only the diagonal (rows, rows) square can be masked: one pass over that square, not the block."""
    if window is None:
        s[..., p0:] += mask[p0:p1, p0:p1]
    else:
        s += mask[p0:p1, k0:p1]


def _score_blocks(q: np.ndarray, k: np.ndarray, window: int | None, mask: np.ndarray, q_offset: int = 0):
    """(q0, q1, k0, scores, scaled_q): for each block [q0, q1) of the query rows, the scaled and masked
    scores ([heads,] q1 - q0, q_offset + q1 - k0) against keys [k0, q_offset + q1), the only keys any of
    its queries can see, and the block's queries times 1/sqrt(hs). q: ([heads,] Tq, hs) at positions
    q_offset..; k: ([heads,] q_offset + Tq, hs) (training: q_offset 0; a KV cache: the cached length).
    The scale goes on the (rows, hs) queries rather than the (rows, keys) scores: one pass fewer."""
    Tq, hs = q.shape[-2:]
    scale = 1.0 / math.sqrt(hs)
    for q0, q1, p0, p1, k0 in _query_blocks(Tq, ATTN_BLOCK, window, q_offset):
        qs = q[..., q0:q1, :] * scale
        s = qs @ k[..., k0:p1, :].swapaxes(-1, -2)
        _mask_(s, mask, window, p0, p1, k0)
        yield q0, q1, k0, s, qs


def _score_blocks_bf16(q: np.ndarray, k: np.ndarray, window: int | None, mask: np.ndarray, q_offset: int = 0):
    """_score_blocks for bf16 q and k (uint16 bits, one head: (Tq, hs) and (q_offset + Tq, hs)), in
    blocks of ATTN_BLOCK_BF16 rows: the bf16 gemm applies the scale, and the block's queries come
    back unscaled."""
    Tq, hs = q.shape[-2:]
    scale = 1.0 / math.sqrt(hs)
    for q0, q1, p0, p1, k0 in _query_blocks(Tq, ATTN_BLOCK_BF16, window, q_offset):
        qs = q[q0:q1]
        s = gemm16.gemm_bf16(qs, k[k0:p1].T, np.empty((q1 - q0, p1 - k0), np.float32), alpha=scale)
        _mask_(s, mask, window, p0, p1, k0)
        yield q0, q1, k0, s, qs


def _require_bits(what: str, *arrays: np.ndarray) -> None:
    if any(a.dtype != np.uint16 for a in arrays):
        raise TypeError(f"{what} takes q, k, v as bf16 bits (uint16), not {[str(a.dtype) for a in arrays]}")


def attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, window: int | None, y: np.ndarray,
                      lse: np.ndarray, keep: np.ndarray | None = None, keep_scale: float = 1.0,
                      q_offset: int = 0) -> None:
    """y = softmax(q k^T / sqrt(hs) + mask) @ v per (batch, head); lse (B, nh, Tq) gets the log of
    each softmax row's normaliser. q, y: (B, nh, Tq, hs) at positions q_offset..; k, v: (B, nh,
    q_offset + Tq, hs). keep: optional dropout keep-mask (B, nh, T, T) on the probabilities (training,
    q_offset 0), surviving ones scaled by keep_scale."""
    def weigh(p: np.ndarray, vk: np.ndarray, yq: np.ndarray) -> None:
        np.matmul(p, vk, out=yq)
    _attention_forward(q, k, v, window, y, lse, keep, keep_scale, q_offset, _score_blocks, weigh,
                       one_head=False, mask_dtype=q.dtype)


def attention_forward_bf16(q: np.ndarray, k: np.ndarray, v: np.ndarray, window: int | None, y: np.ndarray,
                           lse: np.ndarray, keep: np.ndarray | None = None, keep_scale: float = 1.0,
                           q_offset: int = 0) -> None:
    """attention_forward with q, k, v as bf16 bits: both matmuls in bf16 (the probabilities rounded
    to bf16 for the second), softmax and y float32."""
    _require_bits("attention_forward_bf16", q, k, v)

    def weigh(p: np.ndarray, vk: np.ndarray, yq: np.ndarray) -> None:
        gemm16.gemm_bf16(bf16.to_bf16(p), vk, yq)
    _attention_forward(q, k, v, window, y, lse, keep, keep_scale, q_offset, _score_blocks_bf16, weigh,
                       one_head=True, mask_dtype=np.float32)


def _attention_forward(q, k, v, window, y, lse, keep, keep_scale, q_offset, score_blocks, weigh,
                       one_head: bool, mask_dtype) -> None:
    """The forward of either precision: `score_blocks` makes each block's scores, weigh(p, v, y)
    writes the unnormalised probabilities p times the values v into y."""
    B, nh, Tq, hs = q.shape
    Tk = k.shape[2]
    if Tk != q_offset + Tq:
        raise ValueError(f"{Tk} keys for {Tq} queries at offset {q_offset}")
    mask = _additive_mask(Tk, window, mask_dtype)

    def work(lo: int, hi: int) -> None:
        for b, hd in _head_groups(lo, hi, nh, Tq, Tk, one_head=one_head):
            vb, yb, lb = v[b, hd], y[b, hd], lse[b, hd]
            for q0, q1, k0, s, _ in score_blocks(q[b, hd], k[b, hd], window, mask, q_offset):
                m = s.max(axis=-1, keepdims=True)
                s -= m
                np.exp(s, out=s)
                total = s.sum(axis=-1, keepdims=True)
                if keep is not None:
                    s *= keep[b, hd, q0:q1, k0:q1]
                # normalise the (rows, hs) output instead of the (rows, keys) probabilities
                yq = yb[..., q0:q1, :]
                weigh(s, vb[..., k0 : q_offset + q1, :], yq)
                yq /= total
                if keep is not None:
                    yq *= keep_scale
                np.log(total, out=total)
                total += m
                lb[..., q0:q1] = total[..., 0]
    parallel_for(B * nh, work)


def _dropped(p: np.ndarray, dp: np.ndarray, keep: np.ndarray | None, keep_scale: float) -> np.ndarray:
    """Dropout on a block's probabilities p in backward: returns the kept probabilities (p itself
    without dropout) and applies the same mask and scale to their gradient dp, in place."""
    if keep is None:
        return p
    dp *= keep
    dp *= keep_scale
    return (p * keep) * keep_scale


def attention_backward(dy: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, y: np.ndarray,
                       lse: np.ndarray, window: int | None, dq: np.ndarray, dk: np.ndarray, dv: np.ndarray,
                       keep: np.ndarray | None = None, keep_scale: float = 1.0) -> None:
    """Gradients of q, k, v (written, not accumulated) from dy and the forward's y and lse.
    Uses sum_s dP[t,s] P[t,s] = dy[t] . y[t], which also holds with dropout on the probabilities."""
    B, nh, T, hs = q.shape
    scale = 1.0 / math.sqrt(hs)
    mask = _additive_mask(T, window, q.dtype)

    def work(lo: int, hi: int) -> None:
        for b, hd in _head_groups(lo, hi, nh, T, T):
            qb, kb, vb, lb = q[b, hd], k[b, hd], v[b, hd], lse[b, hd]
            dyb, dqb, dkb, dvb = dy[b, hd], dq[b, hd], dk[b, hd], dv[b, hd]
            rowdot = np.einsum("...td,...td->...t", dyb, y[b, hd])[..., None]
            dkb[...] = 0.0
            dvb[...] = 0.0
            for q0, q1, k0, p, qs in _score_blocks(qb, kb, window, mask):
                p -= lb[..., q0:q1, None]                # recompute the probabilities
                np.exp(p, out=p)
                dyq, vk = dyb[..., q0:q1, :], vb[..., k0:q1, :]
                dp = dyq @ vk.swapaxes(-1, -2)
                kept = _dropped(p, dp, None if keep is None else keep[b, hd, q0:q1, k0:q1], keep_scale)
                dvb[..., k0:q1, :] += kept.swapaxes(-1, -2) @ dyq
                dp -= rowdot[..., q0:q1, :]
                dp *= p                                # dp is now the score gradient
                dqq = dqb[..., q0:q1, :]
                np.matmul(dp, kb[..., k0:q1, :], out=dqq)
                dqq *= scale
                dkb[..., k0:q1, :] += dp.swapaxes(-1, -2) @ qs
    parallel_for(B * nh, work)


def attention_backward_bf16(dy: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, lse: np.ndarray,
                            window: int | None, dq: np.ndarray, dk: np.ndarray, dv: np.ndarray,
                            keep: np.ndarray | None = None, keep_scale: float = 1.0) -> None:
    """attention_backward with q, k, v as bf16 bits: the five matmuls in bf16, taking bf16 roundings
    of dy, the probabilities and the scores' gradient; dy and the gradients float32. It needs no y:
    each row's sum of dP * P is taken as it stands, from the block's dP and P (a block holds every
    key its rows see). dy.y, computed from dy before its rounding, would leave each row of the
    scores' gradient summing to a bf16-sized error instead of zero, which made runs 4x more
    sensitive to how the batch is split over ranks."""
    _require_bits("attention_backward_bf16", q, k, v)
    B, nh, T, hs = q.shape
    scale = 1.0 / math.sqrt(hs)
    mask = _additive_mask(T, window, np.float32)

    def work(lo: int, hi: int) -> None:
        for b, hd in _head_groups(lo, hi, nh, T, T, one_head=True):
            qb, kb, vb, lb = q[b, hd], k[b, hd], v[b, hd], lse[b, hd]
            dyb, dqb, dkb, dvb = dy[b, hd], dq[b, hd], dk[b, hd], dv[b, hd]
            dy16 = bf16.to_bf16(dyb)                   # dy as the matmuls take it
            dkb[...] = 0.0
            dvb[...] = 0.0
            for q0, q1, k0, p, qs in _score_blocks_bf16(qb, kb, window, mask):
                p -= lb[q0:q1, None]                   # recompute the probabilities
                np.exp(p, out=p)
                dyq = dy16[q0:q1]
                dp = gemm16.gemm_bf16(dyq, vb[k0:q1].T, np.empty(p.shape, np.float32))
                kept = _dropped(p, dp, None if keep is None else keep[b, hd, q0:q1, k0:q1], keep_scale)
                gemm16.gemm_bf16(bf16.to_bf16(kept).T, dyq, dvb[k0:q1], accumulate=True)
                dp -= np.einsum("td,td->t", dp, p)[:, None]
                dp *= p                                # dp is now the score gradient
                ds = bf16.to_bf16(dp)                  # scores = scale q k^T: the gemms apply the scale
                gemm16.gemm_bf16(ds, kb[k0:q1], dqb[q0:q1], alpha=scale)
                gemm16.gemm_bf16(ds.T, qs, dkb[k0:q1], accumulate=True, alpha=scale)
    parallel_for(B * nh, work)


# ----------------------------------------------------------------------------- lm head + loss

def head_loss(x: np.ndarray, wte: np.ndarray, targets: np.ndarray, grad_scale: float | None,
              dx: np.ndarray | None, dwte: np.ndarray | None, chunk_rows: int,
              logits_out: np.ndarray | None = None, accumulate: bool = True,
              scratch: np.ndarray | None = None) -> float:
    """Tied lm_head, softmax and mean cross-entropy, fused and processed in row chunks so the
    (tokens x vocab) matrix is never held whole.

    x (N, C) final-layernorm output, wte (V, C) the real (unpadded) vocabulary rows.
    Returns the mean loss over the N rows. When grad_scale is given, the gradient of
    grad_scale * mean_loss is written into dx (N, C) and accumulated into dwte (V, C) (written, if
    not `accumulate`): doing it here, while each chunk's probabilities are at hand, saves
    recomputing the logits. dwte None with a grad_scale: a frozen embedding (LoRA), only dx.
    `scratch` (at least (min(N, chunk_rows), V)) holds a chunk's logits; without it a fresh array is
    allocated per chunk.
    """
    return _head_loss(blas.gemm, x, wte, None, x.dtype, targets, grad_scale, dx, dwte, chunk_rows, logits_out,
                      accumulate, scratch)


def head_loss_bf16(x: np.ndarray, wte16: np.ndarray, targets: np.ndarray, grad_scale: float | None,
                   dx: np.ndarray | None, dwte: np.ndarray | None, chunk_rows: int, ws: bf16.Workspace,
                   logits_out: np.ndarray | None = None, accumulate: bool = True,
                   scratch: np.ndarray | None = None) -> float:
    """head_loss with wte's bf16 copy wte16: the three matmuls take bf16 roundings of x and of the
    logits' gradient (made in `ws`); softmax and the loss stay float32."""
    x16 = bf16.to_bf16(x, ws.get("head_x", x.shape), parallel=True)
    return _head_loss(gemm16.gemm_bf16, x16, wte16, ws, x.dtype, targets, grad_scale, dx, dwte, chunk_rows,
                      logits_out, accumulate, scratch)


def _head_loss(gemm, xm: np.ndarray, wm: np.ndarray, ws: bf16.Workspace | None, dtype, targets: np.ndarray,
               grad_scale: float | None, dx: np.ndarray | None, dwte: np.ndarray | None, chunk_rows: int,
               logits_out: np.ndarray | None, accumulate: bool, scratch: np.ndarray | None) -> float:
    """head_loss on the matmuls' operands xm, wm in gemm's precision; ws (bf16): where the logits'
    gradient is rounded, once for both of its matmuls; dtype: the logits'."""
    N = xm.shape[0]
    V = wm.shape[0]
    losses = np.empty(N, np.float64)
    for r0 in range(0, N, chunk_rows):
        r1 = min(N, r0 + chunk_rows)
        buf = scratch[: r1 - r0, :V] if scratch is not None else np.empty((r1 - r0, V), dtype)
        logits = _row_split(gemm, xm[r0:r1], wm.T, buf)
        if logits_out is not None:
            logits_out[r0:r1] = logits

        def softmax_rows(lo: int, hi: int, r0: int = r0, logits: np.ndarray = logits) -> None:
            for s in _row_blocks(lo, hi, V, min_rows=2):
                block = logits[s]
                rows = np.arange(s.stop - s.start)
                tgt = targets[r0 + s.start:r0 + s.stop]
                block -= block.max(axis=1, keepdims=True)
                picked = block[rows, tgt].astype(np.float64)
                np.exp(block, out=block)
                sums = block.sum(axis=1)
                losses[r0 + s.start:r0 + s.stop] = np.log(sums.astype(np.float64)) - picked
                if grad_scale is not None:
                    block *= (grad_scale / N) / sums[:, None]       # probabilities, scaled
                    block[rows, tgt] -= grad_scale / N
        parallel_for(r1 - r0, softmax_rows)
        if grad_scale is not None:
            if ws is not None:
                logits = bf16.to_bf16(logits, ws.get("head_g", logits.shape), parallel=True)
            _row_split(gemm, logits, wm, dx[r0:r1])
            xc = xm[r0:r1]
            add = accumulate or r0 > 0

            def embed_grad(lo: int, hi: int, logits: np.ndarray = logits, xc: np.ndarray = xc,
                           add: bool = add) -> None:
                # split over vocabulary rows so each thread adds into its own part of dwte, in
                # cache-sized pieces (no (V, C) temporary)
                step = max(1, (1 << 20) // max(1, xc.shape[1]))
                for v0 in range(lo, hi, step):
                    v1 = min(hi, v0 + step)
                    gemm(logits[:, v0:v1].T, xc, dwte[v0:v1], accumulate=add)
            if dwte is not None:
                parallel_for(V, embed_grad)
    return float(losses.sum() / N)


# ----------------------------------------------------------------------------- one table per precision

class Fp32Kernels:
    """The layers that multiply matrices, in float32: what an fp32 model's passes call. A model
    picks its table once (`kernels`); the two tables have the same methods."""

    name = "fp32"
    stores_bf16 = False          # activations that only feed matmuls are kept as float32

    def linear_forward(self, x: np.ndarray, w: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
        return linear_forward(x, w, b, out)

    def linear_backward(self, dout: np.ndarray, x: np.ndarray, w: np.ndarray, dw: np.ndarray, db: np.ndarray,
                        dx: np.ndarray | None, accumulate: bool, dout16: None = None) -> None:
        if dout16 is not None:
            raise ValueError("an fp32 linear takes no bf16 rounding of dout")
        linear_backward(dout, x, w, dw, db, dx, accumulate)

    def attention_forward(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, window: int | None,
                          y: np.ndarray, lse: np.ndarray, keep: np.ndarray | None, keep_scale: float,
                          q_offset: int) -> None:
        attention_forward(q, k, v, window, y, lse, keep, keep_scale, q_offset)

    def attention_backward(self, dy: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                           y: np.ndarray, lse: np.ndarray, window: int | None, dq: np.ndarray,
                           dk: np.ndarray, dv: np.ndarray, keep: np.ndarray | None,
                           keep_scale: float) -> None:
        attention_backward(dy, q, k, v, y, lse, window, dq, dk, dv, keep, keep_scale)

    def head_loss(self, x: np.ndarray, wte: np.ndarray, targets: np.ndarray, grad_scale: float | None,
                  dx: np.ndarray | None, dwte: np.ndarray | None, chunk_rows: int, accumulate: bool = True,
                  scratch: np.ndarray | None = None) -> float:
        return head_loss(x, wte, targets, grad_scale, dx, dwte, chunk_rows, accumulate=accumulate,
                         scratch=scratch)


class Bf16Kernels:
    """The same layers with bf16 matmuls (float32 accumulation): the weights are their bf16 copies,
    and the activations that only feed matmuls (the ln_1 and ln_2 outputs, q/k/v, the attention
    output) are kept as bf16 bits. Owns the Workspace its layers round their other matmul inputs
    into (one layer runs at a time, so one buffer per role serves every layer)."""

    name = "bf16"
    stores_bf16 = True

    def __init__(self, ws: bf16.Workspace | None = None):
        self.ws = bf16.Workspace() if ws is None else ws

    def linear_forward(self, x: np.ndarray, w16: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
        return linear_forward_bf16(x, w16, b, out, self.ws)

    def linear_backward(self, dout: np.ndarray, x: np.ndarray, w16: np.ndarray, dw: np.ndarray,
                        db: np.ndarray, dx: np.ndarray | None, accumulate: bool,
                        dout16: np.ndarray | None = None) -> None:
        linear_backward_bf16(dout, x, w16, dw, db, dx, accumulate, self.ws, dout16)

    def attention_forward(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, window: int | None,
                          y: np.ndarray, lse: np.ndarray, keep: np.ndarray | None, keep_scale: float,
                          q_offset: int) -> None:
        attention_forward_bf16(q, k, v, window, y, lse, keep, keep_scale, q_offset)

    def attention_backward(self, dy: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                           y: np.ndarray, lse: np.ndarray, window: int | None, dq: np.ndarray,
                           dk: np.ndarray, dv: np.ndarray, keep: np.ndarray | None,
                           keep_scale: float) -> None:
        # y unused: bf16 backward takes each row's sum of dP * P from its blocks
        attention_backward_bf16(dy, q, k, v, lse, window, dq, dk, dv, keep, keep_scale)

    def head_loss(self, x: np.ndarray, wte16: np.ndarray, targets: np.ndarray, grad_scale: float | None,
                  dx: np.ndarray | None, dwte: np.ndarray | None, chunk_rows: int, accumulate: bool = True,
                  scratch: np.ndarray | None = None) -> float:
        return head_loss_bf16(x, wte16, targets, grad_scale, dx, dwte, chunk_rows, self.ws,
                              accumulate=accumulate, scratch=scratch)


Kernels = Fp32Kernels | Bf16Kernels


def kernels(precision: str) -> Kernels:
    """The kernel table of a precision ("fp32" or "bf16"); a bf16 table with a Workspace of its own."""
    if precision == "fp32":
        return Fp32Kernels()
    if precision == "bf16":
        return Bf16Kernels()
    raise ValueError(f"precision {precision!r}: expected fp32 or bf16")
