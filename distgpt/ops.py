"""Forward/backward pairs for the GPT-2 layers, written against NumPy/BLAS.

Conventions:
- Activations are 2-D (rows = batch x time, cols = features) so every matmul is one BLAS gemm.
- Weights are stored (in_features, out_features), as Hugging Face's GPT-2 Conv1D stores them,
  so a layer is `x @ w + b`.
- A backward function *accumulates* into the weight-gradient arrays it is given (gradient
  accumulation over micro-batches and the tied embedding both need `+=`) and returns / writes
  the gradient of its input.
- Forward functions return what their backward needs; nothing is hidden in globals.
"""

from __future__ import annotations

import math

import numpy as np

GELU_C = math.sqrt(2.0 / math.pi)
LN_EPS = 1e-5


# ----------------------------------------------------------------------------- layernorm


def layernorm_forward(
    x: np.ndarray, w: np.ndarray, b: np.ndarray, out: np.ndarray, xhat: np.ndarray
) -> np.ndarray:
    """out = (x - mean) / std * w + b over the last axis. Fills `xhat`, returns rstd (rows,)."""
    mean = x.mean(axis=-1, keepdims=True)
    np.subtract(x, mean, out=xhat)
    var = np.einsum("ij,ij->i", xhat, xhat) / x.shape[-1]
    rstd = 1.0 / np.sqrt(var + LN_EPS)
    xhat *= rstd[:, None]
    np.multiply(xhat, w, out=out)
    out += b
    return rstd


def layernorm_backward(
    dout: np.ndarray,
    xhat: np.ndarray,
    rstd: np.ndarray,
    w: np.ndarray,
    dw: np.ndarray,
    db: np.ndarray,
    dx: np.ndarray,
) -> None:
    """Writes dx (may alias dout); accumulates dw, db."""
    dw += np.einsum("ij,ij->j", dout, xhat)
    db += dout.sum(axis=0)
    dxhat = dout * w
    c = dxhat.shape[-1]
    mean_dxhat = dxhat.sum(axis=-1, keepdims=True) / c
    mean_dxhat_xhat = np.einsum("ij,ij->i", dxhat, xhat)[:, None] / c
    # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    np.multiply(xhat, mean_dxhat_xhat, out=dx)
    np.subtract(dxhat, dx, out=dx)
    dx -= mean_dxhat
    dx *= rstd[:, None]


# ----------------------------------------------------------------------------- linear


def linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    np.matmul(x, w, out=out)
    out += b
    return out


def linear_backward(
    dout: np.ndarray, x: np.ndarray, w: np.ndarray, dw: np.ndarray, db: np.ndarray, dx: np.ndarray | None
) -> None:
    """Accumulates dw, db; writes dx unless it is None (the caller does not need it)."""
    dw += x.T @ dout
    db += dout.sum(axis=0)
    if dx is not None:
        np.matmul(dout, w.T, out=dx)


# ----------------------------------------------------------------------------- gelu (tanh)


def gelu_forward(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the GPT-2 approximation."""
    np.multiply(x, x, out=out)
    out *= 0.044715
    out += 1.0
    out *= x
    out *= GELU_C
    np.tanh(out, out=out)
    out += 1.0
    out *= x
    out *= 0.5
    return out


def gelu_backward(dout: np.ndarray, x: np.ndarray, dx: np.ndarray) -> None:
    """dx = dout * gelu'(x). dx may alias dout."""
    x2 = x * x
    t = x2 * 0.044715
    t += 1.0
    t *= x
    t *= GELU_C
    np.tanh(t, out=t)  # t = tanh(u)
    # gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 * 0.044715 x^2)
    x2 *= 3 * 0.044715
    x2 += 1.0
    x2 *= GELU_C * 0.5
    x2 *= x  # 0.5 c x (1 + 3a x^2)
    s = t * t
    np.subtract(1.0, s, out=s)
    s *= x2
    t += 1.0
    t *= 0.5
    t += s
    np.multiply(dout, t, out=dx)


# ----------------------------------------------------------------------------- attention


def split_heads(qkv: np.ndarray, B: int, T: int, n_head: int, out: np.ndarray) -> None:
    """(B*T, 3C) -> out (3, B, n_head, T, hs), contiguous so the batched matmuls hit BLAS."""
    C3 = qkv.shape[-1]
    hs = C3 // (3 * n_head)
    out[...] = qkv.reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4)


def merge_heads(y: np.ndarray, out: np.ndarray) -> None:
    """(B, n_head, T, hs) -> out (B*T, C)."""
    B, nh, T, hs = y.shape
    out.reshape(B, T, nh, hs)[...] = y.transpose(0, 2, 1, 3)


def causal_mask(T: int, window: int | None = None) -> np.ndarray:
    """Boolean (T, T): True where query t may NOT attend key s (the future, or beyond the band)."""
    t = np.arange(T)
    blocked = t[None, :] > t[:, None]
    if window is not None:
        blocked |= t[None, :] <= t[:, None] - window
    return blocked


def attention_forward(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, blocked: np.ndarray, att: np.ndarray, y: np.ndarray
) -> None:
    """Masked softmax attention over (B, nh, T, hs). Fills att (B, nh, T, T) with the
    probabilities and y (B, nh, T, hs) with att @ v."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    np.matmul(q, k.swapaxes(-1, -2), out=att)
    att *= scale
    att[..., blocked] = -np.inf
    softmax_lastaxis_(att)
    np.matmul(att, v, out=y)


def softmax_lastaxis_(a: np.ndarray) -> None:
    a -= a.max(axis=-1, keepdims=True)
    np.exp(a, out=a)
    a /= a.sum(axis=-1, keepdims=True)


def attention_backward(
    dy: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    att: np.ndarray,
    dq: np.ndarray,
    dk: np.ndarray,
    dv: np.ndarray,
) -> None:
    """Gradients of q, k, v (all (B, nh, T, hs)) given dy and the saved probabilities.
    `att` is consumed: it is overwritten with the score gradient."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    np.matmul(att.swapaxes(-1, -2), dy, out=dv)
    datt = dy @ v.swapaxes(-1, -2)
    # softmax backward: dscore = p * (dp - sum(dp * p)); masked entries have p = 0 and stay 0.
    rowdot = np.einsum("...ij,...ij->...i", datt, att)[..., None]
    datt -= rowdot
    att *= datt
    att *= scale
    np.matmul(att, k, out=dq)
    np.matmul(att.swapaxes(-1, -2), q, out=dk)


# ----------------------------------------------------------------------------- lm head + loss


def head_loss(
    x: np.ndarray,
    wte: np.ndarray,
    targets: np.ndarray,
    grad_scale: float | None,
    dx: np.ndarray | None,
    dwte: np.ndarray | None,
    chunk_rows: int,
    logits_out: np.ndarray | None = None,
) -> float:
    """Tied lm_head, softmax and mean cross-entropy, fused and processed in row chunks so the
    (tokens x vocab) matrix is never held whole.

    x (N, C) final-layernorm output, wte (V, C) the real (unpadded) vocabulary rows.
    Returns the mean loss over the N rows. When grad_scale is given, the gradient of
    grad_scale * mean_loss is written into dx (N, C) and accumulated into dwte (V, C):
    doing it here, while each chunk's probabilities are at hand, saves recomputing the logits.
    """
    N = x.shape[0]
    total = 0.0
    for r0 in range(0, N, chunk_rows):
        r1 = min(N, r0 + chunk_rows)
        logits = x[r0:r1] @ wte.T
        if logits_out is not None:
            logits_out[r0:r1] = logits
        rows = np.arange(r1 - r0)
        tgt = targets[r0:r1]
        logits -= logits.max(axis=1, keepdims=True)
        picked = logits[rows, tgt].astype(np.float64)
        np.exp(logits, out=logits)
        sums = logits.sum(axis=1)
        total += float(np.sum(np.log(sums.astype(np.float64)) - picked))
        if grad_scale is not None:
            logits /= sums[:, None]  # probabilities
            logits[rows, tgt] -= 1.0
            logits *= grad_scale / N
            np.matmul(logits, wte, out=dx[r0:r1])
            dwte += logits.T @ x[r0:r1]
    return total / N
