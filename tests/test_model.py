"""The NumPy GPT-2 (distgpt/model.py): forward, backward, dropout, banded attention and the KV cache,
checked against Hugging Face's GPT2LMHeadModel, a PyTorch reference and finite differences."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from distgpt.model import GPT, ModelConfig
from distgpt.weights import from_hf_state_dict, to_hf_state_dict

from conftest import rel, tiny_hf_gpt2

V, C, NH, BLOCK = 1000, 48, 3, 32  # odd sizes: head size 16, vocab padded 1000 -> 1024
B, T = 3, 17


def tokens(seed: int, shape: tuple[int, int], vocab: int = V) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, shape), rng.integers(0, vocab, shape)


def randomize(m: GPT, seed: int, weight_std: float = 0.1) -> None:
    """Parameters well away from GPT-2's init (gains != 1, biases != 0) so every gradient is exercised."""
    rng = np.random.default_rng(seed)
    for e in m.layout.entries:
        leaf = e.name.rsplit(".", 1)[-1]
        if ".ln_" in f".{e.name}" and leaf == "weight":
            val = 1.0 + 0.2 * rng.standard_normal(e.shape)
        elif leaf == "bias":
            val = 0.1 * rng.standard_normal(e.shape)
        else:
            val = weight_std * rng.standard_normal(e.shape)
        m.p[e.name][...] = val
    m.p["wte"][m.cfg.vocab_size :] = 0.0


def train_step(m: GPT, idx, tgt, grad_scale=1.0, **kw):
    m.zero_grad()
    fwd = m.forward(idx, tgt, grad_scale=grad_scale, **kw)
    m.backward(fwd)
    return fwd.loss, m.logits(idx)


# ----------------------------------------------------------------------------- against Hugging Face


def hf_reference(n_layer: int, seed: int = 0) -> transformers.GPT2LMHeadModel:
    hf = tiny_hf_gpt2(V, BLOCK, C, n_layer, NH, seed=seed)
    with torch.no_grad():  # perturb in float32, so the weights are exact in both models
        for name, p in hf.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:  # biases and weights alike: N(0, 0.1)
                p.copy_(0.1 * torch.randn_like(p))
    return hf.double()


def ours_from_hf(hf, n_layer: int) -> GPT:
    m = GPT(ModelConfig(n_layer=n_layer, n_head=NH, n_embd=C, block_size=BLOCK, vocab_size=V))
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    from_hf_state_dict(m.layout, sd, m.params)
    return m


@pytest.mark.parametrize("n_layer", [2, 3])
def test_logits_loss_and_every_gradient_match_hugging_face(n_layer, blas_backend):
    hf = hf_reference(n_layer)
    m = ours_from_hf(hf, n_layer)
    idx, tgt = tokens(1, (B, T))

    loss, logits = train_step(m, idx, tgt)
    ref_logits = hf(input_ids=torch.tensor(idx)).logits
    ref_loss = F.cross_entropy(ref_logits.reshape(-1, V), torch.tensor(tgt).reshape(-1))
    ref_loss.backward()

    assert logits.shape == (B, T, V)  # padded vocabulary rows are not logits
    assert rel(logits, ref_logits.detach()) < 1e-5
    assert abs(loss - ref_loss.item()) < 1e-5 * ref_loss.item()
    ours = to_hf_state_dict(m.layout, m.grads)
    ref = {n: p.grad.numpy() for n, p in hf.named_parameters()}
    assert set(ours) == set(ref)
    for name, g in ref.items():
        assert rel(ours[name], g) < 1e-4, name
    assert np.all(m.g["wte"][V:] == 0.0)


def test_hf_state_dict_round_trips():
    hf = hf_reference(2)
    m = ours_from_hf(hf, 2)
    back = to_hf_state_dict(m.layout, m.params)
    sd = hf.state_dict()
    for name, arr in back.items():
        np.testing.assert_array_equal(arr, sd[name].numpy().astype(np.float32), err_msg=name)
    assert np.all(m.p["wte"][V:] == 0.0)


def test_padded_vocabulary_rows_never_reach_the_logits_or_the_loss():
    hf = hf_reference(2)
    m = ours_from_hf(hf, 2)
    idx, tgt = tokens(2, (B, T))
    loss, logits = train_step(m, idx, tgt)
    grads = m.grads.copy()
    m.p["wte"][V:] = 50.0  # garbage in the padding would dominate any softmax it leaked into
    loss2, logits2 = train_step(m, idx, tgt)
    assert loss2 == loss
    np.testing.assert_array_equal(logits2, logits)
    np.testing.assert_array_equal(m.grads, grads)
    assert np.all(m.g["wte"][V:] == 0.0)


# ----------------------------------------------------------------------------- finite differences


FD_SAMPLES = 5


@pytest.mark.parametrize(
    "extra",
    [{}, {"dropout": 0.2}, {"attention": "alternating_banded", "window": 2}],
    ids=["dense", "dropout", "banded"],
)
def test_every_parameter_gradient_matches_float64_finite_differences(extra, blas_backend):
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=8, block_size=8, vocab_size=11, **extra)
    m = GPT(cfg, dtype=np.float64)
    randomize(m, seed=3, weight_std=0.3)
    Bf, Tf = 2, 5
    idx, tgt = tokens(4, (Bf, Tf), cfg.vocab_size)
    kw = {"dropout_seed": (7, 3), "row0": 4} if cfg.dropout else {}
    if cfg.dropout:  # the masks are really applied, and fixed for this seed
        assert m.loss(idx, tgt, **kw) != m.loss(idx, tgt)
        assert m.loss(idx, tgt, **kw) == m.loss(idx, tgt, **kw)
    scale = 0.75
    train_step(m, idx, tgt, grad_scale=scale, **kw)
    assert np.all(m.g["wte"][cfg.vocab_size :] == 0.0)

    rng = np.random.default_rng(5)
    h = 1e-5
    for e in m.layout.entries:
        view = m.p[e.name]
        live = view[: cfg.vocab_size] if e.name == "wte" else view[:Tf] if e.name == "wpe" else view
        flat_ids = rng.choice(live.size, FD_SAMPLES, replace=False)
        analytic, numeric = [], []
        for i in flat_ids:
            pos = np.unravel_index(i, live.shape)
            orig = view[pos]
            view[pos] = orig + h
            up = m.loss(idx, tgt, **kw)
            view[pos] = orig - h
            down = m.loss(idx, tgt, **kw)
            view[pos] = orig
            numeric.append(scale * (up - down) / (2 * h))
            analytic.append(m.g[e.name][pos])
        err = np.linalg.norm(np.subtract(analytic, numeric))
        assert err <= 1e-6 * np.linalg.norm(numeric) + 1e-9, (e.name, analytic, numeric)


# ----------------------------------------------------------------------------- banded attention


def torch_gpt_logits(tp: dict, cfg: ModelConfig, idx: np.ndarray) -> torch.Tensor:
    """GPT-2 written directly in PyTorch; even layers causal, odd layers a causal band of `window`."""
    Bt, Tt = idx.shape
    hs = cfg.n_embd // cfg.n_head
    t = torch.arange(Tt)
    causal = t[None, :] <= t[:, None]
    band = causal & (t[None, :] > t[:, None] - cfg.window)
    x = tp["wte"][torch.tensor(idx)] + tp["wpe"][:Tt]
    for layer in range(cfg.n_layer):
        p = {k.split(".", 2)[2]: v for k, v in tp.items() if k.startswith(f"h.{layer}.")}
        h = F.layer_norm(x, (cfg.n_embd,), p["ln_1.weight"], p["ln_1.bias"], eps=1e-5)
        q, k, v = (h @ p["attn.c_attn.weight"] + p["attn.c_attn.bias"]).split(cfg.n_embd, dim=-1)
        q, k, v = (z.reshape(Bt, Tt, cfg.n_head, hs).transpose(1, 2) for z in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(hs)
        allowed = band if layer % 2 == 1 else causal
        att = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(Bt, Tt, cfg.n_embd)
        x = x + y @ p["attn.c_proj.weight"] + p["attn.c_proj.bias"]
        h = F.layer_norm(x, (cfg.n_embd,), p["ln_2.weight"], p["ln_2.bias"], eps=1e-5)
        f = F.gelu(h @ p["mlp.c_fc.weight"] + p["mlp.c_fc.bias"], approximate="tanh")
        x = x + f @ p["mlp.c_proj.weight"] + p["mlp.c_proj.bias"]
    x = F.layer_norm(x, (cfg.n_embd,), tp["ln_f.weight"], tp["ln_f.bias"], eps=1e-5)
    return x @ tp["wte"][: cfg.vocab_size].T


def test_alternating_banded_attention_matches_a_masked_torch_reference():
    cfg = ModelConfig(n_layer=3, n_head=NH, n_embd=C, block_size=BLOCK, vocab_size=V)
    cfg = ModelConfig(**{**cfg.__dict__, "attention": "alternating_banded", "window": 4})
    m = GPT(cfg)
    randomize(m, seed=6)
    idx, tgt = tokens(7, (B, T))
    loss, logits = train_step(m, idx, tgt)

    tp = {n: torch.tensor(v, dtype=torch.float64, requires_grad=True) for n, v in m.p.items()}
    ref_logits = torch_gpt_logits(tp, cfg, idx)
    ref_loss = F.cross_entropy(ref_logits.reshape(-1, V), torch.tensor(tgt).reshape(-1))
    ref_loss.backward()
    assert rel(logits, ref_logits.detach()) < 1e-5
    assert abs(loss - ref_loss.item()) < 1e-5 * ref_loss.item()
    for name, t in tp.items():
        assert rel(m.g[name], t.grad) < 1e-4, name

    dense = GPT(ModelConfig(n_layer=3, n_head=NH, n_embd=C, block_size=BLOCK, vocab_size=V), params=m.params)
    assert rel(dense.logits(idx), logits) > 1e-3  # the band does mask something


# ----------------------------------------------------------------------------- accumulation, dropout


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_two_half_scaled_micro_batches_accumulate_to_the_full_batch_gradient(dropout, blas_backend):
    cfg = ModelConfig(n_layer=2, n_head=NH, n_embd=C, block_size=BLOCK, vocab_size=V, dropout=dropout)
    m = GPT(cfg, dtype=np.float64)  # float64: the sums are re-associated, so only rounding may differ
    randomize(m, seed=8)
    idx, tgt = tokens(9, (4, T))
    seed, row0 = (11, 2), 6  # dropout masks follow the global row, whatever the micro-batching
    full_loss, _ = train_step(m, idx, tgt, dropout_seed=seed, row0=row0)
    full = m.grads.copy()

    m.zero_grad()
    losses = []
    for part in (slice(0, 2), slice(2, 4)):
        kw = {"dropout_seed": seed, "row0": row0 + part.start}
        fwd = m.forward(idx[part], tgt[part], grad_scale=0.5, **kw)
        losses.append(fwd.loss)
        m.backward(fwd)
    assert np.mean(losses) == pytest.approx(full_loss, rel=1e-12)
    assert rel(m.grads, full) < 1e-10
    assert np.all(m.g["wte"][V:] == 0.0)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_zero_grad_discards_whatever_the_buffer_held(dropout):
    # zero_grad() is lazy (the next backward overwrites instead of adding), so garbage left in the
    # buffer, e.g. by the shared-memory reducer, must not leak into the next step's gradient. A
    # head chunk of 7 rows: the first chunk overwrites the embedding gradient, the others add.
    cfg = ModelConfig(n_layer=2, n_head=NH, n_embd=C, block_size=BLOCK, vocab_size=V, dropout=dropout)
    m = GPT(cfg, dtype=np.float64, head_chunk_rows=7)
    randomize(m, seed=14)
    idx, tgt = tokens(15, (2, T))
    seed = (3, 4) if dropout else None
    train_step(m, idx, tgt, dropout_seed=seed)
    clean = m.grads.copy()
    m.grads[:] = np.nan
    train_step(m, idx, tgt, dropout_seed=seed)
    np.testing.assert_array_equal(m.grads, clean)
    m.grads[:] = 7.0                     # and a second micro-batch adds to the first
    m.zero_grad()
    for _ in range(2):
        m.backward(m.forward(idx, tgt, grad_scale=0.5, dropout_seed=seed))
    assert rel(m.grads, clean) < 1e-12
    assert np.all(m.g["wte"][V:] == 0.0) and np.all(m.g["wpe"][T:] == 0.0)


def test_dropout_needs_a_seed_and_is_deterministic_per_seed():
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=8, block_size=8, vocab_size=11, dropout=0.3)
    m = GPT(cfg, dtype=np.float64)
    randomize(m, seed=10, weight_std=0.3)
    plain = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=8, block_size=8, vocab_size=11), np.float64, m.params)
    idx, tgt = tokens(11, (2, 6), 11)
    assert m.loss(idx, tgt) == plain.loss(idx, tgt)
    a = m.loss(idx, tgt, dropout_seed=(1, 0))
    assert a == m.loss(idx, tgt, dropout_seed=(1, 0))
    assert a != m.loss(idx, tgt, dropout_seed=(1, 1))  # a new step draws new masks
    assert a != plain.loss(idx, tgt)
    fwd = m.forward(idx, tgt, grad_scale=1.0, dropout_seed=(1, 0))
    assert fwd.loss == a                                 # training draws the same masks


def test_backward_is_scaled_by_grad_scale():
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=11)
    m = GPT(cfg, dtype=np.float64)
    randomize(m, seed=12, weight_std=0.3)
    idx, tgt = tokens(13, (2, 5), 11)
    train_step(m, idx, tgt, grad_scale=1.0)
    unit = m.grads.copy()
    train_step(m, idx, tgt, grad_scale=0.25)
    np.testing.assert_allclose(m.grads, 0.25 * unit, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------- inference


def test_logits_give_the_loss_that_the_fused_head_computes():
    # logits() is a plain matmul with the tied embedding; loss() goes through the chunked, fused
    # head (3-row chunks here). Cross-entropy of the first must equal the second, and padding
    # rows (11 -> 64) must not be logits.
    m = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=8, block_size=8, vocab_size=11), np.float64,
            head_chunk_rows=3)
    randomize(m, seed=14, weight_std=0.3)
    idx, tgt = tokens(15, (2, 5), 11)
    logits = m.logits(idx)
    assert logits.shape == (2, 5, 11)
    ref = F.cross_entropy(torch.tensor(logits.reshape(-1, 11)), torch.tensor(tgt.reshape(-1))).item()
    assert m.loss(idx, tgt) == pytest.approx(ref, rel=1e-12)
    fwd = m.forward(idx, tgt, grad_scale=1.0)
    assert fwd.loss == pytest.approx(ref, rel=1e-12)


def test_backward_refuses_a_forward_whose_activations_were_overwritten():
    m = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=11))
    idx, tgt = tokens(16, (2, 5), 11)
    first = m.forward(idx, tgt, grad_scale=1.0)
    m.forward(idx, tgt, grad_scale=1.0)
    with pytest.raises(RuntimeError, match="overwritten"):
        m.backward(first)


@pytest.mark.parametrize("attention", ["dense", "alternating_banded"])
def test_kv_cache_over_the_whole_sequence_equals_the_full_forward(attention):
    cfg = ModelConfig(
        n_layer=3, n_head=NH, n_embd=C, block_size=BLOCK, vocab_size=V, attention=attention, window=5
    )
    m = GPT(cfg)
    randomize(m, seed=16)
    idx, _ = tokens(17, (B, T))
    expected = m.logits(idx)
    cache = m.new_cache(B)
    got = m.logits(idx, cache)
    assert cache.length == T
    assert rel(got, expected) < 1e-5


@pytest.mark.parametrize("recompute", ["none", "block"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_bytes_counts_every_training_buffer(precision, recompute):
    """The run header's activation memory (model.activation_bytes) is what a training model's
    Activations allocates: in a bf16 model 6 of each block's 12 (B*T, C) floats are bf16 (ln_1,
    q/k/v, attention, ln_2); under recompute one block's set and L - 1 block inputs."""
    from distgpt.model import activation_bytes

    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=16, block_size=32, vocab_size=97)
    B, T, chunk = 3, 20, 25
    m = GPT(cfg, head_chunk_rows=chunk, precision=precision, recompute=recompute)
    a = m._activations(B, T, training=True)
    arrays = [a.x, a.lnf_xhat, a.lnf_out, a.lnf_rstd, a.dlnf_out, a.logits, *vars(a.scratch).values(),
              *a.inputs]
    blocks = {name: np.stack([getattr(blk, name) for blk in a.blocks]) for name in vars(a.blocks[0])}
    assert len(a.blocks) == (cfg.n_layer if recompute == "none" else 1)
    assert len(a.inputs) == (0 if recompute == "none" else cfg.n_layer - 1)
    assert (blocks["qkv"].dtype == np.uint16) == (precision == "bf16")
    assert blocks["fc_pre"].dtype == np.float32
    total = sum(x.nbytes for x in arrays) + sum(x.nbytes for x in blocks.values())
    estimate = activation_bytes(cfg, B, T, head_chunk_rows=chunk, precision=precision, recompute=recompute)
    assert estimate == total


def test_dropout_mask_bytes_counts_what_a_training_forward_draws():
    from distgpt.model import Dropout, dropout_mask_bytes

    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=16, block_size=16, vocab_size=50, vocab_multiple=1,
                      dropout=0.1)
    drawn = Dropout.draw(cfg, 2, 8, (1, 0), 0)
    assert dropout_mask_bytes(cfg, 2, 8) == sum(m.nbytes for m in drawn.masks.values())
    assert dropout_mask_bytes(cfg.model_copy(update={"dropout": 0.0}), 2, 8) == 0


def test_evaluation_after_training_reuses_the_training_buffers_and_changes_nothing():
    """loss() and logits() run in the training set of their shape once one exists and no backward
    awaits it (a second set would cost GPT-2 XL ~200 MiB per rank); the set a step-0 evaluation
    made is freed by the first training pass. Neither changes a loss or a gradient: a model that
    evaluates between steps trains bit for bit as one that does not."""
    cfg = ModelConfig(n_layer=2, n_head=NH, n_embd=C, block_size=BLOCK, vocab_size=V)
    idx, tgt = tokens(0, (B, T))
    quiet, chatty = GPT(cfg), GPT(cfg)
    randomize(quiet, 1)
    chatty.params[:] = quiet.params
    before = chatty.loss(idx, tgt)                      # step 0: no training set yet, a set of its own
    assert list(chatty._acts) == [(B, T, False)]
    for m in (quiet, chatty):
        m.zero_grad()
        m.backward(m.forward(idx, tgt, grad_scale=1.0))
    assert list(chatty._acts) == [(B, T, True)]         # the evaluation set was freed
    assert chatty.loss(idx, tgt) == before              # ... and evaluation now runs in the training set
    chatty.logits(idx)
    assert list(chatty._acts) == [(B, T, True)]
    for m in (quiet, chatty):
        m.zero_grad()
        m.backward(m.forward(idx, tgt, grad_scale=1.0))
    assert np.array_equal(quiet.grads, chatty.grads)
    # a forward that awaits its backward keeps its buffers: evaluation takes a set of its own
    chatty.zero_grad()
    fwd = chatty.forward(idx, tgt, grad_scale=1.0)
    assert chatty.loss(idx, tgt) == before
    assert (B, T, False) in chatty._acts
    chatty.backward(fwd)
    quiet.zero_grad()
    quiet.backward(quiet.forward(idx, tgt, grad_scale=1.0))
    assert np.array_equal(quiet.grads, chatty.grads)
