"""AdamW over a slice of the flat parameter vector, the learning-rate schedule, gradient clipping.

The optimizer never sees tensors: it updates params[start:end] from grads of the same slice.
Replicated data parallelism gives it the whole vector; ZeRO-1 gives each rank its own slice,
so the moments m and v exist only for that slice.
"""

from __future__ import annotations

import math

import numpy as np

from distgpt import jit
from distgpt.threads import n_threads, parallel_for


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup from lr/warmup to lr over `warmup_steps`, then cosine decay to min_lr at
    max_steps (the GPT-3 recipe). `step` counts from 0."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def clip_coefficient(grad_norm: float, max_norm: float) -> float:
    """The factor torch.nn.utils.clip_grad_norm_ applies: shrink only when the norm exceeds max_norm."""
    if max_norm <= 0.0:
        return 1.0
    return min(1.0, max_norm / (grad_norm + 1e-6))


def _adamw_loop(p, g, m, v, decay, k1, b1, k2, b2, inv_sqrt_bias2, eps, step_size):
    """One pass of AdamW over a chunk, each element read and written once: the same float
    operations, in the same order, as AdamW._numpy_chunks. All scalars come in the arrays' dtype."""
    for i in range(p.shape[0]):
        gi = g[i]
        mi = m[i] * b1 + gi * k1
        vi = v[i] * b2 + (gi * gi) * k2
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * decay - (mi / (np.sqrt(vi) * inv_sqrt_bias2 + eps)) * step_size


_adamw_compiled = jit.Kernel(_adamw_loop)


class AdamW:
    """Decoupled weight decay (Loshchilov & Hutter), bias-corrected moments, the same arithmetic
    as torch.optim.AdamW so that the two agree to float rounding.

    The update walks the slice in chunks: the temporaries stay small (no extra copies of a
    124M-parameter vector), each chunk is still one vectorised expression, and the chunks are split
    over the rank's threads. A chunk never straddles a decayed and an undecayed tensor, so weight
    decay is a per-chunk constant. With numba (distgpt.jit) each chunk is one compiled pass instead
    of fourteen ufuncs, with the same result to the bit (speeds: benchmarks/bench_adamw.py).
    """

    # Chunk sizes, measured on GPT-2 124M: on one thread, 32K elements (the chunk's four arrays
    # and two temporaries fit in L2) beat 256K by 22%; on two threads, chunks under 128K make the
    # threads queue for the GIL between their many short ufunc calls (32K: 1.3x slower).
    CHUNK_ONE_THREAD = 1 << 15
    CHUNK_THREADED = 1 << 18
    CHUNK_COMPILED = 1 << 20     # one compiled pass streams from memory anyway: big chunks, few calls
    CHUNK: int | None = None     # a fixed chunk size instead (tests)

    def __init__(
        self,
        n: int,
        decay_segments: list[tuple[int, int, bool]],
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        dtype: type = np.float32,
        compiled: bool | None = None,
    ):
        self.m = np.zeros(n, dtype)
        self.v = np.zeros(n, dtype)
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.segments = decay_segments
        covered = sum(hi - lo for lo, hi, _ in decay_segments)
        if covered != n:
            raise ValueError(f"decay segments cover {covered} elements, the slice has {n}")
        self._chunks: dict[int, list[tuple[int, int, bool]]] = {}
        self.t = 0
        self.dtype = dtype
        # the compiled loop when numba is there (compiled=None), or on request (tests compare both)
        self.compiled = jit.enabled() if compiled is None else compiled
        if self.compiled and not jit.numba_installed():
            raise RuntimeError("AdamW(compiled=True) needs numba, which is not installed")

    def chunks(self, size: int) -> list[tuple[int, int, bool]]:
        """The slice's (lo, hi, decayed) pieces of at most `size` elements."""
        if size not in self._chunks:
            self._chunks[size] = [(lo, min(hi, lo + size), decay) for start, hi, decay in self.segments
                                  for lo in range(start, hi, size)]
        return self._chunks[size]

    def step(self, params: np.ndarray, grads: np.ndarray, lr: float, grad_scale: float = 1.0) -> None:
        """params -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * params), in place.
        grad_scale multiplies the gradient first (clipping) without touching `grads`.
        The chunks are split over the rank's threads (distgpt.threads)."""
        n = self.m.size
        if {params.shape, grads.shape} != {(n,)} or {params.dtype, grads.dtype} != {np.dtype(self.dtype)}:
            raise ValueError(f"AdamW over {n} {np.dtype(self.dtype).name} values got params "
                             f"{params.shape} {params.dtype} and grads {grads.shape} {grads.dtype}")
        # Python floats: a NumPy float64 scalar would make the ufunc path compute in float64
        # (NumPy 2 treats it as a strong type) while the compiled loop rounds it to float32 first
        lr, grad_scale = float(lr), float(grad_scale)
        self.t += 1
        step_size = lr / (1.0 - self.beta1 ** self.t)
        inv_sqrt_bias2 = 1.0 / math.sqrt(1.0 - self.beta2 ** self.t)
        update = self._compiled_chunks if self.compiled else self._numpy_chunks
        update(params, grads, lr, grad_scale, step_size, inv_sqrt_bias2)

    def _compiled_chunks(self, params: np.ndarray, grads: np.ndarray, lr: float, grad_scale: float,
                         step_size: float, inv_sqrt_bias2: float) -> None:
        """The update as one compiled pass per chunk (_adamw_loop), scalars in the arrays' dtype."""
        dt = np.dtype(self.dtype).type
        b1, b2, k2 = dt(self.beta1), dt(self.beta2), dt((1.0 - self.beta2) * grad_scale * grad_scale)
        k1, ibc = dt(grad_scale * (1.0 - self.beta1)), dt(inv_sqrt_bias2)
        eps, step = dt(self.eps), dt(step_size)
        wd_decay, no_decay = dt(1.0 - lr * self.weight_decay), dt(1.0)
        chunks = self.chunks(self.CHUNK or self.CHUNK_COMPILED)

        def work(first: int, last: int) -> None:
            for lo, hi, decay in chunks[first:last]:
                _adamw_compiled(params[lo:hi], grads[lo:hi], self.m[lo:hi], self.v[lo:hi],
                                wd_decay if decay else no_decay, k1, b1, k2, b2, ibc, eps, step)
        parallel_for(len(chunks), work)

    def _numpy_chunks(self, params: np.ndarray, grads: np.ndarray, lr: float, grad_scale: float,
                      step_size: float, inv_sqrt_bias2: float) -> None:
        """The update as ufuncs on cache-sized chunks: the reference for the compiled loop."""
        b1, b2 = self.beta1, self.beta2
        size = self.CHUNK or (self.CHUNK_ONE_THREAD if n_threads() == 1 else self.CHUNK_THREADED)
        chunks = self.chunks(size)

        def work(first: int, last: int) -> None:
            tmp = np.empty(size, self.dtype)
            tmp2 = np.empty(size, self.dtype)
            for lo, hi, decay in chunks[first:last]:
                p, g, m, v = params[lo:hi], grads[lo:hi], self.m[lo:hi], self.v[lo:hi]
                t1, t2 = tmp[: hi - lo], tmp2[: hi - lo]
                if decay and self.weight_decay:
                    p *= 1.0 - lr * self.weight_decay
                # m = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2
                np.multiply(g, grad_scale * (1.0 - b1), out=t1)
                m *= b1
                m += t1
                np.multiply(g, g, out=t1)
                t1 *= (1.0 - b2) * grad_scale * grad_scale
                v *= b2
                v += t1
                # p -= step_size * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
                np.sqrt(v, out=t1)
                t1 *= inv_sqrt_bias2
                t1 += self.eps
                np.divide(m, t1, out=t2)
                t2 *= step_size
                p -= t2

        parallel_for(len(chunks), work)
