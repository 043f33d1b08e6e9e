"""Elementwise work, attention and AdamW split over threads must give the single-thread results."""

from __future__ import annotations

import numpy as np
import pytest

from distgpt.model import GPT, ModelConfig, init_params
from distgpt.optim import AdamW
from distgpt.threads import n_threads, set_threads


@pytest.fixture
def threads():
    yield set_threads
    set_threads(1)


def _step(n_threads: int, dropout: float):
    set_threads(n_threads)
    cfg = ModelConfig(n_layer=2, n_head=3, n_embd=48, block_size=160, vocab_size=300, dropout=dropout)
    model = GPT(cfg)
    init_params(model.layout, model.params, 0)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 300, (3, 150)), rng.integers(0, 300, (3, 150))
    fwd = model.forward(x, y, grad_scale=1.0, dropout_seed=(1, 2) if dropout else None)
    model.backward(fwd)
    opt = AdamW(model.layout.size, model.layout.decay_segments(), 0.9, 0.95, 1e-8, 0.1)
    opt.CHUNK = 1000                                  # many chunks, so both threads get some
    opt.step(model.params, model.grads, 1e-3, 0.5)
    return fwd.loss, model.grads.copy(), model.params.copy()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_two_threads_match_one(threads, dropout):
    loss1, grads1, params1 = _step(1, dropout)
    loss2, grads2, params2 = _step(2, dropout)
    assert n_threads() == 2
    assert abs(loss1 - loss2) <= 1e-6 * abs(loss1)
    assert np.linalg.norm(grads1 - grads2) <= 1e-6 * np.linalg.norm(grads1)
    assert np.linalg.norm(params1 - params2) <= 1e-6 * np.linalg.norm(params1)
