"""AdamW, gradient clipping and the learning-rate schedule (distgpt/optim.py) against torch."""

import math

import numpy as np
import pytest
import torch

from distgpt import jit
from distgpt.model import Layout, ModelConfig, init_params
from distgpt.optim import AdamW, clip_coefficient, lr_at
from distgpt.threads import set_threads

from conftest import rel

CFG = ModelConfig(n_layer=2, n_head=2, n_embd=8, block_size=8, vocab_size=11)  # wte padded to 64 rows
LR, MIN_LR, WARMUP, MAX_STEPS = 1e-2, 1e-3, 2, 5
BETAS, EPS, WD, MAX_NORM = (0.9, 0.95), 1e-8, 0.1, 1.0
GRAD_NORMS = (3.0, 0.5, 2.0, 0.2, 5.0)  # clipping on steps 0, 2, 4 only


def schedule(step: int) -> float:
    """The schedule written out by hand: linear warmup, cosine decay, then the floor."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    if step >= MAX_STEPS:
        return MIN_LR
    frac = (step - WARMUP) / (MAX_STEPS - WARMUP)
    return MIN_LR + (LR - MIN_LR) * (math.cos(math.pi * frac) + 1) / 2


# ----------------------------------------------------------------------------- schedule and clipping


def test_lr_schedule_warms_up_peaks_decays_by_cosine_and_ends_at_min_lr():
    got = [lr_at(s, LR, MIN_LR, WARMUP, MAX_STEPS) for s in range(MAX_STEPS + 3)]
    d = LR - MIN_LR
    expected = [LR / 2, LR, LR, MIN_LR + 0.75 * d, MIN_LR + 0.25 * d, MIN_LR, MIN_LR, MIN_LR]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    np.testing.assert_allclose(got, [schedule(s) for s in range(MAX_STEPS + 3)], rtol=1e-12)


def test_lr_schedule_is_monotone_over_a_long_run():
    lrs = np.array([lr_at(s, 6e-4, 6e-5, 100, 1000) for s in range(1100)])
    assert lrs[0] == pytest.approx(6e-6) and lrs.max() == pytest.approx(6e-4)
    assert np.all(np.diff(lrs[:100]) > 0)
    assert np.all(np.diff(lrs[100:]) <= 1e-18)
    assert lrs[999] > 6e-5 and np.all(lrs[1000:] == 6e-5)


@pytest.mark.parametrize("norm", [0.3, 1.0, 4.0])
def test_clip_coefficient_is_the_factor_torch_clip_grad_norm_applies(norm):
    g = torch.ones(16, dtype=torch.float64) * (norm / 4.0)
    p = torch.zeros(16, dtype=torch.float64, requires_grad=True)
    p.grad = g.clone()
    total = torch.nn.utils.clip_grad_norm_([p], MAX_NORM)
    assert float(total) == pytest.approx(norm, rel=1e-12)
    coef = clip_coefficient(norm, MAX_NORM)
    np.testing.assert_allclose(g.numpy() * coef, p.grad.numpy(), rtol=1e-12)
    assert (coef == 1.0) == (norm < MAX_NORM)  # at exactly max_norm torch still scales by 1 - 1e-6


def test_clip_coefficient_is_one_when_clipping_is_disabled():
    assert clip_coefficient(1e6, 0.0) == 1.0


# ----------------------------------------------------------------------------- decay segments


def test_decay_segments_flag_exactly_the_2d_weights():
    layout = Layout(CFG)
    flags = np.full(layout.size, -1)
    segs = layout.decay_segments()
    for lo, hi, decay in segs:
        assert np.all(flags[lo:hi] == -1)  # no overlaps
        flags[lo:hi] = decay
    for e in layout.entries:
        assert np.all(flags[e.offset : e.offset + e.size] == (len(e.shape) == 2)), e.name
    assert all(a[2] != b[2] for a, b in zip(segs, segs[1:], strict=False))  # neighbours are merged


def test_decay_segments_of_a_slice_are_relative_to_its_start():
    layout = Layout(CFG)
    full = np.zeros(layout.size, bool)
    for lo, hi, decay in layout.decay_segments():
        full[lo:hi] = decay
    start, end = 700, 1500  # cuts through tensors at both ends
    part = np.full(end - start, -1)
    for lo, hi, decay in layout.decay_segments(start, end):
        part[lo:hi] = decay
    np.testing.assert_array_equal(part, full[start:end])


# ----------------------------------------------------------------------------- AdamW against torch


def random_grads(layout: Layout, rng: np.random.Generator, norm: float) -> np.ndarray:
    g = rng.standard_normal(layout.size)
    g[layout.by_name["wte"].offset + CFG.vocab_size * CFG.n_embd : layout.by_name["wpe"].offset] = 0.0
    return g * (norm / np.linalg.norm(g))


def initial_params(layout: Layout) -> np.ndarray:
    params = np.zeros(layout.size)
    init_params(layout, params, seed=0)
    rng = np.random.default_rng(1)
    p = layout.views(params)
    for e in layout.entries:  # move biases and gains off 0 / 1 so decay-or-not is visible
        if len(e.shape) == 1:
            p[e.name][...] += 0.2 * rng.standard_normal(e.shape)
    return params


def run_ours(layout, params, grad_seq, dtype, start=0, end=None, compiled=None):
    end = layout.size if end is None else end
    params = params.astype(dtype)
    opt = AdamW(end - start, layout.decay_segments(start, end), *BETAS, EPS, WD, dtype=dtype,
                compiled=compiled)
    history, coefs = [], []
    for step, g in enumerate(grad_seq):
        g = g.astype(dtype)
        g_before = g.copy()
        coef = clip_coefficient(float(np.linalg.norm(g.astype(np.float64))), MAX_NORM)
        opt.step(params[start:end], g[start:end], lr_at(step, LR, MIN_LR, WARMUP, MAX_STEPS), coef)
        np.testing.assert_array_equal(g, g_before)  # clipping scales on the fly, grads untouched
        history.append(params.copy())
        coefs.append(coef)
    return history, coefs


def run_torch(layout, params, grad_seq, dtype):
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    views = layout.views(params)
    tp = {n: torch.tensor(v, dtype=tdtype, requires_grad=True) for n, v in views.items()}
    groups = [
        {"params": [t for t in tp.values() if t.dim() == 2], "weight_decay": WD},
        {"params": [t for t in tp.values() if t.dim() == 1], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s) / LR)
    history, clipped = [], []
    for g in grad_seq:
        gv = layout.views(g)
        for n, t in tp.items():
            t.grad = torch.tensor(gv[n], dtype=tdtype)
        total = torch.nn.utils.clip_grad_norm_(list(tp.values()), MAX_NORM)
        clipped.append(float(total) > MAX_NORM)
        opt.step()
        sched.step()
        flat = np.zeros(layout.size)
        for n, t in tp.items():
            layout.views(flat)[n][...] = t.detach().numpy()
        history.append(flat)
    return history, clipped


@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "numpy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adamw_with_clipping_and_schedule_matches_torch_every_step(dtype, compiled):
    layout = Layout(CFG)
    params = initial_params(layout)
    rng = np.random.default_rng(2)
    grad_seq = [random_grads(layout, rng, n) for n in GRAD_NORMS]

    ours, coefs = run_ours(layout, params, grad_seq, dtype, compiled=compiled)
    ref, clipped = run_torch(layout, params, grad_seq, dtype)
    assert clipped == [True, False, True, False, True]
    assert [c < 1.0 for c in coefs] == clipped
    tol = 1e-6 if dtype == np.float32 else 1e-12
    for step, (a, b) in enumerate(zip(ours, ref, strict=True)):
        for e in layout.entries:
            sl = slice(e.offset, e.offset + e.size)
            if e.name == "wte":  # the padded rows have zero grad and must stay exactly zero
                pad = slice(e.offset + CFG.vocab_size * CFG.n_embd, e.offset + e.size)
                assert np.all(a[pad] == 0.0)
                sl = slice(e.offset, pad.start)
            assert rel(a[sl], b[sl]) < tol, (step, e.name)
    assert rel(ours[-1], params) > 1e-3  # the parameters did move


def test_adamw_over_two_slices_equals_adamw_over_the_whole_vector():
    """ZeRO-1: each rank updates its own byte range with its own moments; the union must be the
    same update, whatever tensor boundaries the cut falls on."""
    layout = Layout(CFG)
    params = initial_params(layout)
    rng = np.random.default_rng(3)
    grad_seq = [random_grads(layout, rng, n) for n in GRAD_NORMS]
    whole, _ = run_ours(layout, params, grad_seq, np.float64)
    cut = layout.by_name["h.0.attn.c_attn.weight"].offset + 5  # mid-tensor
    state = params.copy()
    opts = [
        AdamW(hi - lo, layout.decay_segments(lo, hi), *BETAS, EPS, WD, dtype=np.float64)
        for lo, hi in ((0, cut), (cut, layout.size))
    ]
    for step, g in enumerate(grad_seq):
        coef = clip_coefficient(float(np.linalg.norm(g)), MAX_NORM)
        lr = lr_at(step, LR, MIN_LR, WARMUP, MAX_STEPS)
        for opt, (lo, hi) in zip(opts, ((0, cut), (cut, layout.size)), strict=True):
            opt.step(state[lo:hi], g[lo:hi], lr, coef)
        np.testing.assert_allclose(state, whole[step], rtol=1e-14, atol=1e-15)


def test_adamw_result_does_not_depend_on_its_chunk_size(monkeypatch):
    layout = Layout(CFG)
    params = initial_params(layout)
    rng = np.random.default_rng(4)
    grad_seq = [random_grads(layout, rng, n) for n in GRAD_NORMS]
    big, _ = run_ours(layout, params, grad_seq, np.float64)
    monkeypatch.setattr(AdamW, "CHUNK", 37)
    small, _ = run_ours(layout, params, grad_seq, np.float64)
    np.testing.assert_allclose(small[-1], big[-1], rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_adamw_is_bitwise_the_numpy_update(monkeypatch, dtype, threads):
    """The numba loop and the ufunc chunks do the same float operations in the same order, so
    parameters and both moments agree to the bit: with and without decay, clipping, over steps
    (bias correction changes), on chunk and thread splits that cut tensors anywhere."""
    layout = Layout(CFG)
    rng = np.random.default_rng(5)
    start, end = 37, layout.size - 11      # a ZeRO-style slice with ragged ends
    segments = layout.decay_segments(start, end)
    assert {decay for _, _, decay in segments} == {True, False}
    monkeypatch.setattr(AdamW, "CHUNK", 53)
    set_threads(threads)
    try:
        params0 = (rng.standard_normal(end - start) * 0.1).astype(dtype)
        results = []
        for compiled in (False, True):
            opt = AdamW(end - start, segments, *BETAS, EPS, WD, dtype=dtype, compiled=compiled)
            params = params0.copy()
            for step, scale in enumerate((1.0, 0.37, 1.0, 0.9)):
                grads = np.random.default_rng(step).standard_normal(end - start).astype(dtype)
                opt.step(params, grads, lr=1e-2 / (step + 1), grad_scale=scale)
            results.append((params, opt.m, opt.v))
    finally:
        set_threads(1)
    for (name, a), b in zip((("params", x) for x in results[0]), results[1], strict=True):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert not np.array_equal(results[1][0], params0)


def test_numpy_scalars_do_not_change_the_numpy_path(monkeypatch):
    """A np.float64 lr or clip factor must not push the ufunc path into float64 arithmetic
    (NumPy 2 treats it as a strong type) while the compiled loop rounds it to float32."""
    n = 1000
    rng = np.random.default_rng(6)
    p0, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    results = []
    for compiled in (False, True):
        for lr, scale in ((1e-3, 0.37), (np.float64(1e-3), np.float64(0.37))):
            opt = AdamW(n, [(0, n, True)], *BETAS, EPS, WD, compiled=compiled)
            p = p0.copy()
            opt.step(p, g, lr, scale)
            results.append(p)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_adamw_refuses_arrays_of_the_wrong_size_or_dtype():
    opt = AdamW(8, [(0, 8, True)], *BETAS, EPS, WD)
    ok = np.zeros(8, np.float32)
    for params, grads in ((np.zeros(7, np.float32), ok), (ok, np.zeros(9, np.float32)),
                          (np.zeros(8), ok), (ok, np.zeros(8))):
        with pytest.raises(ValueError, match="AdamW over 8 float32"):
            opt.step(params, grads, 1e-3)


def test_a_kernel_that_cannot_be_cached_is_compiled_anyway(monkeypatch):
    """No writable cache directory (read-only install and home): warn and compile every run."""
    import numba

    real_njit = numba.njit

    def njit(*args, cache=False, **kwargs):
        if cache:
            raise RuntimeError("cannot cache function 'f': no locator available for file 'x.py'")
        return real_njit(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", njit)

    def double(a):
        for i in range(a.shape[0]):
            a[i] *= 2.0

    kernel = jit.Kernel(double)
    a = np.ones(3)
    with pytest.warns(UserWarning, match="NUMBA_CACHE_DIR"):
        kernel(a)
    kernel(a)
    np.testing.assert_array_equal(a, [4.0, 4.0, 4.0])


def test_adamw_uses_the_compiled_loop_unless_distgpt_jit_is_0(monkeypatch):
    assert jit.numba_installed(), "numba is a dependency of distgpt"
    monkeypatch.delenv("DISTGPT_JIT", raising=False)
    assert AdamW(4, [(0, 4, True)], *BETAS, EPS, WD).compiled
    monkeypatch.setenv("DISTGPT_JIT", "0")
    assert not AdamW(4, [(0, 4, True)], *BETAS, EPS, WD).compiled
    monkeypatch.delenv("DISTGPT_JIT")
    monkeypatch.setattr(jit, "numba_installed", lambda: False)
    assert not AdamW(4, [(0, 4, True)], *BETAS, EPS, WD).compiled
    with pytest.raises(RuntimeError, match="numba"):
        AdamW(4, [(0, 4, True)], *BETAS, EPS, WD, compiled=True)


def test_adamw_rejects_segments_that_do_not_cover_the_slice():
    with pytest.raises(ValueError, match="cover"):
        AdamW(10, [(0, 6, True)], *BETAS, EPS, WD)
