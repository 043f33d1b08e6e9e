"""The layer kernels of distgpt/ops.py against torch autograd, in float64."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distgpt import bf16, ops
from distgpt.threads import set_threads

from conftest import rel


def t64(a: np.ndarray, grad: bool = True) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


TOL = 1e-12  # float64 against float64: only rounding separates the two


# ----------------------------------------------------------------------------- layernorm


def test_layernorm_forward_and_backward_match_torch():
    rng = np.random.default_rng(0)
    N, C = 13, 10
    x = rng.standard_normal((N, C)) * 3 + 1.5
    w, b = 1 + 0.3 * rng.standard_normal(C), 0.5 * rng.standard_normal(C)
    dout = rng.standard_normal((N, C))

    out, xhat = np.empty((N, C)), np.empty((N, C))
    rstd = ops.layernorm_forward(x, w, b, out, xhat)
    dw0, db0 = rng.standard_normal(C), rng.standard_normal(C)  # backward must accumulate into these
    dw, db, dx = dw0.copy(), db0.copy(), np.empty((N, C))
    ops.layernorm_backward(dout, xhat, rstd, w, dw, db, dx)

    xt, wt, bt = t64(x), t64(w), t64(b)
    ref = F.layer_norm(xt, (C,), wt, bt, eps=1e-5)
    ref.backward(torch.tensor(dout))
    assert rel(out, ref.detach()) < TOL
    assert rel(dx, xt.grad) < TOL
    assert rel(dw - dw0, wt.grad) < TOL
    assert rel(db - db0, bt.grad) < TOL


def test_layernorm_backward_may_write_dx_over_dout():
    rng = np.random.default_rng(1)
    N, C = 6, 8
    x, w = rng.standard_normal((N, C)), 1 + 0.3 * rng.standard_normal(C)
    out, xhat = np.empty((N, C)), np.empty((N, C))
    rstd = ops.layernorm_forward(x, w, np.zeros(C), out, xhat)
    dout = rng.standard_normal((N, C))
    dx = np.empty((N, C))
    ops.layernorm_backward(dout, xhat, rstd, w, np.zeros(C), np.zeros(C), dx)
    aliased = dout.copy()
    ops.layernorm_backward(aliased, xhat, rstd, w, np.zeros(C), np.zeros(C), aliased)
    np.testing.assert_allclose(aliased, dx, rtol=1e-13, atol=1e-15)


# ----------------------------------------------------------------------------- gelu and linear


@pytest.mark.parametrize("jit", ["1", "0"], ids=["numba", "numpy"])
def test_gelu_is_the_tanh_approximation_and_its_backward_matches_torch(monkeypatch, jit):
    monkeypatch.setenv("DISTGPT_JIT", jit)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, 9)) * 3
    out = ops.gelu_forward(x, np.empty_like(x))
    xt = t64(x)
    ref = F.gelu(xt, approximate="tanh")
    dout = rng.standard_normal(x.shape)
    ref.backward(torch.tensor(dout))
    assert rel(out, ref.detach()) < TOL
    out2, slope = np.empty_like(x), np.empty_like(x)
    ops.gelu_forward(x, out2, slope=slope)             # what backward uses: output and slope at once
    np.testing.assert_array_equal(out2, out)
    assert rel(dout * slope, xt.grad) < TOL

    dx = np.empty_like(x)
    ops.gelu_backward(dout, x, dx)
    assert rel(dx, xt.grad) < TOL
    aliased = dout.copy()  # the model writes dx over dout
    ops.gelu_backward(aliased, x, aliased)
    np.testing.assert_allclose(aliased, dx, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_gelu_is_bitwise_the_numpy_twin(monkeypatch, dtype, threads):
    """Same float operations in the same order, NumPy's exp in both: identical bits, also where
    exp overflows (x << 0) and on blocks and thread splits that end mid-row."""
    rng = np.random.default_rng(12)
    x = (rng.standard_normal((37, 29)) * 4).astype(dtype)
    x[0, :4] = [-100.0, 100.0, 0.0, -0.0]
    dout = rng.standard_normal(x.shape).astype(dtype)
    monkeypatch.setattr(ops, "BLOCK_ELEMS", 5 * 29)
    set_threads(threads)
    try:
        results = []
        for flag in ("0", "1"):
            monkeypatch.setenv("DISTGPT_JIT", flag)
            out, out2, slope, dx = (np.full_like(x, np.nan) for _ in range(4))
            ops.gelu_forward(x, out)
            ops.gelu_forward(x, out2, slope=slope)
            ops.gelu_backward(dout, x, dx)
            results.append((out, out2, slope, dx))
    finally:
        set_threads(1)
    for name, a, b in zip(("out", "out with slope", "slope", "dx"), *results, strict=True):
        assert np.isfinite(b).all(), name
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_gelu_refuses_arrays_it_would_have_to_copy():
    x = np.zeros((4, 6))
    with pytest.raises(ValueError, match="contiguous"):
        ops.gelu_forward(x[:, :3], np.empty((4, 3)))


def test_matmul_bf16_multiplies_the_bits_and_matmul_refuses_them(bf16_here):
    rng = np.random.default_rng(11)
    K = 64
    a16 = bf16.to_bf16(rng.standard_normal((70, K), dtype=np.float32))
    b16 = bf16.to_bf16(rng.standard_normal((K, 9), dtype=np.float32))
    out = ops.matmul_bf16(a16, b16, np.empty((70, 9), np.float32))
    ref = bf16.to_float32(a16).astype(np.float64) @ bf16.to_float32(b16).astype(np.float64)
    # a bf16 x bf16 product is exact in float32 (8 + 8 significant bits); only the K-term float32
    # sums round, by at most K * 2^-24 of the sum of |terms|, which for random signs is about
    # sqrt(K) times the result: K^1.5 * 2^-24 = 3e-5
    assert rel(out, ref) < 3e-5
    with pytest.raises(TypeError, match="bf16 bits .uint16. go through ops.matmul_bf16"):
        ops.matmul(a16, b16, out)


def test_bf16_linear_takes_float32_or_stored_bf16_inputs_alike(bf16_here):
    """A bf16 model stores some linear inputs as bf16 bits and passes others as float32 (rounded
    inside, per thread): both give the same bits, forward and backward."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((130, 24), dtype=np.float32)
    w = rng.standard_normal((24, 10), dtype=np.float32)
    b, dout = rng.standard_normal(10, dtype=np.float32), rng.standard_normal((130, 10), dtype=np.float32)
    w16, ws = bf16.to_bf16(w), bf16.Workspace()
    results = []
    for given in (x, bf16.to_bf16(x)):
        out = ops.linear_forward_bf16(given, w16, b, np.empty((130, 10), np.float32), ws)
        dw, db, dx = np.empty_like(w), np.empty_like(b), np.empty_like(x)
        ops.linear_backward_bf16(dout, given, w16, dw, db, dx, False, ws)
        results.append((out, dw, db, dx))
    for got, want in zip(*results, strict=True):
        np.testing.assert_array_equal(got, want)
    assert 1e-4 < rel(results[0][0], x.astype(np.float64) @ w + b) < 2e-2    # bf16-rounded, not float32
    with pytest.raises(TypeError, match="float32 or bf16 bits"):
        ops.linear_forward_bf16(x.astype(np.float64), w16, b, np.empty((130, 10), np.float32), ws)


def test_linear_backward_accumulates_weight_grads_and_writes_dx():
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 6)), rng.standard_normal(6)
    out = ops.linear_forward(x, w, b, np.empty((5, 6)))
    xt, wt, bt = t64(x), t64(w), t64(b)
    ref = xt @ wt + bt
    dout = rng.standard_normal((5, 6))
    ref.backward(torch.tensor(dout))
    dw0, db0 = rng.standard_normal((4, 6)), rng.standard_normal(6)
    dw, db, dx = dw0.copy(), db0.copy(), np.empty((5, 4))
    ops.linear_backward(dout, x, w, dw, db, dx)
    assert rel(out, ref.detach()) < TOL
    assert rel(dx, xt.grad) < TOL
    assert rel(dw - dw0, wt.grad) < TOL
    assert rel(db - db0, bt.grad) < TOL


# ----------------------------------------------------------------------------- attention


def test_causal_mask_blocks_the_future_and_keys_outside_the_band():
    T, w = 7, 3
    for window in (None, w):
        blocked = ops.causal_mask(T, window)
        for t in range(T):
            for s in range(T):
                visible = s <= t and (window is None or s > t - window)
                assert blocked[t, s] == (not visible), (window, t, s)


def torch_attention(q, k, v, blocked):
    scores = (q @ k.transpose(-1, -2)) / np.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.tensor(blocked), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("heads_per_run", [1, 2, 3])     # 2-D per head, mixed, all heads batched
@pytest.mark.parametrize("T", [9, 300])                 # one query block, and several (ATTN_BLOCK = 128)
@pytest.mark.parametrize("window", [None, 2, 4, 130])
def test_attention_forward_and_backward_match_torch(monkeypatch, window, T, heads_per_run):
    rng = np.random.default_rng(4)
    B, nh, hs = 2, 3, 4
    monkeypatch.setattr(ops, "BLOCK_ELEMS", heads_per_run * min(T, ops.ATTN_BLOCK) * T)
    runs = list(ops._head_groups(0, B * nh, nh, T, T))
    assert max(1 if isinstance(h, int) else h.stop - h.start for _, h in runs) == heads_per_run
    q, k, v = (rng.standard_normal((B, nh, T, hs)) for _ in range(3))
    blocked = ops.causal_mask(T, window)
    y, lse = np.empty((B, nh, T, hs)), np.empty((B, nh, T))
    ops.attention_forward(q, k, v, window, y, lse)

    qt, kt, vt = t64(q), t64(k), t64(v)
    ref = torch_attention(qt, kt, vt, blocked)
    dy = rng.standard_normal(y.shape)
    ref.backward(torch.tensor(dy))
    assert rel(y, ref.detach()) < TOL
    scores = (qt @ kt.transpose(-1, -2)).detach() / np.sqrt(hs)
    ref_lse = torch.logsumexp(scores.masked_fill(torch.tensor(blocked), float("-inf")), dim=-1)
    assert rel(lse, ref_lse) < TOL

    dq, dk, dv = (np.full_like(q, np.nan) for _ in range(3))     # written, not accumulated
    ops.attention_backward(dy, q, k, v, y, lse, window, dq, dk, dv)
    assert rel(dq, qt.grad) < TOL
    assert rel(dk, kt.grad) < TOL
    assert rel(dv, vt.grad) < TOL


@pytest.mark.parametrize("window", [None, 50])
@pytest.mark.parametrize("heads_per_run,threads", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_attention_with_dropout_matches_torch(monkeypatch, threads, heads_per_run, window):
    rng = np.random.default_rng(8)
    B, nh, T, hs, p = 1, 2, 140, 4, 0.3
    monkeypatch.setattr(ops, "BLOCK_ELEMS", heads_per_run * min(T, ops.ATTN_BLOCK) * T)
    q, k, v = (rng.standard_normal((B, nh, T, hs)) for _ in range(3))
    keep = rng.random((B, nh, T, T)) >= p
    y, lse = np.empty((B, nh, T, hs)), np.empty((B, nh, T))
    dq, dk, dv = (np.empty_like(q) for _ in range(3))
    dy = rng.standard_normal(y.shape)
    set_threads(threads)
    try:
        ops.attention_forward(q, k, v, window, y, lse, keep=keep, keep_scale=1 / (1 - p))
        ops.attention_backward(dy, q, k, v, y, lse, window, dq, dk, dv, keep=keep, keep_scale=1 / (1 - p))
    finally:
        set_threads(1)
    qt, kt, vt = t64(q), t64(k), t64(v)
    scores = (qt @ kt.transpose(-1, -2)) / np.sqrt(hs)
    blocked = torch.tensor(ops.causal_mask(T, window))
    probs = torch.softmax(scores.masked_fill(blocked, float("-inf")), dim=-1)
    ref = (probs * torch.tensor(keep) / (1 - p)) @ vt
    ref.backward(torch.tensor(dy))
    assert rel(y, ref.detach()) < TOL
    assert rel(dq, qt.grad) < TOL and rel(dk, kt.grad) < TOL and rel(dv, vt.grad) < TOL


@pytest.mark.parametrize("window, dropout, threads", [(None, False, 1), (130, False, 2), (None, True, 2),
                                                     (50, True, 1)])
def test_bf16_attention_matches_float64_on_the_rounded_inputs(bf16_here, window, dropout, threads):
    """bf16 q/k/v (views into a (B*T, 3C) bf16 buffer, as the model stores them): the matmuls take
    bf16 roundings of the probabilities, dy and the scores' gradient, so results are within a few
    bf16 units of float64 attention on the same rounded q/k/v, and not float64-exact."""
    rng = np.random.default_rng(10)
    B, nh, T, hs, p = 2, 3, 300, 16, 0.2
    qkv16 = bf16.to_bf16(rng.standard_normal((B * T, 3 * nh * hs), dtype=np.float32))
    q, k, v = qkv16.reshape(B, T, 3, nh, hs).transpose(2, 0, 3, 1, 4)
    keep = rng.random((B, nh, T, T)) >= p if dropout else None
    scale = 1 / (1 - p) if dropout else 1.0
    y, lse = np.empty((B, nh, T, hs), np.float32), np.empty((B, nh, T), np.float32)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dq, dk, dv = (np.full(y.shape, np.nan, np.float32) for _ in range(3))
    set_threads(threads)
    try:
        ops.attention_forward_bf16(q, k, v, window, y, lse, keep=keep, keep_scale=scale)
        ops.attention_backward_bf16(dy, q, k, v, lse, window, dq, dk, dv, keep=keep, keep_scale=scale)
    finally:
        set_threads(1)
    qt, kt, vt = (t64(bf16.to_float32(np.ascontiguousarray(a))) for a in (q, k, v))
    scores = (qt @ kt.transpose(-1, -2)) / np.sqrt(hs)
    probs = torch.softmax(scores.masked_fill(torch.tensor(ops.causal_mask(T, window)), float("-inf")), -1)
    if dropout:
        probs = probs * torch.tensor(keep) * scale
    ref = probs @ vt
    ref.backward(torch.tensor(dy, dtype=torch.float64))
    for got, want in [(y, ref.detach()), (dq, qt.grad), (dk, kt.grad), (dv, vt.grad)]:
        assert 1e-6 < rel(got, want) < 1e-2
    with pytest.raises(TypeError, match="takes q, k, v as bf16 bits"):
        ops.attention_forward_bf16(q, bf16.to_float32(np.ascontiguousarray(k)), v, window, y, lse)
    with pytest.raises(TypeError, match="takes q, k, v as bf16 bits"):
        v32 = bf16.to_float32(np.ascontiguousarray(v))
        ops.attention_backward_bf16(dy, q, k, v32, lse, window, dq, dk, dv)


def test_attention_works_on_strided_views_of_the_qkv_buffer():
    """The model hands attention views into its (B*T, 3C) buffer; results must equal contiguous inputs."""
    rng = np.random.default_rng(9)
    B, T, nh, hs = 2, 20, 3, 4
    qkv = rng.standard_normal((B * T, 3 * nh * hs))
    views = qkv.reshape(B, T, 3, nh, hs).transpose(2, 0, 3, 1, 4)
    y_buf = np.empty((B * T, nh * hs))
    y_view = y_buf.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)
    lse = np.empty((B, nh, T))
    ops.attention_forward(views[0], views[1], views[2], None, y_view, lse)
    contiguous = [np.ascontiguousarray(a) for a in views]
    y_ref, lse_ref = np.empty((B, nh, T, hs)), np.empty((B, nh, T))
    ops.attention_forward(*contiguous, None, y_ref, lse_ref)
    np.testing.assert_array_equal(y_view, y_ref)
    np.testing.assert_array_equal(lse, lse_ref)


def test_banded_attention_output_ignores_keys_outside_the_window():
    rng = np.random.default_rng(5)
    B, nh, T, hs, w = 1, 2, 10, 4, 3
    q, k, v = (rng.standard_normal((B, nh, T, hs)) for _ in range(3))

    def attend(k, v):
        y = np.empty((B, nh, T, hs))
        ops.attention_forward(q, k, v, w, y, np.empty((B, nh, T)))
        return y

    base = attend(k, v)
    t = 8
    for s in range(T):
        k2, v2 = k.copy(), v.copy()
        k2[:, :, s] += 5.0 * rng.standard_normal((B, nh, hs))
        v2[:, :, s] += 5.0 * rng.standard_normal((B, nh, hs))
        changed = not np.allclose(attend(k2, v2)[:, :, t], base[:, :, t], rtol=0, atol=1e-12)
        assert changed == (t - w < s <= t), s


# ----------------------------------------------------------------------------- lm head + loss


def head_inputs(seed: int = 6):
    rng = np.random.default_rng(seed)
    N, C, V = 20, 6, 13
    x = rng.standard_normal((N, C))
    wte = rng.standard_normal((V, C))
    targets = rng.integers(0, V, N)
    return x, wte, targets


def run_head(x, wte, targets, grad_scale, chunk_rows, dwte0=None):
    dx = np.empty_like(x)
    dwte = np.zeros_like(wte) if dwte0 is None else dwte0.copy()
    logits = np.empty((x.shape[0], wte.shape[0]))
    loss = ops.head_loss(x, wte, targets, grad_scale, dx, dwte, chunk_rows, logits)
    return loss, dx, dwte, logits


def test_head_loss_matches_torch_cross_entropy_and_its_gradients():
    x, wte, targets = head_inputs()
    scale = 0.375
    dwte0 = np.random.default_rng(7).standard_normal(wte.shape)
    loss, dx, dwte, logits = run_head(x, wte, targets, scale, 512, dwte0)

    xt, wt = t64(x), t64(wte)
    ref_logits = xt @ wt.T
    ref_loss = F.cross_entropy(ref_logits, torch.tensor(targets))
    (scale * ref_loss).backward()
    assert abs(loss - ref_loss.item()) < 1e-12 * abs(ref_loss.item())
    assert rel(logits, ref_logits.detach()) < TOL
    assert rel(dx, xt.grad) < TOL
    assert rel(dwte - dwte0, wt.grad) < TOL  # accumulated, not overwritten


def test_head_loss_without_grad_scale_leaves_gradients_alone():
    x, wte, targets = head_inputs()
    dx, dwte = np.full_like(x, 7.0), np.full_like(wte, 7.0)
    loss = ops.head_loss(x, wte, targets, None, dx, dwte, 4)
    assert loss == pytest.approx(run_head(x, wte, targets, 1.0, 512)[0], rel=1e-13)
    assert np.all(dx == 7.0) and np.all(dwte == 7.0)


@pytest.mark.parametrize("chunk_rows", [1, 7, 25])
def test_head_loss_is_independent_of_the_chunk_size(chunk_rows):
    x, wte, targets = head_inputs()
    assert x.shape[0] % 7 != 0 and 25 > x.shape[0]  # a ragged last chunk, and one chunk bigger than N
    ref = run_head(x, wte, targets, 0.5, x.shape[0])
    got = run_head(x, wte, targets, 0.5, chunk_rows)
    assert got[0] == pytest.approx(ref[0], rel=1e-13)
    for a, b in zip(got[1:], ref[1:], strict=True):
        assert rel(a, b) < 1e-13
