"""Weights in and out: Hugging Face folders and llm.c .bin files against transformers itself."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it: never the network

import numpy as np
import pytest
import torch
import transformers

from distgpt.model import GPT, Layout, ModelConfig
from distgpt.weights import (
    HF_EXPORT_MARKER,
    check_shape,
    load_init,
    save_hf,
    save_llmc,
    to_hf_state_dict,
)

from conftest import run_cli, tiny_hf_gpt2

VOCAB, NPOS, C, L, NH = 1000, 32, 48, 2, 3
LLMC_LAYER_ORDER = [  # llm.c's ParameterTensors, in HF names
    "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
    "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
    "mlp.c_proj.weight", "mlp.c_proj.bias",
]  # fmt: skip


def make_hf(folder, vocab=VOCAB, n_positions=NPOS, seed=0):
    """A tiny random GPT2LMHeadModel saved with save_pretrained. Every tensor is perturbed so
    zero biases and unit LayerNorm gains cannot hide a mapping mistake."""
    model = tiny_hf_gpt2(vocab, n_positions, C, L, NH, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    return model


def hf_logits(model, idx: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(idx)).logits.numpy()


def our_logits(cfg: ModelConfig, params: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return GPT(cfg, params=params).logits(idx)


def assert_close(a: np.ndarray, b: np.ndarray, rel: float = 1e-5) -> None:
    assert a.shape == b.shape
    err = np.abs(a - b).max() / np.abs(b).max()
    assert err < rel, err


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "tiny"
    return folder, make_hf(folder)


@pytest.fixture(scope="module")
def idx():
    return np.random.default_rng(0).integers(0, VOCAB, (2, NPOS))


def test_load_hf_folder_matches_transformers(hf, idx):
    folder, model = hf
    cfg, params = load_init(str(folder))
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (L, NH, C, NPOS, VOCAB)
    assert cfg.padded_vocab == 1024 and params.dtype == np.float32
    wte = Layout(cfg).views(params)["wte"]
    assert not wte[VOCAB:].any(), "padded vocabulary rows must be zero"
    assert_close(our_logits(cfg, params, idx), hf_logits(model, idx))


def test_save_hf_loads_in_transformers(hf, idx, tmp_path):
    folder, _ = hf
    cfg, params = load_init(str(folder))
    out = tmp_path / "exported"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # save_hf writes its own files only: the rest stays
    save_hf(out, cfg, params)
    assert sorted(p.name for p in out.iterdir()) == [HF_EXPORT_MARKER, "config.json", "model.safetensors",
                                                     "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    model, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.n_positions == NPOS and model.config.eos_token_id == VOCAB - 1
    assert_close(hf_logits(model.eval(), idx), our_logits(cfg, params, idx))
    # and back: our loader reads what we wrote, bit for bit
    cfg2, params2 = load_init(str(out))
    assert cfg2 == cfg and np.array_equal(params2, params)


def test_llmc_roundtrip_is_bit_identical(hf, tmp_path):
    cfg, params = load_init(str(hf[0]))
    path = tmp_path / "model.bin"
    save_llmc(path, cfg, params)
    header = np.fromfile(path, dtype="<i4", count=8)
    assert header.tolist() == [20240326, 3, NPOS, VOCAB, L, NH, C, 1024]
    cfg2, params2 = load_init(str(path))
    assert cfg2 == cfg and np.array_equal(params2, params)
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def llmc_bytes(model, padded_vocab: int, version: int = 3) -> bytes:
    """An llm.c checkpoint written the way llm.c's train_gpt2.py write_model does, independently of
    distgpt: layer-stacked tensors in its order, matmul weights (out, in), vocab padded with zeros."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    t = lambda name: [sd[f"transformer.h.{i}.{name}"] for i in range(L)]  # noqa: E731
    wte = np.zeros((padded_vocab, C), np.float32)
    wte[:VOCAB] = sd["transformer.wte.weight"]
    tensors = [wte, sd["transformer.wpe.weight"]]
    for name in LLMC_LAYER_ORDER:
        tensors += [x.T for x in t(name)]  # Conv1D (in, out) -> Linear (out, in); 1-D unchanged
    tensors += [sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]]
    header = np.zeros(256, "<i4")
    header[:8] = [20240326, version, NPOS, VOCAB, L, NH, C, padded_vocab]
    flat = np.concatenate([np.ascontiguousarray(x, "<f4").ravel() for x in tensors])
    if version == 5:  # bfloat16: the top half of each float32 (truncated, which is fine for a test)
        return header.tobytes() + (flat.view(np.uint32) >> 16).astype("<u2").tobytes()
    return header.tobytes() + flat.tobytes()


def test_llmc_file_written_like_llmc_matches_transformers(hf, idx, tmp_path):
    _, model = hf
    path = tmp_path / "gpt2_tiny.bin"
    path.write_bytes(llmc_bytes(model, padded_vocab=1088))  # llm.c pads to 128s; any Vp >= V works
    cfg, params = load_init(str(path))
    assert cfg.padded_vocab == 1024
    assert_close(our_logits(cfg, params, idx), hf_logits(model, idx))
    # version 5 (bfloat16) reads as the same weights rounded to bf16
    path.write_bytes(llmc_bytes(model, padded_vocab=1024, version=5))
    _, params16 = load_init(str(path))
    assert np.array_equal(params16, (params.view(np.uint32) & 0xFFFF0000).view(np.float32))


def test_llmc_bad_files(hf, tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(np.zeros(256, "<i4").tobytes())
    with pytest.raises(ValueError, match="not an llm.c model checkpoint"):
        load_init(str(bad))
    good = llmc_bytes(hf[1], padded_vocab=1024)
    bad.write_bytes(good[:-4])
    with pytest.raises(ValueError, match="truncated"):
        load_init(str(bad))
    header = np.frombuffer(good[:1024], "<i4").copy()
    header[1] = 4
    bad.write_bytes(header.tobytes() + good[1024:])
    with pytest.raises(ValueError, match="version 4 is not supported"):
        load_init(str(bad))


def test_shape_checks_and_block_size(hf, idx):
    folder, model = hf
    file_cfg, _ = load_init(str(folder))
    user = ModelConfig(n_layer=3, n_head=NH, n_embd=C, vocab_size=VOCAB, block_size=16)
    with pytest.raises(ValueError, match=r"model\.n_layer is 3 in the config but 2 in "):
        load_init(str(folder), user, check=("n_layer", "n_head"))
    with pytest.raises(ValueError, match=r"model\.vocab_size is 50257 in the config but 1000 in src"):
        check_shape({"n_layer": L, "vocab_size": 50257}, file_cfg, "src")
    check_shape({"n_layer": L, "n_head": NH}, file_cfg, "src")  # only the given keys are compared
    with pytest.raises(ValueError, match=r"model\.block_size is 64 in the config but .* has only 32"):
        check_shape({"block_size": 64}, file_cfg, "src")

    # unchecked shape keys come from the file (as the training loop calls it: defaults in cfg)
    user = ModelConfig(n_layer=7, block_size=16, dropout=0.1, vocab_multiple=128, attention="dense")
    cfg, params = load_init(str(folder), user)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size) == (L, NH, C, VOCAB)
    assert (cfg.block_size, cfg.dropout, cfg.vocab_multiple) == (16, 0.1, 128)
    wpe = Layout(cfg).views(params)["wpe"]
    assert np.array_equal(wpe, model.transformer.wpe.weight.detach().numpy()[:16])
    assert_close(our_logits(cfg, params, idx[:, :16]), hf_logits(model, idx[:, :16]))
    with pytest.raises(ValueError, match="block_size"):
        load_init(str(folder), ModelConfig(n_layer=L, n_head=NH, n_embd=C, vocab_size=VOCAB, block_size=64))


def test_sharded_and_bare_names(hf, idx, tmp_path):
    """The hub's gpt2 stores GPT2Model names (no "transformer.") plus attention-mask buffers;
    large models come as shards with an index."""
    from safetensors.numpy import save_file

    folder, model = hf
    cfg, params = load_init(str(folder))
    state = {k.removeprefix("transformer."): v for k, v in to_hf_state_dict(Layout(cfg), params).items()}
    state["h.0.attn.bias"] = np.tril(np.ones((1, 1, NPOS, NPOS), np.float32))
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    out = tmp_path / "sharded"
    out.mkdir()
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(out / file), metadata={"format": "pt"})
    index = {"weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "config.json").write_text((folder / "config.json").read_text())
    cfg2, params2 = load_init(str(out))
    assert cfg2 == cfg and np.array_equal(params2, params)


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file or folder"):
        load_init(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no config.json"):
        load_init(str(tmp_path))
    # a hub id that is neither cached nor reachable (HF_HUB_OFFLINE): one line saying what to do
    with pytest.raises(ValueError, match="hf download distgpt-test/no-such-model") as e:
        load_init("distgpt-test/no-such-model")
    assert "\n" not in str(e.value)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type"):
        load_init(str(tmp_path))


def run_export(*args: str) -> subprocess.CompletedProcess:
    return run_cli("export", *args, timeout=120)


def test_export_cli_converts_both_ways(hf, tmp_path):
    folder, _ = hf
    cfg, params = load_init(str(folder))
    r = run_export("--ckpt", str(folder), "--format", "llmc", "--out", str(tmp_path / "m.bin"))
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    r = run_export("--ckpt", str(tmp_path / "m.bin"), "--format", "hf", "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    cfg2, params2 = load_init(str(tmp_path / "hf"))
    assert cfg2 == cfg and np.array_equal(params2, params)


def test_export_cli_error_is_one_line(tmp_path):
    r = run_export("--ckpt", str(tmp_path / "nope"), "--format", "hf", "--out", str(tmp_path / "x"))
    assert r.returncode == 2
    assert r.stderr.startswith("export: error: ") and r.stderr.count("\n") == 1, r.stderr
    r = run_export("--ckpt", "x", "--format", "onnx", "--out", "y")
    assert r.returncode == 2 and r.stderr.startswith("export: error: ") and r.stderr.count("\n") == 1


def test_save_hf_interrupted_leaves_a_recognised_export(hf, tmp_path, monkeypatch):
    """save_hf writes file by file (temp name, then rename), never moving the folder aside. A failure
    after some files are new and some old still leaves a folder export recognises as its own (the
    marker lists both contents while files are replaced), so the next export replaces it."""
    from distgpt import weights

    cfg, params = load_init(str(hf[0]))
    out = tmp_path / "exported"
    out.mkdir()
    save_hf(out, cfg, params)
    assert weights.hf_export_conflicts(out) == []
    real = weights.atomic_write

    def fail_on_config(path, *args):
        if Path(path).name == "config.json":
            raise OSError(28, "No space left on device", str(path))
        return real(path, *args)

    monkeypatch.setattr(weights, "atomic_write", fail_on_config)
    with pytest.raises(OSError):
        save_hf(out, cfg, params * 2)  # the new model.safetensors lands, config.json does not
    assert weights.hf_export_conflicts(out) == []
    monkeypatch.undo()
    (out / "notes.txt").write_text("mine")
    assert weights.hf_export_conflicts(out) == ["notes.txt"]
    (out / "config.json").write_text("{}")  # an exported file changed by someone else is theirs
    assert weights.hf_export_conflicts(out) == ["config.json", "notes.txt"]
