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

from distgpt import bf16, blas, train
from distgpt.model import GPT, ModelConfig
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
def cpu(monkeypatch):
    """cpu(vendor_is_intel, *flags): pretend to be that CPU; the bf16 gemm is chosen again after."""
    def pretend(intel: bool, *flags: str) -> None:
        monkeypatch.setattr(blas, "cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(blas, "_intel_cpu", lambda: intel)
        monkeypatch.delenv("DISTGPT_BF16_EMULATED", raising=False)
        blas.use_bf16("auto")
    yield pretend
    monkeypatch.undo()
    blas.use_bf16(os.environ.get("DISTGPT_BF16_GEMM", "auto"))


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
    assert bf16.resolve("auto") == "bf16" and blas.describe_bf16().startswith("oneDNN ")
    cpu(True, "avx512_bf16", "amx_bf16")                    # a Sapphire Rapids Xeon
    assert bf16.resolve("auto") == "bf16" and blas.describe_bf16().startswith("MKL ")
    blas.use_bf16("onednn")                                 # named: taken, and fast there too
    assert bf16.resolve("bf16") == "bf16" and blas.describe_bf16().startswith("oneDNN ")


def test_mkl_bf16_on_an_amd_cpu_is_not_fast_and_says_why(cpu, monkeypatch):
    require_mkl()
    cpu(False, "avx512_bf16")
    blas.use_bf16("mkl")
    assert bf16.resolve("auto") == "fp32"
    with pytest.raises(blas.BlasError, match="cblas_gemm_bf16bf16f32 is fast on Intel CPUs with AVX512-BF16 "
                                             "or AMX-BF16 only, and this CPU is not one"):
        bf16.resolve("bf16")
    monkeypatch.setenv("DISTGPT_BF16_EMULATED", "1")        # accepted when asked for, and said so
    blas.use_bf16("mkl")
    assert bf16.resolve("bf16") == "bf16"
    assert "not fast on this CPU" in bf16.describe("bf16")


def test_bf16_without_a_library_names_what_to_install(cpu, monkeypatch):
    monkeypatch.setattr(blas, "_load_bf16", lambda lib: f"{lib} is not installed here")
    cpu(False, "avx512_bf16")
    assert bf16.resolve("auto") == "fp32"
    with pytest.raises(blas.BlasError, match="bf16 matmuls need oneDNN or MKL: onednn is not installed "
                                             "here; mkl is not installed here"):
        bf16.resolve("bf16")
    with pytest.raises(blas.BlasError, match="DISTGPT_BF16_GEMM=onednn but onednn is not installed here"):
        blas.use_bf16("onednn")
    with pytest.raises(blas.BlasError, match="DISTGPT_BF16_GEMM='amx': expected auto, onednn, mkl"):
        blas.use_bf16("amx")


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
    np.testing.assert_array_equal(m.layout.tensors(m.params16).wte[:V], bf16.to_bf16(m.w.wte[:V]))


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
    assert any(flag in header for flag in blas.FAST_BF16_FLAGS) or "not fast on this CPU" in header
    l32, l16 = np.array(runs["fp32"][1]), np.array(runs["bf16"][1])
    assert len(l32) == len(l16) == 8
    assert not np.array_equal(l32, l16)
    assert np.abs(l16 - l32).max() < 2e-3 * l32.max()
