"""LoRA on a frozen base (distgpt/lora.py, the model's adapters): against transformers + peft 0.21.2 on
the same weights and adapters, finite differences, recompute, and the frozen base.

Tolerances against the reference (peft's model run in float64, ours in float32; every product has
at most K = 4C = 96 terms, and depth 3 blocks):
- loss: float32 rounding is u = 2^-24 = 6e-8 per operation; a logit gathers about sqrt(K) u plus a
  few u per LayerNorm and residual add per block, so ~1e-6 relative at the worst, and the mean
  cross-entropy averages the rows' errors. 1e-5 relative leaves 10x margin (measured: 1.7e-8).
- adapter gradients: backward goes through the softmax and every block's input gradients again,
  and a gradient's entries are sums of products of both; 1e-4 relative (of the whole tensor's
  norm) as the full model's test_model.py holds its gradients to (measured: 7.0e-7 at the worst).
- AdamW: after 3 steps of lr 1e-3, a parameter moves by at most 3 lr; a relative gradient error e
  changes m / sqrt(v) by about e (more where a gradient entry is near 0, as Adam normalises it),
  plus float32 storage rounding of the parameters (|p| ~0.5: 3e-8). 1e-5 absolute is the issue's
  bound, 100x the measured 9.8e-8.
Measured on an AMD EPYC (Zen 4), NumPy's OpenBLAS, one thread.
"""

from __future__ import annotations

import math

import numpy as np
import peft  # the test extra's LoRA reference (peft==0.21.2): missing is a failure, not a skip
import pytest
import torch
import torch.nn.functional as F

from distgpt import blas, ops, threads
from distgpt.lora import DEFAULT_TARGETS, TARGETS, LoraLayout, check_targets, peft_key
from distgpt.model import GPT, ModelConfig
from distgpt.optim import AdamW
from distgpt.weights import from_hf_state_dict

from conftest import rel, tiny_hf_gpt2

# odd sizes: head size 8, vocabulary 203 padded to 256, rank 3 (scale alpha / r = 5 / 3)
V, C, NH, L, BLOCK = 203, 24, 3, 3, 16
B, T = 3, 11
RANK, ALPHA = 3, 5.0
CFG = ModelConfig(n_layer=L, n_head=NH, n_embd=C, block_size=BLOCK, vocab_size=V)


def hf_base(seed: int = 0):
    """A float32 transformers GPT-2 away from its init (gains != 1, biases != 0)."""
    hf = tiny_hf_gpt2(V, BLOCK, C, L, NH, seed=seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return hf


def lora_layout(targets=DEFAULT_TARGETS, cfg: ModelConfig = CFG, dropout: float = 0.0) -> LoraLayout:
    return LoraLayout(cfg, rank=RANK, alpha=ALPHA, targets=targets, dropout=dropout)


def trained_adapters(lo: LoraLayout, flat: np.ndarray, seed: int = 1) -> None:
    """peft's init, then B away from zero (as after some training): with B = 0 every A gradient
    is exactly zero and a comparison of them would prove nothing."""
    lo.init(flat, seed)
    rng = np.random.default_rng(seed + 100)
    for name, view in lo.views(flat).items():
        if ".lora_B." in name:
            view[...] = 0.2 * rng.standard_normal(view.shape)


def ours(hf, lo: LoraLayout, precision: str = "fp32", recompute: str = "none") -> GPT:
    m = GPT(CFG, precision=precision, recompute=recompute, lora=lo)
    from_hf_state_dict(m.layout, {k: v.detach().numpy() for k, v in hf.state_dict().items()}, m.params)
    m.weights_changed()
    trained_adapters(lo, m.lora_params)
    return m


def peft_twin(hf, lo: LoraLayout, flat: np.ndarray):
    """peft's LoRA on `hf` (GPT-2's Conv1D: fan_in_fan_out) holding our adapters. peft wraps hf's
    modules in place: build every model from hf before this."""
    config = peft.LoraConfig(r=lo.rank, lora_alpha=lo.alpha, target_modules=list(lo.targets),
                             lora_dropout=0.0, fan_in_fan_out=True)
    pm = peft.get_peft_model(hf, config)
    state = {k: torch.tensor(v) for k, v in lo.to_peft_state_dict(flat).items()}
    result = peft.set_peft_model_state_dict(pm, state)
    assert not result.unexpected_keys
    return pm


def our_name(peft_param_name: str) -> str:
    """peft's parameter name (adapter 'default' included) -> our LoRA layout's name."""
    return peft_param_name.removeprefix("base_model.model.transformer.").replace(".default.", ".")


def batch(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def step(m: GPT, idx, tgt) -> float:
    m.zero_grad()
    fwd = m.forward(idx, tgt, grad_scale=1.0)
    m.backward(fwd)
    return fwd.loss


def ref_loss(pm, idx, tgt) -> torch.Tensor:
    logits = pm(input_ids=torch.tensor(idx)).logits
    return F.cross_entropy(logits.float().reshape(-1, V), torch.tensor(tgt).reshape(-1))


# ----------------------------------------------------------------------------- the layout


def test_adapters_have_peft_shapes_and_keys():
    hf = hf_base()
    lo = lora_layout()
    flat = np.zeros(lo.size, np.float32)
    pm = peft_twin(hf, lo, flat)
    theirs = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(pm).items()}
    mine = {peft_key(e.name): e.shape for e in lo.entries}
    assert mine == theirs
    # A (r, in), B (out, r) for GPT-2's (in, out) Conv1D weights
    assert lo.by_name["h.1.mlp.c_fc.lora_A.weight"].shape == (RANK, C)
    assert lo.by_name["h.1.mlp.c_fc.lora_B.weight"].shape == (4 * C, RANK)
    assert lo.by_name["h.2.mlp.c_proj.lora_A.weight"].shape == (RANK, 4 * C)
    assert lo.scale == ALPHA / RANK
    # each block's adapters are one contiguous range, in order, covering the vector
    assert lo.layer_ranges[0][0] == 0 and lo.layer_ranges[-1][1] == lo.size
    assert all(a[1] == b[0] for a, b in zip(lo.layer_ranges, lo.layer_ranges[1:], strict=False))
    assert lo.decay_segments() == [(0, lo.size, True)]


def test_a_target_subset_adapts_only_those_matrices():
    lo = lora_layout(targets=["mlp.c_proj", "attn.c_attn"])
    assert lo.targets == ("attn.c_attn", "mlp.c_proj")          # canonical order
    assert {e.name.split(".", 2)[2].rsplit(".", 2)[0] for e in lo.entries} == {"attn.c_attn", "mlp.c_proj"}


def test_init_is_peft_s_distribution():
    """A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0, as peft draws them."""
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=16, vocab_size=50)
    lo = LoraLayout(cfg, rank=8, alpha=16)
    flat = np.full(lo.size, np.nan, np.float32)
    lo.init(flat, seed=0)
    torch.manual_seed(0)
    pm = peft.get_peft_model(tiny_hf_gpt2(50, 16, 64, 2, 4), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=list(TARGETS), fan_in_fan_out=True))
    theirs = {our_name(n): p.detach().numpy() for n, p in pm.named_parameters() if p.requires_grad}
    mine = lo.views(flat)
    assert theirs.keys() == mine.keys()
    for name, a in mine.items():
        if ".lora_B." in name:
            assert np.all(a == 0) and np.all(theirs[name] == 0), name
            continue
        bound = 1 / math.sqrt(a.shape[1])
        for draw in (a, theirs[name]):
            assert np.abs(draw).max() <= bound, name
            assert np.abs(draw).max() > 0.9 * bound, name         # uniform over the whole range
            # the uniform's standard deviation bound / sqrt(3), within 4 standard errors of it
            assert abs(draw.std() - bound / math.sqrt(3)) < 4 * 0.3 * bound / math.sqrt(draw.size), name


def test_fresh_adapters_leave_the_model_unchanged_to_the_bit():
    """B = 0: every adapter adds exact zeros, so loss and logits are the base model's."""
    hf = hf_base()
    lo = lora_layout()
    m = ours(hf, lo)
    lo.init(m.lora_params, seed=3)
    plain = GPT(CFG, params=m.params, trainable=False)
    idx, tgt = batch(2)
    assert m.loss(idx, tgt) == plain.loss(idx, tgt)
    np.testing.assert_array_equal(m.logits(idx), plain.logits(idx))


def test_an_unknown_target_is_one_line_naming_it_and_the_closest():
    with pytest.raises(ValueError) as err:
        lora_layout(targets=["attn.c_attn", "attn.c_atn"])
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == ("lora.targets: unknown target 'attn.c_atn' (did you mean 'attn.c_attn'?); expected some "
                   "of attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj")
    with pytest.raises(ValueError, match="'c_fc' \\(did you mean 'mlp.c_fc'\\?\\)"):
        check_targets(["c_fc"])
    with pytest.raises(ValueError, match="lora.targets is empty"):
        check_targets([])


@pytest.mark.parametrize("rank", [0, -1, 2.5])
def test_a_bad_rank_is_refused(rank):
    with pytest.raises(ValueError, match=f"lora.rank = {rank!r}: expected an integer >= 1"):
        LoraLayout(CFG, rank=rank)


@pytest.mark.parametrize("p", [1.0, -0.1])
def test_a_lora_dropout_outside_0_1_is_refused(p):
    with pytest.raises(ValueError, match=f"lora.dropout = {p!r}: expected 0 <= dropout < 1"):
        LoraLayout(CFG, rank=2, dropout=p)


def test_the_base_takes_no_gradient_buffer():
    lo = lora_layout()
    with pytest.raises(ValueError, match="frozen"):
        GPT(CFG, lora=lo, grads=np.zeros(GPT(CFG, trainable=False).layout.size, np.float32))
    with pytest.raises(ValueError, match="LoRA parameter buffer"):
        GPT(CFG, lora=lo, lora_params=np.zeros(lo.size + 1, np.float32))
    with pytest.raises(ValueError, match="another model config"):
        GPT(CFG, lora=LoraLayout(CFG.model_copy(update={"n_layer": 2}), rank=2))


# ----------------------------------------------------------------------------- against peft


def test_loss_and_every_adapter_gradient_match_peft(blas_backend):
    hf = hf_base()
    lo = lora_layout()
    m = ours(hf, lo)
    pm = peft_twin(hf, lo, m.lora_params).double()
    idx, tgt = batch(4)

    loss = step(m, idx, tgt)
    ref = ref_loss(pm, idx, tgt)
    ref.backward()
    assert abs(loss - ref.item()) < 1e-5 * ref.item()
    ref_grads = {our_name(n): p.grad.numpy() for n, p in pm.named_parameters() if p.requires_grad}
    grads = lo.views(m.lora_grads)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        assert np.linalg.norm(g) > 0, name                   # every adapter really gets a gradient
        assert rel(grads[name], g) < 1e-4, name
    # the base: no gradient buffer, and peft's base has no gradients either
    assert m.grads is None and m.dw is None and m.g == {}
    assert all(p.grad is None for n, p in pm.named_parameters() if not p.requires_grad)


def test_three_adamw_steps_match_torch_adamw_on_peft_and_leave_the_base_unchanged():
    hf = hf_base()
    lo = lora_layout()
    m = ours(hf, lo)
    base = m.params.copy()
    pm = peft_twin(hf, lo, m.lora_params).double()
    trainable = dict((our_name(n), p) for n, p in pm.named_parameters() if p.requires_grad)
    hp = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(trainable.values(), **hp)
    opt = AdamW(lo.size, lo.decay_segments(), 0.9, 0.95, 1e-8, 0.1)
    start = m.lora_params.copy()
    for k in range(3):
        idx, tgt = batch(10 + k)
        step(m, idx, tgt)
        opt.step(m.lora_params, m.lora_grads, hp["lr"])
        ref_opt.zero_grad()
        ref_loss(pm, idx, tgt).backward()
        ref_opt.step()
    mine = lo.views(m.lora_params)
    for name, p in trainable.items():
        assert np.abs(mine[name] - p.detach().numpy()).max() < 1e-5, name
    assert np.abs(m.lora_params - start).max() > 1e-3          # the adapters did move (3 steps of ~lr)
    np.testing.assert_array_equal(m.params, base)              # the base did not, to the bit


def test_merged_weights_are_peft_s_merge_and_give_the_lora_model_s_logits():
    hf = hf_base()
    lo = lora_layout()
    m = ours(hf, lo)
    pm = peft_twin(hf, lo, m.lora_params)
    before = m.params.copy()
    merged = lo.merged(m.params, m.lora_params)
    np.testing.assert_array_equal(m.params, before)           # merged() leaves the base alone
    plain = GPT(CFG, params=merged, trainable=False)
    idx, _ = batch(5)
    assert rel(plain.logits(idx), m.logits(idx)) < 1e-5
    ref = {k: v.detach().numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    mine = plain.p
    for layer in range(L):
        for t in TARGETS:
            name = f"h.{layer}.{t}.weight"
            assert rel(mine[name], ref[f"transformer.{name}"]) < 1e-6, name


def test_bf16_adapters_multiply_the_bf16_roundings_of_every_operand(bf16_here):
    """A bf16 model's adapter products, stage by stage, against float64 on the roundings autocast
    would make (x, dout, A, B, then u and du): u = s x@A.T, out += u16@B.T, du = s dout@B,
    db = dout.T@u16, da = du16.T@x, dx += du16@A. Each stage is checked from the previous stage's
    own output (a float32 u one ulp off the float64 one may round to another bf16 value), so the
    only difference left is float32 accumulation over at most 40 exact bf16 products: ~40 x 2^-24
    of the terms' magnitude, under the 1e-5 (norm-relative) used. The float32 adapters on the same
    unrounded operands differ by ~2^-9 relative (the roundings), which that bound sees."""
    from distgpt import bf16

    rng = np.random.default_rng(7)
    rows, n_in, n_out, r, scale = 37, 40, 24, 4, 2.0
    x, dout = rng.standard_normal((rows, n_in), np.float32), rng.standard_normal((rows, n_out), np.float32)
    a, b = rng.standard_normal((r, n_in), np.float32), rng.standard_normal((n_out, r), np.float32)
    x16, d16, a16, b16 = (bf16.to_bf16(v) for v in (x, dout, a, b))
    wide = lambda bits: bf16.to_float32(bits).astype(np.float64)  # noqa: E731
    X, D, A, B = (wide(v) for v in (x16, d16, a16, b16))
    out0 = rng.standard_normal((rows, n_out), np.float32)
    out, u, u16 = out0.copy(), np.empty((rows, r), np.float32), np.empty((rows, r), np.uint16)
    ops.lora_forward(x16, a16, b16, scale, out, u, u16)
    assert rel(u, scale * X @ A.T) < 1e-5
    np.testing.assert_array_equal(u16, bf16.to_bf16(u))
    assert rel(out - out0, wide(u16) @ B.T) < 1e-5
    plain = out0.copy()
    ops.lora_forward(x, a, b, scale, plain, np.empty((rows, r), np.float32))
    assert rel(plain - out0, out - out0) > 1e-4                     # float32 adapters: not rounded

    da, db = np.zeros_like(a), np.zeros_like(b)
    du, du16 = np.empty((rows, r), np.float32), np.empty((rows, r), np.uint16)
    got = ops.lora_backward(d16, x16, a16, b16, scale, da, db, u, du, False, u16, du16)
    assert got is du16
    assert rel(du, scale * D @ B) < 1e-5
    np.testing.assert_array_equal(du16, bf16.to_bf16(du))
    assert rel(db, D.T @ wide(u16)) < 1e-5
    assert rel(da, wide(du16).T @ X) < 1e-5
    dx0 = rng.standard_normal((rows, n_in), np.float32)
    dx = dx0.copy()
    ops.lora_input_grad(du16, a16, dx)
    assert rel(dx - dx0, wide(du16) @ A) < 1e-5


def test_bf16_lora_matches_peft_under_autocast(bf16_here):
    """The autocast tolerances of test_bf16.py (loss 1e-2, gradients 3e-2 relative): both round the
    base's and the adapters' matmul inputs to bf16."""
    hf = hf_base()
    lo = lora_layout()
    m = ours(hf, lo, precision="bf16")
    fp32 = ours(hf, lora_layout())
    pm = peft_twin(hf, lo, m.lora_params)
    idx, tgt = batch(6)
    loss = step(m, idx, tgt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = ref_loss(pm, idx, tgt)
    ref.backward()
    assert loss != step(fp32, idx, tgt)                         # the bf16 matmuls really ran
    assert abs(loss - ref.item()) < 1e-2 * ref.item()
    grads = lo.views(m.lora_grads)
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert rel(grads[our_name(n)], p.grad.numpy()) < 3e-2, n


class FixedMasks(torch.nn.Module):
    """Stands in for peft's lora_dropout module: our masks for that block and target, so that
    peft's arithmetic with dropout can be compared with ours."""

    def __init__(self, keep: np.ndarray, scale: float):
        super().__init__()
        self.keep, self.scale = torch.tensor(keep), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keep.to(x.dtype) * self.scale


def test_lora_dropout_matches_peft_given_the_same_masks():
    from distgpt.model import LoraDropout

    hf = hf_base()
    lo = lora_layout(dropout=0.25)
    m = ours(hf, lo)
    pm = peft_twin(hf, lo, m.lora_params)
    idx, tgt = batch(12)
    seed, row0 = (8, 3), 5
    masks = LoraDropout(0.25, B, T, seed, row0)
    for name, module in pm.named_modules():
        if name.endswith("lora_dropout"):
            block, target = name.removeprefix("base_model.model.transformer.h.").split(".", 1)
            target = target.removesuffix(".lora_dropout")
            width = lo.by_name[f"h.{block}.{target}.lora_A.weight"].shape[1]
            keep = masks.keep(int(block), TARGETS[target], width).reshape(B, T, width)
            module["default"] = FixedMasks(keep, masks.scale)
    pm = pm.double()
    m.zero_grad()
    fwd = m.forward(idx, tgt, grad_scale=1.0, dropout_seed=seed, row0=row0)
    m.backward(fwd)
    ref = ref_loss(pm, idx, tgt)
    ref.backward()
    assert fwd.loss != m.loss(idx, tgt)                        # the masks changed the loss
    assert abs(fwd.loss - ref.item()) < 1e-5 * ref.item()
    grads = lo.views(m.lora_grads)
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert rel(grads[our_name(n)], p.grad.numpy()) < 1e-4, n


# ----------------------------------------------------------------------------- frozen base, recompute, FD


def test_backward_computes_no_base_gradient(monkeypatch):
    """Every kernel that could compute a base gradient is handed None for it (and skips the work:
    test_frozen_linear_backward_runs_only_the_input_gradient), and layer 0's input gradient,
    which nothing reads, is not computed at all."""
    calls = []

    def spy(name, real, grad_args):
        def wrapped(*args, **kw):
            calls.append((name, [args[i] for i in grad_args]))
            return real(*args, **kw)
        monkeypatch.setattr(ops, name, wrapped)

    spy("linear_backward", ops.linear_backward, (3, 4))
    spy("layernorm_backward", ops.layernorm_backward, (4, 5))
    spy("head_loss", ops.head_loss, (5,))
    m = ours(hf_base(), lora_layout())
    idx, tgt = batch(7)
    step(m, idx, tgt)
    names = [name for name, _ in calls]
    assert names.count("head_loss") == 1
    # 4 linears and 2 LayerNorms per block, ln_f; block 0 stops before its c_attn input gradient
    assert names.count("linear_backward") == 4 * L - 1
    assert names.count("layernorm_backward") == 2 * L - 1 + 1
    assert all(g is None for _, grads in calls for g in grads)
    assert np.linalg.norm(m.lora_grads) > 0


def test_frozen_linear_backward_runs_only_the_input_gradient(monkeypatch):
    rng = np.random.default_rng(8)
    x, w, dout = (rng.standard_normal(s).astype(np.float32) for s in ((20, 6), (6, 9), (20, 9)))
    dx_full, dx = np.empty((20, 6), np.float32), np.empty((20, 6), np.float32)
    ops.linear_backward(dout, x, w, np.empty((6, 9), np.float32), np.empty(9, np.float32), dx_full, False)
    products = []
    real = blas.gemm

    def counting(a, b, out, **kw):
        products.append(out.shape)
        return real(a, b, out, **kw)
    monkeypatch.setattr(blas, "gemm", counting)
    ops.linear_backward(dout, x, w, None, None, dx, False)
    assert products == [(20, 6)]                               # dout @ w.T, no (6, 9) weight gradient
    np.testing.assert_array_equal(dx, dx_full)


@pytest.fixture
def two_threads():
    previous = threads.n_threads()
    threads.set_threads(2)
    yield
    threads.set_threads(previous)


@pytest.fixture(params=["fp32", "bf16"])
def precision(request) -> str:
    if request.param == "bf16":
        request.getfixturevalue("bf16_here")
    return request.param


class Recorder:
    def __init__(self):
        self.events: list = []

    def head_done(self) -> None:           # a reducer over the adapters has no token table
        self.events.append("head")

    def block_done(self, layer: int) -> None:
        self.events.append(layer)

    def token_rows(self, ids, rows) -> None:          # a frozen embedding has no rows to hand over
        self.events.append("token_rows")


def lora_train(precision: str, recompute: str, steps: int = 2):
    """Two steps of two micro-batches each, with the model's and the adapters' dropout on and banded
    attention, an SGD step on the adapters between them; the losses, each step's adapter
    gradients, the hooks."""
    cfg = CFG.model_copy(update={"attention": "alternating_banded", "window": 5, "dropout": 0.2})
    lo = lora_layout(cfg=cfg, dropout=0.1)          # the adapters' dropout too: masks drawn again
    m = GPT(cfg, precision=precision, recompute=recompute, lora=lo)
    rng = np.random.default_rng(7)
    m.params[:] = (0.1 * rng.standard_normal(m.layout.size)).astype(np.float32)
    for e in m.layout.entries:
        if e.name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            m.p[e.name] += 1.0
    m.weights_changed()
    trained_adapters(lo, m.lora_params)
    losses, grads, hooks = [], [], Recorder()
    for s in range(steps):
        m.zero_grad()
        for i, row0 in enumerate((0, B)):
            idx, tgt = batch(20 + 2 * s + i)
            fwd = m.forward(idx, tgt, grad_scale=0.5, dropout_seed=(5, s), row0=row0)
            m.backward(fwd, hooks=hooks if i == 1 else None)
            losses.append(fwd.loss)
        grads.append(m.lora_grads.copy())
        m.lora_params -= 0.05 * m.lora_grads
    return losses, grads, hooks.events


def test_block_recompute_gives_bit_identical_adapter_gradients(precision, blas_backend, two_threads):
    """Bit for bit, on either fp32 gemm (MKL's kernels may depend on alignment), fp32 and bf16."""
    losses, grads, events = lora_train(precision, "none")
    r_losses, r_grads, r_events = lora_train(precision, "block")
    assert r_losses == losses
    for s, (g, ref) in enumerate(zip(r_grads, grads, strict=True)):
        np.testing.assert_array_equal(g, ref, err_msg=f"step {s}")
    # a block's adapters are done with its backward; no head or token rows (no embedding gradient)
    assert r_events == events == [*reversed(range(L))] * 2
    assert losses[0] != losses[2] and not np.array_equal(grads[0], grads[1])


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_micro_batches_accumulate_adapter_gradients(dropout):
    """zero_grad, then two half-scaled micro-batches: the full batch's gradient (the first
    overwrites whatever the buffer held, the second adds). The adapters' dropout masks follow the
    global row, so they are the full batch's too. float64: only the summation order differs."""
    cfg = ModelConfig(n_layer=2, n_head=NH, n_embd=C, block_size=BLOCK, vocab_size=V)
    lo = LoraLayout(cfg, rank=RANK, alpha=ALPHA, dropout=dropout)
    m = GPT(cfg, dtype=np.float64, lora=lo)
    m.params[:] = 0.1 * np.random.default_rng(30).standard_normal(m.layout.size)
    trained_adapters(lo, m.lora_params)
    idx, tgt = np.concatenate([batch(30)[0], batch(31)[0]]), np.concatenate([batch(30)[1], batch(31)[1]])
    seed, row0 = (4, 2), 6
    m.zero_grad()
    m.backward(m.forward(idx, tgt, grad_scale=1.0, dropout_seed=seed, row0=row0))
    full = m.lora_grads.copy()
    m.lora_grads[:] = np.nan
    m.zero_grad()
    for part in (slice(0, B), slice(B, 2 * B)):
        m.backward(m.forward(idx[part], tgt[part], grad_scale=0.5, dropout_seed=seed, row0=row0 + part.start))
    assert rel(m.lora_grads, full) < 1e-12


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_adapter_gradients_match_float64_finite_differences(dropout):
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=8, block_size=8, vocab_size=11)
    lo = LoraLayout(cfg, rank=2, alpha=3.0, dropout=dropout)
    m = GPT(cfg, dtype=np.float64, lora=lo)
    rng = np.random.default_rng(9)
    m.params[:] = 0.3 * rng.standard_normal(m.layout.size)
    trained_adapters(lo, m.lora_params)
    idx, tgt = rng.integers(0, 11, (2, 5)), rng.integers(0, 11, (2, 5))
    kw = {"dropout_seed": (3, 1), "row0": 2} if dropout else {}
    if dropout:        # the masks are applied, and the same for the same seed
        assert m.loss(idx, tgt, **kw) != m.loss(idx, tgt) and m.loss(idx, tgt, **kw) == m.loss(idx, tgt, **kw)
    m.zero_grad()
    m.backward(m.forward(idx, tgt, grad_scale=1.0, **kw))
    views, grads = lo.views(m.lora_params), lo.views(m.lora_grads)
    h = 1e-6
    for name in ("h.0.attn.c_attn.lora_A.weight", "h.1.mlp.c_proj.lora_B.weight",
                 "h.0.mlp.c_fc.lora_B.weight", "h.1.attn.c_proj.lora_A.weight"):
        pos = np.unravel_index(rng.integers(views[name].size), views[name].shape)
        orig = views[name][pos]
        views[name][pos] = orig + h
        up = m.loss(idx, tgt, **kw)
        views[name][pos] = orig - h
        down = m.loss(idx, tgt, **kw)
        views[name][pos] = orig
        numeric = (up - down) / (2 * h)
        # central differences: O(h^2) truncation, float64 rounding ~1e-16 / h = 1e-10
        analytic = grads[name][pos]
        assert abs(analytic - numeric) <= 1e-6 * abs(numeric) + 1e-9, (name, analytic, numeric)


# ----------------------------------------------------------------------------- inference, memory


def test_kv_cache_decoding_includes_the_adapters():
    m = ours(hf_base(), lora_layout())
    idx, _ = batch(40)
    full = m.logits(idx)
    cache = m.new_cache(B)
    steps = [m.logits(idx[:, :5], cache)] + [m.logits(idx[:, t : t + 1], cache) for t in range(5, T)]
    assert rel(np.concatenate(steps, axis=1), full) < 1e-5
    plain = GPT(CFG, params=m.params, trainable=False)
    assert rel(plain.logits(idx), full) > 1e-3                  # the adapters do change the function


@pytest.mark.parametrize("recompute", ["none", "block"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_bytes_counts_the_adapters_scratch(precision, recompute):
    from distgpt.model import activation_bytes

    lo = lora_layout()
    m = GPT(CFG, precision=precision, recompute=recompute, lora=lo)
    a = m._activations(B, T, training=True)
    without = activation_bytes(CFG, B, T, precision=precision, recompute=recompute)
    low = [a.lora.u16, a.lora.du16, a.lora.x16, a.lora.d16]
    extra = [a.lora.u, a.lora.du] + (low if precision == "bf16" else [])
    assert all((x is None) == (precision == "fp32") for x in low)
    assert activation_bytes(CFG, B, T, precision=precision, recompute=recompute, lora_rank=RANK) == (
        without + sum(x.nbytes for x in extra))
    dropped = GPT(CFG, precision=precision, recompute=recompute, lora=lora_layout(dropout=0.1))
    xd = dropped._activations(B, T, training=True).lora.xd
    assert xd.shape == (B * T * 4 * C,)
    assert activation_bytes(CFG, B, T, precision=precision, recompute=recompute, lora_rank=RANK,
                            lora_dropout=True) == without + sum(x.nbytes for x in extra) + xd.nbytes


# ----------------------------------------------------------------------------- a base held in bf16 alone


@pytest.mark.parametrize("recompute", ["none", "block"])
def test_a_base_held_in_bf16_alone_computes_what_a_bf16_model_does(recompute, bf16_here):
    """base16: the base's bits and small float32 copies (LayerNorms, biases, wpe) instead of float32
    parameters and a bf16 copy. On a base whose float32 values are bf16 numbers, the same model:
    bit-identical losses, adapter gradients (with the adapters' dropout) and logits."""
    from distgpt import bf16

    hf = hf_base()
    lo = lora_layout(dropout=0.1)
    ref = ours(hf, lo, precision="bf16", recompute=recompute)
    ref.params[:] = bf16.round_bf16(ref.params)
    ref.weights_changed()
    bits = bf16.to_bf16(ref.params)
    m = GPT(CFG, precision="bf16", recompute=recompute, lora=lo, base16=bits,
            lora_params=ref.lora_params.copy())
    assert m.params is None and m.grads is None and m.weights16 is None
    # float32 of the base: no matmul weight, no wte; only LayerNorms, biases, wpe, ln_f
    kept = [m.w.wpe, m.w.lnf_w, m.w.lnf_b] + [getattr(b, f) for b in m.w.blocks for f in vars(b)]
    assert m.w.wte is None and all(getattr(b, f) is None for b in m.w.blocks
                                   for f in ("qkv_w", "attn_proj_w", "fc_w", "mlp_proj_w"))
    assert sum(x.nbytes for x in kept if x is not None) == 4 * (BLOCK * C + 2 * C + L * (4 * C + 9 * C))
    for s in range(2):
        idx, tgt = batch(50 + s)
        got, want = [], []
        for model, out in ((m, got), (ref, want)):
            model.zero_grad()
            fwd = model.forward(idx, tgt, grad_scale=1.0, dropout_seed=(2, s), row0=0)
            model.backward(fwd)
            out += [fwd.loss, model.lora_grads.copy()]
            model.lora_params -= 0.05 * model.lora_grads
        assert got[0] == want[0]
        np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(m.logits(idx), ref.logits(idx))
    assert m.loss(idx, tgt) == ref.loss(idx, tgt)
    np.testing.assert_array_equal(bits, bf16.to_bf16(ref.params))       # the base is read, never written


def test_a_base_held_in_bf16_is_refused_where_it_cannot_serve():
    lo = lora_layout()
    bits = np.zeros(GPT(CFG, trainable=False).layout.size, np.uint16)
    with pytest.raises(ValueError, match="needs precision bf16"):
        GPT(CFG, lora=lo, base16=bits)
    with pytest.raises(ValueError, match="give no float32 params"):
        GPT(CFG, precision="bf16", lora=lo, base16=bits, params=np.zeros(bits.size, np.float32))
    with pytest.raises(ValueError, match="is frozen: train it with LoRA"):
        GPT(CFG, precision="bf16", base16=bits)
    with pytest.raises(ValueError, match=r"base16 buffer float32\("):
        GPT(CFG, precision="bf16", lora=lo, base16=bits.astype(np.float32))
    assert GPT(CFG, precision="bf16", base16=bits, trainable=False).params is None   # inference: fine
