"""Mixed precision (distgpt/bf16.py): the conversions against PyTorch's bit for bit, the bf16 model
against PyTorch autocast on a Hugging Face GPT-2, a bf16 training run against fp32, and which
precision `auto` and `bf16` give on which machine."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from distgpt import bf16, blas, gemm16, train
from distgpt.cpu import AMD, INTEL, Cpu
from distgpt.model import GPT, ModelConfig, init_params
from distgpt.partition import Partition
from distgpt.weights import from_hf_state_dict, to_hf_state_dict

from conftest import bf16_env, read_metrics, rel, require_mkl, run_cli, tiny_config, tiny_hf_gpt2

V, C, NH, BLOCK, L = 1000, 48, 3, 32, 2      # odd sizes: head size 16, vocab padded to 1024
B, T = 3, 17


def torch_bits(x: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


def every_rounding_case() -> np.ndarray:
    """Every bf16 value (all 2^16 upper halves: both zeros, subnormals, infinities, NaNs) with the
    lower halves that decide rounding: exact, just below a tie, the tie, just above, all ones."""
    hi = np.arange(1 << 16, dtype=np.uint32) << 16
    lo = np.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    return (hi[:, None] | lo[None, :]).reshape(-1).view(np.float32)


@pytest.mark.parametrize("jit", ["1", "0"], ids=["compiled", "numpy-twin"])
def test_conversion_equals_torch_bit_for_bit(monkeypatch, jit):
    monkeypatch.setenv("DISTGPT_JIT", jit)
    x = every_rounding_case()
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(bf16.to_bf16(x), torch_bits(x))
    rng = np.random.default_rng(0)
    m = rng.standard_normal((37, 129)).astype(np.float32) * 1e3
    np.testing.assert_array_equal(bf16.to_bf16(m, parallel=True), torch_bits(m))
    strided = m[::2, 3:100]                                   # views take the copying path
    np.testing.assert_array_equal(bf16.to_bf16(strided), torch_bits(strided))
    out = np.zeros((129, 37), np.uint16).T                    # and so do strided outputs
    bf16.to_bf16(m, out)
    np.testing.assert_array_equal(out, torch_bits(m))


def test_nan_stays_nan_and_bf16_to_float32_is_exact():
    x = every_rounding_case()
    back = bf16.to_float32(bf16.to_bf16(x))
    np.testing.assert_array_equal(np.isnan(back), np.isnan(x))
    exact = x[::6]                                            # lower half zero: already a bf16 value
    ok = ~np.isnan(exact)
    np.testing.assert_array_equal(back[::6][ok].view(np.uint32), exact[ok].view(np.uint32))
    ref = torch.from_numpy(bf16.to_bf16(x).view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(back.view(np.uint32), ref.view(np.uint32))


def test_conversion_refuses_other_dtypes():
    with pytest.raises(TypeError, match="float32"):
        bf16.to_bf16(np.ones(3))
    with pytest.raises(TypeError, match="uint16"):
        bf16.to_float32(np.ones(3, np.float32))


# ----------------------------------------------------------------------------- which precision

@pytest.fixture
def cpu():
    """cpu(vendor_is_intel, *flags, library="auto", emulated=False, loader=...): the process's bf16
    gemm as chosen on that CPU; the one before is put back after."""
    previous = gemm16.use(None)

    def pretend(intel: bool, *flags: str, library: str = "auto", emulated: bool = False,
                loader=gemm16.load_library) -> None:
        on = Cpu(INTEL if intel else AMD, "", frozenset(flags))
        gemm16.use(gemm16.load(library, cpu=on, emulated=emulated, loader=loader))
    yield pretend
    gemm16.use(previous)


def test_auto_and_forced_bf16_on_a_cpu_without_bf16(cpu):
    cpu(True, "avx2", "avx512f")
    assert bf16.resolve("auto") == "fp32"
    assert bf16.resolve("fp32") == "fp32"
    with pytest.raises(blas.BlasError, match="train.precision=bf16 but this CPU has neither avx512_bf16 "
                                             "nor amx_bf16"):
        bf16.resolve("bf16")


def test_auto_picks_onednn_on_avx512_bf16_and_mkl_on_amx(cpu):
    require_mkl()
    cpu(False, "avx512_bf16")                               # an AMD Zen 4/5
    assert bf16.resolve("auto") == "bf16" and gemm16.describe().startswith("oneDNN ")
    cpu(True, "avx512_bf16", "amx_bf16")                    # a Sapphire Rapids Xeon
    assert bf16.resolve("auto") == "bf16" and gemm16.describe().startswith("MKL ")
    cpu(True, "avx512_bf16", "amx_bf16", library="onednn")  # named: taken, and fast there too
    assert bf16.resolve("bf16") == "bf16" and gemm16.describe().startswith("oneDNN ")


def test_mkl_bf16_on_an_amd_cpu_is_not_fast_and_says_why(cpu):
    require_mkl()
    cpu(False, "avx512_bf16", library="mkl")
    assert bf16.resolve("auto") == "fp32"
    with pytest.raises(blas.BlasError, match="cblas_gemm_bf16bf16f32 is fast on Intel CPUs with AVX512-BF16 "
                                             "or AMX-BF16 only, and this CPU is not one"):
        bf16.resolve("bf16")
    cpu(False, "avx512_bf16", library="mkl", emulated=True)  # accepted when asked for, and said so
    assert bf16.resolve("bf16") == "bf16"
    assert "not fast on this CPU" in bf16.describe("bf16")


def test_bf16_without_a_library_names_what_to_install(cpu):
    missing = lambda lib: f"{lib} is not installed here"    # noqa: E731
    cpu(False, "avx512_bf16", loader=missing)
    assert bf16.resolve("auto") == "fp32"
    with pytest.raises(blas.BlasError, match="bf16 matmuls need oneDNN or MKL: onednn is not installed "
                                             "here; mkl is not installed here"):
        bf16.resolve("bf16")
    with pytest.raises(blas.BlasError, match="DISTGPT_BF16_GEMM=onednn but onednn is not installed here"):
        gemm16.load("onednn", loader=missing)
    with pytest.raises(blas.BlasError, match="DISTGPT_BF16_GEMM='amx': expected auto, onednn, mkl"):
        gemm16.load("amx")


def test_forced_bf16_on_a_cpu_without_it_stops_train_with_one_line(cpu, capsys, tmp_path, shakespeare_bytes):
    cpu(True, "avx2")
    cfg = tiny_config(tmp_path, shakespeare_bytes)
    omp = os.environ.get("OMP_NUM_THREADS")
    try:
        with threadpool_limits(limits=None):
            code = train.main(["--config", str(cfg), "train.precision=bf16", "parallel.threads_per_rank=1"])
    finally:
        os.environ.pop("OMP_NUM_THREADS", None) if omp is None else os.environ.update(OMP_NUM_THREADS=omp)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["distgpt.train: error: train.precision=bf16 but this CPU has neither avx512_bf16 nor "
                   "amx_bf16 (/proc/cpuinfo); use train.precision=fp32 or auto"]


def test_a_bf16_model_needs_a_known_precision_and_float32():
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=11)
    with pytest.raises(ValueError, match="expected fp32 or bf16"):
        GPT(cfg, precision="auto")
    with pytest.raises(ValueError, match="float32 model"):
        GPT(cfg, dtype=np.float64, precision="bf16")


# ----------------------------------------------------------------------------- the model

def hf_float32(seed: int = 0):
    hf = tiny_hf_gpt2(V, BLOCK, C, L, NH, seed=seed)
    with torch.no_grad():       # away from init, as tests/test_model.py does, in float32
        for name, p in hf.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return hf


def ours(hf, precision: str) -> GPT:
    m = GPT(ModelConfig(n_layer=L, n_head=NH, n_embd=C, block_size=BLOCK, vocab_size=V), precision=precision)
    from_hf_state_dict(m.layout, {k: v.detach().numpy() for k, v in hf.state_dict().items()}, m.params)
    return m


def our_step(m: GPT, idx, tgt) -> tuple[float, dict[str, np.ndarray]]:
    m.zero_grad()
    fwd = m.forward(idx, tgt, grad_scale=1.0)
    m.backward(fwd)
    return fwd.loss, to_hf_state_dict(m.layout, m.grads)


def test_bf16_model_matches_torch_autocast(bf16_here):
    hf = hf_float32()
    rng = np.random.default_rng(1)
    idx, tgt = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = hf(input_ids=torch.tensor(idx)).logits
    ref_loss = F.cross_entropy(logits.float().reshape(-1, V), torch.tensor(tgt).reshape(-1))
    ref_loss.backward()
    ref = {n: p.grad.numpy() for n, p in hf.named_parameters()}

    loss, grads = our_step(ours(hf, "bf16"), idx, tgt)
    loss32, _ = our_step(ours(hf, "fp32"), idx, tgt)
    assert loss != loss32                                     # the bf16 matmuls really ran
    assert abs(loss - ref_loss.item()) < 1e-2 * ref_loss.item()
    assert set(grads) == set(ref)
    for name, g in ref.items():
        assert rel(grads[name], g) < 3e-2, name


def test_bf16_weight_copies_follow_the_parameters(bf16_here):
    hf = hf_float32()
    m = ours(hf, "bf16")
    rng = np.random.default_rng(2)
    idx, tgt = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
    before = m.loss(idx, tgt)
    m.p["h.0.mlp.c_proj.weight"] *= 0.5                      # a matmul weight: read only through its copy
    assert m.loss(idx, tgt) == before                        # copies are made once per update...
    m.weights_changed()
    fresh = GPT(m.cfg, precision="bf16")
    fresh.params[:] = m.params
    assert m.loss(idx, tgt) == fresh.loss(idx, tgt) != before    # ...and remade after it
    np.testing.assert_array_equal(m.layout.tensors(m.weights16.bits).wte[:V], bf16.to_bf16(m.w.wte[:V]))


# ----------------------------------------------------------------------------- the weight copy

def tiny_bf16(**kw) -> GPT:
    cfg = ModelConfig(n_layer=L, n_head=NH, n_embd=C, block_size=BLOCK, vocab_size=V)
    m = GPT(cfg, precision="bf16", **kw)
    init_params(m.layout, m.params, seed=3)
    return m


def train_pass(m: GPT, seed: int) -> float:
    """One micro-batch forward and backward, as Trainer.step runs it (zero_grad first)."""
    rng = np.random.default_rng(seed)
    m.zero_grad()
    fwd = m.forward(rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T)), grad_scale=1.0)
    m.backward(fwd)
    return fwd.loss


def node_of_two() -> tuple[list[GPT], list[tuple[int, int]]]:
    """Two ranks of one node as ZeRO-1 keeps them: parameters and one bf16 copy shared, each rank
    converting the slice it updates (Partition.updated). In one process: the ranks take turns."""
    first = tiny_bf16()
    params, bits = first.params, np.zeros(first.layout.size, np.uint16)
    slices = [Partition(first.layout.size, 2, r, zero=True).updated for r in range(2)]
    ranges = first.layout.matmul_weight_ranges()
    ranks = [GPT(first.cfg, params=params, precision="bf16",
                 weights16=bf16.Bf16Weights(params, ranges, shared=bits, rank_slice=s)) for s in slices]
    for m in ranks:                           # Trainer.broadcast_params: a slice each, barrier, current
        m.weights16.changed_all()
    for m in ranks:
        m.weights16.current()
    return ranks, slices


def test_a_step_with_a_shared_copy_converts_each_ranks_slice_once_and_no_pass_converts(bf16_here):
    ranks, slices = node_of_two()
    whole = ranks[0].weights16.elements()
    share = [m.weights16.elements(*s) for m, s in zip(ranks, slices, strict=True)]    # each rank's part
    assert [m.weights16.converted for m in ranks] == share
    for step in range(2):
        before = [m.weights16.converted for m in ranks]
        for r, m in enumerate(ranks):         # forward and backward: the copy is only read
            train_pass(m, seed=10 * step + r)
        assert [m.weights16.converted for m in ranks] == before
        for m, (lo, hi) in zip(ranks, slices, strict=True):    # AdamW on a rank's slice, its conversion
            m.params[lo:hi] -= 0.5 * m.grads[lo:hi]
            m.weights16.changed(lo, hi)
        for m in ranks:                       # past the node's barrier (the ZeRO allgather)
            m.weights16.current()
        done = [m.weights16.converted - b for m, b in zip(ranks, before, strict=True)]
        assert done == share
        assert sum(done) == whole and 0 < done[0] < whole       # the node converts its copy once
    bits = ranks[0].weights16.bits
    for lo, hi in ranks[0].layout.matmul_weight_ranges():
        np.testing.assert_array_equal(bits[lo:hi], bf16.to_bf16(ranks[0].params[lo:hi]))
    private = tiny_bf16()
    private.params[:] = ranks[0].params
    rng = np.random.default_rng(5)
    idx, tgt = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
    assert ranks[1].loss(idx, tgt) == private.loss(idx, tgt)


def test_a_slice_left_unconverted_changes_the_forward(bf16_here):
    """What makes the counts above meaningful: a pass reads the shared copy as the ranks left it,
    so a slice one rank did not convert shows in the loss."""
    ranks, slices = node_of_two()
    rng = np.random.default_rng(6)
    idx, tgt = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
    for m, (lo, hi) in zip(ranks, slices, strict=True):
        m.params[lo:hi] *= 1.5                # every bf16 value changes
    ranks[0].weights16.changed(*slices[0])    # rank 1 skips its conversion
    for m in ranks:
        m.weights16.current()
    skipped = ranks[0].loss(idx, tgt)
    ranks[1].weights16.changed(*slices[1])
    ranks[1].weights16.current()
    private = tiny_bf16()
    private.params[:] = ranks[0].params
    assert skipped != ranks[0].loss(idx, tgt) == private.loss(idx, tgt)


def test_a_shared_copy_being_remade_refuses_a_pass(bf16_here):
    ranks, slices = node_of_two()
    ranks[0].weights16.changed(*slices[0])
    with pytest.raises(RuntimeError, match="shared bf16 weight copy is not current"):
        train_pass(ranks[0], seed=1)


def test_a_private_copy_is_remade_whole_by_the_first_pass_after_a_change_only(bf16_here):
    m = tiny_bf16()
    copy, whole = m.weights16, m.weights16.elements()
    assert copy.converted == 0
    train_pass(m, seed=1)                     # the first pass makes it
    assert copy.converted == whole
    train_pass(m, seed=2)                     # zero_grad and another pass: the parameters did not change
    m.loss(*np.random.default_rng(3).integers(0, V, (2, B, T)))
    assert copy.converted == whole
    m.params *= 0.5
    m.weights_changed()
    assert copy.converted == whole            # nothing until a pass needs it...
    train_pass(m, seed=4)
    assert copy.converted == 2 * whole        # ...then all of it, once
    for lo, hi in m.layout.matmul_weight_ranges():
        np.testing.assert_array_equal(copy.bits[lo:hi], bf16.to_bf16(m.params[lo:hi]))


def test_a_bf16_copy_must_be_made_on_the_models_own_parameters():
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=11)
    m = GPT(cfg, precision="bf16")
    other = np.zeros_like(m.params)
    with pytest.raises(ValueError, match="bf16 copy of other parameters"):
        GPT(cfg, params=m.params.copy(), precision="bf16", weights16=m.weights16)
    with pytest.raises(ValueError, match="fp32 model has no bf16 weight copy"):
        GPT(cfg, params=m.params, weights16=m.weights16)
    with pytest.raises(ValueError, match=r"bf16 weight buffer uint16\(3,\), expected uint16\("):
        bf16.Bf16Weights(other, m.layout.matmul_weight_ranges(), shared=np.zeros(3, np.uint16))


# ----------------------------------------------------------------------------- training

@pytest.mark.slow
def test_bf16_training_follows_fp32_and_says_so(tmp_path, shakespeare_bytes):
    env = bf16_env()
    runs = {}
    for precision in ("fp32", "bf16"):
        (tmp_path / precision).mkdir()
        cfg = tiny_config(tmp_path / precision, shakespeare_bytes, train={"max_steps": 8},
                          out_dir=str(tmp_path / precision / "out"))
        r = run_cli("train", "--config", str(cfg), f"train.precision={precision}", env=env)
        assert r.returncode == 0, r.stderr
        runs[precision] = (r.stdout, [row["train_loss"] for row in read_metrics(tmp_path / precision / "out")
                                      if "train_loss" in row])
    assert "precision: fp32\n" in runs["fp32"][0]
    header = next(line for line in runs["bf16"][0].splitlines() if line.startswith("precision:"))
    assert "bf16" in header and "gemm_bf16bf16f32" in header and ("oneDNN" in header or "MKL" in header)
    assert any(flag in header for flag in gemm16.FAST_BF16_FLAGS) or "not fast on this CPU" in header
    l32, l16 = np.array(runs["fp32"][1]), np.array(runs["bf16"][1])
    assert len(l32) == len(l16) == 8
    assert not np.array_equal(l32, l16)
    assert np.abs(l16 - l32).max() < 2e-3 * l32.max()


def test_a_frozen_bf16_linear_takes_its_callers_rounding_of_dout(bf16_here):
    """A LoRA adapter's backward rounds its linear's output gradient to bf16 already; the frozen
    base's backward takes that rounding (dout16) instead of making it again. dout itself is then
    not read (NaNs in it do not reach dx), and the result is the same bits as rounding it here."""
    from distgpt import ops
    rng = np.random.default_rng(0)
    rows, n_in, n_out = 70, 24, 40
    dout = rng.standard_normal((rows, n_out)).astype(np.float32)
    w16 = bf16.to_bf16(rng.standard_normal((n_in, n_out)).astype(np.float32))
    x16 = bf16.to_bf16(rng.standard_normal((rows, n_in)).astype(np.float32))
    ws = bf16.Workspace()
    rounded_here = np.empty((rows, n_in), np.float32)
    ops.linear_backward_bf16(dout, x16, w16, None, None, rounded_here, False, ws)
    given = np.empty_like(rounded_here)
    ops.linear_backward_bf16(np.full_like(dout, np.nan), x16, w16, None, None, given, False, ws,
                             dout16=bf16.to_bf16(dout))
    assert np.array_equal(given.view(np.uint32), rounded_here.view(np.uint32))
    with pytest.raises(ValueError, match="dout16"):
        ops.linear_backward_bf16(dout, x16, w16, None, None, given, False, ws, dout16=bf16.to_bf16(dout[1:]))
