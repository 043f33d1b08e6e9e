"""A LoRA run's checkpoint outside training: `export --format peft` (peft loads the adapters onto the
transformers base), `export --format hf` / `llmc` (the base with the adapters merged in, a plain
GPT-2), `sample --ckpt` (the merged model), and the one-line refusals.

The checkpoint is made here as a LoRA run saves one: checkpoint.save_checkpoint over the ADAPTER
flat vector (rows params/m/v are adapters), manifest layout = LoraLayout.describe(), meta lora =
{rank, alpha, dropout, targets, base: {source, sha256}}, meta config = the run's config. Its base is
a tiny transformers GPT-2 (odd sizes: head size 8, a 257-token vocabulary padded to 320, rank 3) with
weights away from their init, and A and B are both non-zero, so that every adapter changes the output.

Tolerance of the logits against transformers (+ peft), 1e-5 relative (the issue's bound): both sides
compute in float32 and differ only in summation order and in where the adapter's product is added
(peft: x W + b + s (x A^T) B^T; the merged model: x (W + s (B A)^T) + b). A dot product of K terms
rounds to about sqrt(K) u relative (u = 2^-24 = 6e-8, K <= 4C = 96: 6e-7), plus a few u per
LayerNorm, softmax and residual add of each of the 3 blocks: ~1e-6 at the worst, so 1e-5 is a 10x
margin. Measured on an AMD EPYC (Zen 4), NumPy's OpenBLAS: see each test's comment.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it: never the network

import numpy as np
import peft  # the test extra's LoRA reference (peft==0.21.2): missing is a failure, not a skip
import pytest
import torch

from distgpt import checkpoint
from distgpt.config import Config
from distgpt.data import get_tokenizer
from distgpt.dist import Comm
from distgpt.export import PEFT_MARKER
from distgpt.lora import DEFAULT_TARGETS, LoraLayout
from distgpt.model import GPT, Layout, ModelConfig
from distgpt.partition import Partition
from distgpt.sample import generate
from distgpt.weights import from_hf_state_dict, load_init, to_hf_state_dict

from conftest import cli_env, rel, run_cli, tiny_config, tiny_hf_gpt2
from snapshot import tree_digest

V, C, NH, L, BLOCK = 257, 24, 3, 3, 32
RANK, ALPHA = 3, 5.0
EOT = 256                     # the bytes tokenizer's end-of-text
PEFT_FILES = ["adapter_config.json", "adapter_model.safetensors"]


def save_lora_run(out_dir: Path, cfg: ModelConfig, lo: LoraLayout, adapters: np.ndarray, source: str,
                  sha256: str | None) -> Path:
    """A LoRA run's out_dir as training leaves it: a checkpoint of the adapters, metrics.jsonl."""
    meta = {"config": Config(model=cfg).to_dict(), "tokenizer": "bytes",
            "lora": {**lo.config(), "base": {"source": source, "sha256": sha256}}}
    zeros = np.zeros_like(adapters)
    checkpoint.save_checkpoint(out_dir, 7, Comm(), lo, Partition(lo.size, 1, 0), adapters, zeros, zeros,
                               meta, 2)
    (out_dir / "metrics.jsonl").write_text('{"step": 7, "train_loss": 1.0}\n')
    return out_dir


def save_plain_run(out_dir: Path, cfg: ModelConfig, params: np.ndarray) -> Path:
    """A full (not LoRA) run's out_dir holding `params`."""
    layout = Layout(cfg)
    zeros = np.zeros_like(params)
    checkpoint.save_checkpoint(out_dir, 3, Comm(), layout, Partition(layout.size, 1, 0), params, zeros, zeros,
                               {"config": Config(model=cfg).to_dict(), "tokenizer": "bytes"}, 2)
    return out_dir


class Run:
    """The fixture: the base folder, its weights in distgpt's layout, the LoRA run, its reference."""

    def __init__(self, root: Path):
        hf = tiny_hf_gpt2(V, BLOCK, C, L, NH, seed=0)
        with torch.no_grad():           # away from the init: gains != 1, biases != 0
            for name, p in hf.named_parameters():
                if ".ln_" in name and name.endswith("weight"):
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
                else:
                    p.copy_(0.1 * torch.randn_like(p))
        self.base = root / "base"
        hf.save_pretrained(self.base)
        self.cfg, self.base_params = load_init(str(self.base))
        self.lo = LoraLayout(self.cfg, rank=RANK, alpha=ALPHA, targets=DEFAULT_TARGETS)
        self.adapters = np.zeros(self.lo.size, np.float32)
        self.lo.init(self.adapters, seed=1)                 # A: peft's distribution
        rng = np.random.default_rng(2)
        for name, view in self.lo.views(self.adapters).items():
            if ".lora_B." in name:                          # B away from 0, as after training
                view[...] = 0.2 * rng.standard_normal(view.shape)
        # the checksum training records for its base: sha256 of its float32 values in layout order
        self.sha = hashlib.sha256(self.base_params.tobytes()).hexdigest()
        self.out = save_lora_run(root / "run", self.cfg, self.lo, self.adapters, str(self.base), self.sha)
        self.merged = self.lo.merged(self.base_params, self.adapters)

    def model(self) -> GPT:
        """distgpt's LoRA model (base + adapters, not merged): the reference every export must match."""
        return GPT(self.cfg, params=self.base_params, lora=self.lo, lora_params=self.adapters,
                   trainable=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    return Run(tmp_path_factory.mktemp("lora"))


def tokens(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, (2, 13))


def export(*args: str, **kw) -> subprocess.CompletedProcess:
    return run_cli("export", *args, timeout=120, **kw)


def sample(*args: str) -> subprocess.CompletedProcess:
    return run_cli("sample", *args, timeout=120)


def one_line_error(r: subprocess.CompletedProcess, tool: str, *needles: str) -> str:
    """Exit code 2 and exactly one line `<tool>: error: ...` holding each needle."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{tool}: error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def hf_logits(model, idx: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(idx)).logits.numpy()


# ----------------------------------------------------------------------------------------------------
# --format peft


def test_peft_export_loads_in_peft_and_gives_distgpt_s_logits(run, tmp_path):
    import transformers

    out = tmp_path / "adapter"
    r = export("--ckpt", str(run.out), "--format", "peft", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "peft: LoRA rank 3" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted([PEFT_MARKER, *PEFT_FILES])
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["target_modules"]) == (
        "LORA", RANK, ALPHA, list(DEFAULT_TARGETS))
    assert config["fan_in_fan_out"] is True                    # GPT-2's Conv1D weights are (in, out)
    assert config["base_model_name_or_path"] == str(run.base.resolve())

    base = transformers.GPT2LMHeadModel.from_pretrained(run.base, local_files_only=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(base, out).eval()
    complaints = [m for m in map(str, (w.message for w in caught)) if "missing" in m or "unexpected" in m]
    assert not complaints, complaints                           # peft found every adapter key, no stray one
    # every adapter arrives in peft bit for bit, and peft has no adapter we did not write
    loaded = {n.removeprefix("base_model.model.transformer.").replace(".default.", "."): p.detach().numpy()
              for n, p in pm.named_parameters() if ".lora_" in n}
    ours = run.lo.views(run.adapters)
    assert loaded.keys() == ours.keys()
    for name, a in ours.items():
        np.testing.assert_array_equal(loaded[name], a, err_msg=name)

    idx = tokens(1)
    want = run.model().logits(idx)
    got = hf_logits(pm, idx)
    assert rel(got, want) < 1e-5                                 # measured: 3.2e-7
    plain = GPT(run.cfg, params=run.base_params, trainable=False)
    assert rel(plain.logits(idx), want) > 1e-2                  # the adapters do change the function


def test_peft_export_of_a_step_folder_equals_that_of_its_out_dir(run, tmp_path):
    step = checkpoint.list_checkpoints(run.out)[0]
    for name, ckpt in (("a", run.out), ("b", step)):
        assert export("--ckpt", str(ckpt), "--format", "peft", "--out", str(tmp_path / name)).returncode == 0
    for f in PEFT_FILES:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_peft_export_of_a_model_that_is_not_lora_is_one_line(run, tmp_path):
    plain = save_plain_run(tmp_path / "plain", run.cfg, run.base_params)
    out = tmp_path / "adapter"
    before = tree_digest(tmp_path)
    one_line_error(export("--ckpt", str(plain), "--format", "peft", "--out", str(out)), "export",
                   "is not a LoRA run's checkpoint", "without meta lora", "--format hf")
    one_line_error(export("--ckpt", str(run.base), "--format", "peft", "--out", str(out)), "export",
                   "is not a LoRA run's checkpoint", "no distgpt checkpoint")
    r = export("--ckpt", str(run.out), "--format", "peft", "--out", str(out), "--tokenizer", "gpt2")
    one_line_error(r, "export", "--tokenizer", "no tokenizer files")
    assert tree_digest(tmp_path) == before                     # nothing written, no folder made


def test_peft_export_never_replaces_what_it_did_not_write(run, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "adapter_config.json").write_text('{"mine": true}\n')
    before = tree_digest(folder)
    one_line_error(export("--ckpt", str(run.out), "--format", "peft", "--out", str(folder)), "export",
                   "notes.txt", "adapter_config.json", "--force")
    assert tree_digest(folder) == before
    # --force replaces export's two names only
    assert export("--ckpt", str(run.out), "--format", "peft", "--out", str(folder), "--force").returncode == 0
    assert (folder / "notes.txt").read_text() == "my notes\n"
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == RANK
    # an earlier export of its own is replaced without --force; one the user edited since is theirs
    mine = tmp_path / "exported"
    for _ in range(2):
        r = export("--ckpt", str(run.out), "--format", "peft", "--out", str(mine))
        assert r.returncode == 0, r.stderr
    config = json.loads((mine / "adapter_config.json").read_text())
    (mine / "adapter_config.json").write_text(json.dumps({**config, "note": "mine now"}))
    before = tree_digest(mine)
    one_line_error(export("--ckpt", str(run.out), "--format", "peft", "--out", str(mine)), "export",
                   "adapter_config.json")
    assert tree_digest(mine) == before
    # the run's own folders, whatever the flags
    before = tree_digest(run.out)
    for target in (run.out, checkpoint.list_checkpoints(run.out)[0]):
        one_line_error(export("--ckpt", str(run.out), "--format", "peft", "--out", str(target), "--force"),
                       "export", str(target))
    assert tree_digest(run.out) == before


def test_adapter_config_names_a_base_transformers_can_load(run, tmp_path):
    """base_model_name_or_path: an HF folder (absolute) or a hub id as training took it; None for an
    llm.c file or a distgpt checkpoint, which GPT2LMHeadModel.from_pretrained cannot read."""
    from distgpt.export import _peft_base_name

    (tmp_path / "gpt2.bin").write_bytes(b"x")
    pretrained = save_plain_run(tmp_path / "pretrained", run.cfg, run.base_params)
    assert _peft_base_name(str(run.base)) == str(run.base.resolve())
    assert _peft_base_name("openai-community/gpt2") == "openai-community/gpt2"
    assert _peft_base_name(str(tmp_path / "gpt2.bin")) is None
    assert _peft_base_name(str(pretrained)) is None


def test_a_failed_peft_export_leaves_nothing_behind(run, tmp_path):
    """A write that fails half way (the adapters do not fit: writes beyond 4 kB fail with EFBIG, as on a
    full disk): one line, and neither the files nor the folders export made stay."""
    target = tmp_path / "a" / "b"
    r = subprocess.run([sys.executable, "-m", "distgpt.export", "--ckpt", str(run.out), "--format", "peft",
                        "--out", str(target)], env=cli_env(), capture_output=True, text=True, timeout=120,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)))
    one_line_error(r, "export", "File too large")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------
# --format hf / llmc: merged


def test_hf_export_of_a_lora_run_is_the_merged_model(run, tmp_path):
    import transformers

    out = tmp_path / "merged"
    r = export("--ckpt", str(run.out), "--format", "hf", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"LoRA rank {RANK} merged into its base {run.base}" in r.stdout
    # the weights are LoraLayout.merged's, to the bit (the same float32 numbers, merged the same way)
    cfg, params = load_init(str(out))
    assert cfg == run.cfg
    np.testing.assert_array_equal(params, run.merged)
    assert not np.array_equal(params, run.base_params)
    model = transformers.GPT2LMHeadModel.from_pretrained(out, local_files_only=True).eval()
    idx = tokens(2)
    assert rel(hf_logits(model, idx), run.model().logits(idx)) < 1e-5    # measured: 3.2e-7
    # llm.c's format: the same merged weights
    r = export("--ckpt", str(run.out), "--format", "llmc", "--out", str(tmp_path / "merged.bin"))
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(load_init(str(tmp_path / "merged.bin"), run.cfg)[1], run.merged)


def test_hf_export_refuses_to_write_into_the_lora_base(run):
    before = tree_digest(run.base)
    one_line_error(export("--ckpt", str(run.out), "--format", "hf", "--out", str(run.base), "--force"),
                   "export", "LoRA base source")
    assert tree_digest(run.base) == before


def test_a_base_that_is_a_distgpt_checkpoint_is_merged_too(run, tmp_path):
    """Fine-tuning a model distgpt pretrained: the base is a checkpoint folder, here laid out with another
    vocabulary padding (vocab_multiple 1: 257 rows, the LoRA run's 320), re-laid by tensor name."""
    cfg_b = run.cfg.model_copy(update={"vocab_multiple": 1})
    params_b = np.zeros(Layout(cfg_b).size, np.float32)
    from_hf_state_dict(Layout(cfg_b), to_hf_state_dict(Layout(run.cfg), run.base_params), params_b)
    assert params_b.size != run.base_params.size
    pretrained = save_plain_run(tmp_path / "pretrained", cfg_b, params_b)
    lora = save_lora_run(tmp_path / "lora", run.cfg, run.lo, run.adapters, str(pretrained), run.sha)
    r = export("--ckpt", str(lora), "--format", "hf", "--out", str(tmp_path / "merged"))
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(load_init(str(tmp_path / "merged"), run.cfg)[1], run.merged)


# ----------------------------------------------------------------------------------------------------
# sample


def test_sample_on_a_lora_run_equals_sampling_its_merged_export(run, tmp_path):
    out = tmp_path / "merged"
    assert export("--ckpt", str(run.out), "--format", "hf", "--out", str(out)).returncode == 0
    common = ["--prompt", "Hi", "--max-new-tokens", "20"]
    for how in (["--greedy"], ["--seed", "3", "--top-k", "40", "--temperature", "0.9"]):
        lora = sample("--ckpt", str(run.out), *common, *how)
        assert lora.returncode == 0, lora.stderr
        merged = sample("--ckpt", str(out), "--tokenizer", "bytes", *common, *how)
        assert merged.returncode == 0, merged.stderr
        assert lora.stdout == merged.stdout, how
    # what greedy decoding of the merged model gives, and not what the base alone gives
    model = GPT(run.cfg, params=run.merged, trainable=False)
    ids = generate(model, list(b"Hi"), 20, greedy=True, eot=EOT)
    greedy = sample("--ckpt", str(run.out), *common, "--greedy")
    assert greedy.stdout == "Hi" + get_tokenizer("bytes").decode(ids) + "\n"
    base = GPT(run.cfg, params=run.base_params, trainable=False)
    assert generate(base, list(b"Hi"), 20, greedy=True) != generate(model, list(b"Hi"), 20, greedy=True)


def test_a_missing_base_is_one_line_and_base_points_at_it(run, tmp_path):
    gone = tmp_path / "moved_away"
    lora = save_lora_run(tmp_path / "lora", run.cfg, run.lo, run.adapters, str(gone), run.sha)
    one_line_error(sample("--ckpt", str(lora), "--prompt", "Hi", "--max-new-tokens", "5"), "sample",
                   str(gone), "--base")
    one_line_error(export("--ckpt", str(lora), "--format", "hf", "--out", str(tmp_path / "x")), "export",
                   str(gone), "--base")
    assert not (tmp_path / "x").exists()
    common = ["--prompt", "Hi", "--max-new-tokens", "10", "--greedy"]
    moved = sample("--ckpt", str(lora), "--base", str(run.base), *common)
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout == sample("--ckpt", str(run.out), *common).stdout
    # --base on weights that have no base
    one_line_error(sample("--ckpt", str(run.base), "--base", str(run.base), "--prompt", "Hi"), "sample",
                   "--base", "not a LoRA run's checkpoint")


def test_adapters_that_do_not_fit_their_meta_are_one_line(run, tmp_path):
    """meta lora says rank 2, the adapters (and the manifest's layout) are rank 3."""
    lora = save_lora_run(tmp_path / "lora", run.cfg, run.lo, run.adapters, str(run.base), run.sha)
    mf = checkpoint.list_checkpoints(lora)[0] / "manifest.json"
    manifest = json.loads(mf.read_text())
    manifest["meta"]["lora"]["rank"] = 2
    mf.write_text(json.dumps(manifest))
    one_line_error(sample("--ckpt", str(lora), "--prompt", "Hi"), "sample", "rank 2", "do not fit")
    one_line_error(export("--ckpt", str(lora), "--format", "peft", "--out", str(tmp_path / "a")), "export",
                   "rank 2", "do not fit")
    assert not (tmp_path / "a").exists()
    from distgpt.weights import WeightsError, load_for_inference

    with pytest.raises(WeightsError, match="do not fit.*rank 2"):     # the library's reader checks as much
        load_for_inference(str(lora))


def test_load_for_inference_merges_a_lora_checkpoint_as_export_does(run):
    from distgpt.export import load_weights
    from distgpt.weights import load_for_inference

    cfg, params, _ = load_for_inference(str(run.out))
    assert cfg == run.cfg
    np.testing.assert_array_equal(params, load_weights(str(run.out)).params)
    np.testing.assert_array_equal(params, run.merged)       # the same merge (merge_into) on the same base


def test_a_changed_base_is_one_line(run, tmp_path):
    """The base was rewritten since training: its checksum no longer matches the checkpoint's. Here the
    same folder holds a copy of the base with one weight changed by one float32 ulp."""
    import transformers

    changed = tmp_path / "base"
    hf = transformers.GPT2LMHeadModel.from_pretrained(run.base, local_files_only=True)
    with torch.no_grad():
        w = hf.transformer.h[1].mlp.c_fc.weight
        w[0, 0] = float(np.nextafter(np.float32(w[0, 0].item()), np.float32(np.inf)))
    hf.save_pretrained(changed)
    lora = save_lora_run(tmp_path / "lora", run.cfg, run.lo, run.adapters, str(changed), run.sha)
    one_line_error(sample("--ckpt", str(lora), "--prompt", "Hi"), "sample", str(changed),
                   "changed since training", "--base")
    one_line_error(export("--ckpt", str(lora), "--format", "hf", "--out", str(tmp_path / "x")), "export",
                   "changed since training")
    assert not (tmp_path / "x").exists()
    # pointed at the weights it was trained on, it samples again
    r = sample("--ckpt", str(lora), "--base", str(run.base), "--prompt", "Hi", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------------------------------
# a LoRA run trained by distgpt


@pytest.mark.slow
def test_a_trained_lora_run_exports_to_peft_and_samples(run, tmp_path, shakespeare_bytes):
    """train writes the checkpoint (not this file's save_lora_run): 10 steps of LoRA on the fixture's
    base, then peft loads the export and gives distgpt's logits, and sample reads the run."""
    import transformers
    import yaml

    cfg = tiny_config(tmp_path, shakespeare_bytes, init_from=str(run.base),
                      lora={"rank": RANK, "alpha": ALPHA},
                      train={"max_steps": 10, "micro_batch_size": 4, "lr": 1e-2})
    doc = yaml.safe_load(cfg.read_text())
    doc["model"] = {"block_size": BLOCK}            # the shape comes from the base
    cfg.write_text(yaml.safe_dump(doc))
    r = run_cli("train", "--config", str(cfg), timeout=180)
    assert r.returncode == 0, r.stderr
    out_dir = tmp_path / "out"
    out = tmp_path / "adapter"
    r = export("--ckpt", str(out_dir), "--format", "peft", "--out", str(out))
    assert r.returncode == 0, r.stderr
    _, saved, adapters = checkpoint.read_lora(out_dir)
    assert saved["base"]["sha256"] == run.sha                    # the checksum export checks is training's
    lo = LoraLayout(run.cfg, RANK, ALPHA)
    assert np.abs(lo.views(adapters)["h.0.attn.c_attn.lora_B.weight"]).max() > 0    # B moved off 0
    base = transformers.GPT2LMHeadModel.from_pretrained(run.base, local_files_only=True)
    pm = peft.PeftModel.from_pretrained(base, out).eval()
    idx = tokens(3)
    want = GPT(run.cfg, params=run.base_params, lora=lo, lora_params=adapters, trainable=False).logits(idx)
    assert rel(hf_logits(pm, idx), want) < 1e-5
    r = sample("--ckpt", str(out_dir), "--prompt", "Hi", "--max-new-tokens", "10", "--greedy")
    assert r.returncode == 0 and r.stdout.startswith("Hi"), r.stderr
