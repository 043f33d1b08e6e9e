"""LoRA runs through the real training command (lora.rank > 0): the adapters are the trainable flat
vector, the base is frozen and held once per node, checkpoints hold the adapters and name the base.

Tolerances are the existing fp32 world-size tests' (test_dist.py): summing the gradients over
another number of ranks or micro-batches changes only the fp32 summation order, so losses agree to
1e-5 relative and the parameters (here the adapters) to 1e-5 in norm after 5 steps; a resume on the
same layout is bit-exact (the same arithmetic in the same order). bf16 runs on several ranks are held
to test_dist.py's bf16 bound (test_ranks_agree_in_bf16 says why), and train.recompute=block to none's
numbers exactly (test_recompute.py's reasoning)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from distgpt import dist
from distgpt.checkpoint import load_checkpoint, read_lora, read_params
from distgpt.config import ConfigError, load_config
from distgpt.lora import LoraLayout
from distgpt.model import Layout, ModelConfig
from distgpt.partition import Partition
from distgpt.weights import load_for_inference, load_init

from conftest import MPIRUN, bf16_env, read_metrics, rel, run_cli, tiny_config, tiny_hf_gpt2

MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=257)
RANK, ALPHA = 4, 8.0


def save_hf(folder: Path, seed: int) -> Path:
    """A tiny random GPT-2 over the byte vocabulary, away from its init (larger weights, so that the
    adapters matter), saved the way save_pretrained saves it."""
    import torch

    hf = tiny_hf_gpt2(257, 64, 32, 2, 2, seed=seed, bos_token_id=256, eos_token_id=256)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if ".ln_" not in name:
                p.mul_(5.0)
    hf.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    return save_hf(tmp_path_factory.mktemp("hf") / "tiny-gpt2", seed=0)


def lora_config(tmp_path: Path, data: Path, init_from: Path, name: str = "run", every: int = 5,
                **train) -> tuple[Path, Path]:
    """A LoRA run's config in tmp_path/name (the model's shape from the weights), and its out_dir."""
    run = tmp_path / name
    run.mkdir()
    cfg = tiny_config(run, data, init_from=str(init_from), lora={"rank": RANK, "alpha": ALPHA},
                      train={"max_steps": 10, "micro_batch_size": 2, "lr": 3e-3, **train},
                      checkpoint={"every": every, "keep": 5})
    doc = yaml.safe_load(cfg.read_text())
    doc["model"] = {"block_size": 32}
    cfg.write_text(yaml.safe_dump(doc))
    return cfg, run / "out"


def train(cfg: Path, *args: str, ranks: int = 1, env: dict | None = None, ok: bool = True):
    r = run_cli("train", "--config", str(cfg), *args, ranks=ranks if ranks > 1 else 0, timeout=180, env=env)
    if ok:
        assert r.returncode == 0, r.stderr
    return r


def losses(out: Path) -> dict[int, float]:
    return {row["step"]: row["train_loss"] for row in read_metrics(out) if "train_loss" in row}


def state(ckpt: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full adapters, m, v of a LoRA checkpoint, whatever world size wrote it."""
    lo = LoraLayout(MODEL, RANK, ALPHA)
    p, m, v, _ = load_checkpoint(ckpt, dist.Comm(), lo, Partition(lo.size, 1, 0))
    return p, m, v


def continue_from(src_out: Path, step: int, dst_out: Path) -> None:
    name = f"step_{step:07d}"
    (dst_out / "ckpt").mkdir(parents=True)
    shutil.copytree(src_out / "ckpt" / name, dst_out / "ckpt" / name)


def one_line(r) -> str:
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, message", [
    (["lora.rank=-1", "init_from=x"], "lora.rank = -1: expected a non-negative integer"),
    (["lora.rank=4", "lora.targets=[attn.c_attn, mlp.cfc]", "init_from=x"],
     "lora.targets: unknown target 'mlp.cfc' (did you mean 'mlp.c_fc'?); expected some of attn.c_attn, "
     "attn.c_proj, mlp.c_fc, mlp.c_proj"),
    (["lora.rank=4"], "lora.rank = 4 with init_from = scratch: expected pretrained weights to adapt in "
                      "init_from (a Hugging Face folder or hub id, an llm.c .bin, or a distgpt checkpoint), "
                      "or lora.rank = 0 to train every parameter"),
    (["lora.alpha=0", "init_from=x"], "lora.alpha = 0.0: expected a number > 0"),
    (["lora.dropout=1", "init_from=x"], "lora.dropout = 1.0: expected a probability in [0, 1)"),
    (["lora.rnak=4"], "unknown config key 'lora.rnak'; did you mean 'lora.rank'?"),
])
def test_bad_lora_settings_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value) == message


def test_lora_section_defaults_and_target_order():
    cfg = load_config(None, ["lora.targets=[mlp.c_proj, attn.c_attn]", "init_from=x", "lora.rank=2"])
    assert cfg.lora.targets == ("attn.c_attn", "mlp.c_proj")       # canonical order, as lora.py's
    assert cfg.to_dict()["lora"] == {"rank": 2, "alpha": 16.0, "dropout": 0.0,
                                     "targets": ["attn.c_attn", "mlp.c_proj"]}
    d = load_config(None).lora
    assert (d.rank, d.alpha, d.dropout) == (0, 16.0, 0.0)
    assert d.targets == ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def test_lora_on_scratch_stops_the_command_in_one_line(tmp_path, shakespeare_bytes):
    cfg = tiny_config(tmp_path, shakespeare_bytes, lora={"rank": 4})
    line = one_line(train(cfg, ok=False))
    assert line.startswith("distgpt.train: error: lora.rank = 4 with init_from = scratch: expected ")


# ----------------------------------------------------------------------------- the trainer, in process


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_base_is_frozen_bit_for_bit_and_only_the_adapters_move(tmp_path, hf_folder, precision, request):
    """Three steps in this process: the base the model reads (float32, or bf16 bits for a bf16 run)
    is the file's, bit for bit, before and after; the adapters start as lora.init from train.seed
    and move; the trainer's flat vector, partition and optimizer are the adapters'."""
    from distgpt import bf16
    from distgpt.trainer import Trainer, initial_params

    if precision == "bf16":
        request.getfixturevalue("bf16_here")
    cfg = load_config(None, [f"init_from={hf_folder}", f"lora.rank={RANK}", f"lora.alpha={ALPHA}",
                             f"train.precision={precision}", "model.block_size=32", "train.seq_len=16",
                             "parallel.threads_per_rank=1", "train.lr=1e-2", "train.warmup_steps=0"])
    cfg, adapters = initial_params(cfg)
    lo = LoraLayout(cfg.model, RANK, ALPHA)
    want = np.zeros(lo.size, np.float32)
    lo.init(want, cfg.train.seed)
    assert np.array_equal(adapters, want)
    trainer = Trainer(cfg, dist.Comm(), adapters)
    _, base = load_init(str(hf_folder), cfg.model)
    assert trainer.base == {"source": str(hf_folder), "sha256": hashlib.sha256(base.tobytes()).hexdigest()}
    assert trainer.model.grads is None and trainer.partition.n == lo.size and trainer.opt.m.size == lo.size

    def held() -> np.ndarray:
        return trainer.model.params.copy() if precision == "fp32" else trainer.model.base16.copy()
    expect = base if precision == "fp32" else bf16.to_bf16(base)
    assert np.array_equal(held(), expect)
    rng = np.random.default_rng(0)
    for step in range(3):
        x = rng.integers(0, 257, (2, 16))
        trainer.step(step, [(x, np.roll(x, -1, 1), 0)])
    assert np.array_equal(held(), expect)
    assert trainer.params is trainer.reducer.params and not np.array_equal(trainer.params, want)


def test_lora_dropout_reaches_the_adapters_in_training_steps(hf_folder):
    """lora.dropout > 0 with model.dropout = 0: the training step draws LoRA's masks. At the first step
    B = 0, so the loss is the base's either way, but B's gradient sees A's dropped input: the gradient
    norms differ (and are the same again for the same dropout)."""
    from distgpt.trainer import Trainer, initial_params

    norms = []
    for p in (0.0, 0.5, 0.5):
        cfg = load_config(None, [f"init_from={hf_folder}", f"lora.rank={RANK}", f"lora.dropout={p}",
                                 "train.precision=fp32", "model.block_size=32", "train.seq_len=16",
                                 "parallel.threads_per_rank=1"])
        cfg, adapters = initial_params(cfg)
        x = np.random.default_rng(0).integers(0, 257, (2, 16))
        result = Trainer(cfg, dist.Comm(), adapters).step(0, [(x, np.roll(x, -1, 1), 0)])
        norms.append((result.loss, result.grad_norm))
    assert norms[0][0] == norms[1][0] and norms[1] == norms[2]
    assert abs(norms[1][1] - norms[0][1]) > 1e-3 * norms[0][1]


# ----------------------------------------------------------------------------- runs


def test_a_lora_run_learns_and_its_checkpoint_holds_the_adapters_and_names_the_base(tmp_path, hf_folder,
                                                                                      shakespeare_bytes):
    cfg, out = lora_config(tmp_path, shakespeare_bytes, hf_folder, max_steps=30, every=0)
    r = train(cfg)
    assert (f"LoRA: rank {RANK}, alpha 8 (scale 2), dropout 0 on attn.c_attn, attn.c_proj, mlp.c_fc, "
            "mlp.c_proj: 4,096 trainable parameters") in r.stdout
    assert f"frozen base: {hf_folder} (fp32, " in r.stdout and "held by this process" in r.stdout
    run = losses(out)
    assert run[30] < run[1] - 0.3                 # the adapters alone lower the loss
    manifest, lora, adapters = read_lora(out)
    _, base = load_init(str(hf_folder), MODEL)
    assert lora == {"rank": RANK, "alpha": ALPHA, "dropout": 0.0,
                    "targets": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
                    "base": {"source": str(hf_folder), "sha256": hashlib.sha256(base.tobytes()).hexdigest()}}
    lo = LoraLayout(MODEL, RANK, ALPHA)
    assert manifest["layout"] == lo.describe() and manifest["n_params"] == lo.size == adapters.size
    assert np.array_equal(read_params(out)[1], adapters)
    # sample and export read it as the merged model
    cfg2, merged, _ = load_for_inference(str(out))
    assert cfg2 == MODEL and np.array_equal(merged, lo.merged(base, adapters))


@pytest.mark.mpi
@pytest.mark.parametrize("ranks, micro, extra", [(2, 2, ()), (3, 2, ("parallel.reduce=mpi",)),
                                                 (3, 4, ("parallel.zero=false",))])
def test_ranks_agree(tmp_path, shakespeare_bytes, hf_folder, ranks, micro, extra):
    cfg, out = lora_config(tmp_path, shakespeare_bytes, hf_folder, "one", max_steps=5, every=0,
                           micro_batch_size=6)
    train(cfg)
    cfg_n, out_n = lora_config(tmp_path, shakespeare_bytes, hf_folder, "many", max_steps=5, every=0,
                               micro_batch_size=micro)
    r = train(cfg_n, "parallel.check_every=1", *extra, ranks=ranks)
    assert "frozen base" in r.stdout and f"read by the node's {ranks} ranks" in r.stdout
    ref, got = losses(out), losses(out_n)
    assert sorted(got) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([got[s] for s in got], [ref[s] for s in got], rtol=1e-5)
    a, b = read_params(out)[1], read_params(out_n)[1]
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a)


def nudged_checkpoint(src_out: Path, step: int, dst_out: Path) -> None:
    """src_out's checkpoint at `step` written into dst_out with every nonzero adapter moved one float32
    ulp up (AdamW's moments and the rest of the state as they were)."""
    from distgpt.checkpoint import save_checkpoint, step_name

    lo, comm = LoraLayout(MODEL, RANK, ALPHA), dist.Comm()
    part = Partition(lo.size, 1, 0)
    p, m, v, manifest = load_checkpoint(src_out / "ckpt" / step_name(step), comm, lo, part)
    p = np.where(p != 0, np.nextafter(p, np.float32(np.inf)), p)
    save_checkpoint(dst_out, step, comm, lo, part, p, m, v, manifest["meta"], keep=5)


@pytest.mark.mpi
def test_ranks_agree_in_bf16(tmp_path, shakespeare_bytes, hf_folder):
    """1, 2 and 3 ranks in bf16, with the bound test_dist.py's test_world_size_invariance_in_bf16
    derives for full training, on the same grounds.

    Step 1 is invariant up to float32 summation order: the base's matmuls round their inputs to bf16
    alike however the rows are split, and the adapters' matmuls are float32 on those same rows, so the
    loss, the gradient norm and the updated adapters differ only through the order in which ranks and
    micro-batches are summed (k float32 terms: below k x 2^-24, 4e-7 for k = 6): 1e-6 holds.

    Later steps are not: a last-bit difference in an adapter changes the activations it adds to, and
    one of those can flip its bf16 rounding on the way into the next base matmul, a 2^-8 change
    that grows over the steps. The yardstick is of the same nature: the 1-rank run resumed at step 1
    with every nonzero adapter moved one float32 ulp (step 1 is where the layouts' last bits first
    part). After 5 steps, 2 ranks (ZeRO-1, 3 micro-batches accumulated), 3 ranks through MPI's
    collectives (ZeRO-1 over 4,096 adapters, not a multiple of 3, so uneven slices; 2 accumulated)
    and 3 replicated ranks (no accumulation) are no farther from the 1-rank run than that (measured
    on a Zen 4 through oneDNN: layouts 2.8-3.0e-5, the yardstick 7.7e-5; through MKL's emulated bf16
    gemm 0.03-0.6e-5 against 6.2e-5; fp32's 1e-5 would not hold through oneDNN, and the loss at step 5
    is up to 1.9e-5 off). A wrong sum (a rank's gradient missing or counted twice, a micro-batch scaled
    wrongly) moves step 1 by far more than 1e-6 (lr 0.1% off: 2.2e-5); a change confined to the later
    steps moves the end beyond the yardstick (min_lr 10% off, which changes only the last steps' lr:
    1.5e-4)."""
    env = bf16_env()

    def run(name: str, ranks: int, micro: int, *extra: str, resume_from: Path | None = None):
        cfg, out = lora_config(tmp_path, shakespeare_bytes, hf_folder, name, max_steps=5, every=1,
                               micro_batch_size=micro, precision="bf16")
        if resume_from is not None:
            nudged_checkpoint(resume_from, 1, out)
            extra = (*extra, "--resume", "auto")
        r = train(cfg, "parallel.check_every=1", *extra, ranks=ranks, env=env)
        rows = {row["step"]: row for row in read_metrics(out) if "train_loss" in row}
        return {"stdout": r.stdout, "rows": rows, "adapters1": read_params(out / "ckpt/step_0000001")[1],
                "adapters": read_params(out)[1]}

    ref = run("one", 1, 6)
    assert sorted(ref["rows"]) == [1, 2, 3, 4, 5]
    nudged = run("nudged", 1, 6, resume_from=tmp_path / "one" / "out")
    assert sorted(nudged["rows"]) == [2, 3, 4, 5]
    yardstick = rel(nudged["adapters"], ref["adapters"])
    layouts = {"2 ranks": (2, 2), "3 ranks, mpi": (3, 2, "parallel.reduce=mpi"),
               "3 ranks, no zero": (3, 4, "parallel.zero=false")}
    for name, layout in layouts.items():
        got = run(name.replace(" ", "_").replace(",", ""), *layout)
        ranks = layout[0]
        assert f"frozen base: {hf_folder} (bf16, " in got["stdout"], name
        assert f"read by the node's {ranks} ranks" in got["stdout"], name
        assert sorted(got["rows"]) == [1, 2, 3, 4, 5], name
        for key in ("train_loss", "grad_norm"):
            assert got["rows"][1][key] == pytest.approx(ref["rows"][1][key], rel=1e-6), (name, key)
        assert rel(got["adapters1"], ref["adapters1"]) <= 1e-6, name
        distance = rel(got["adapters"], ref["adapters"])
        assert distance <= yardstick, f"{name}: {distance:.3g} from 1 rank, a 1-ulp nudge: {yardstick:.3g}"


@pytest.mark.mpi
@pytest.mark.parametrize("precision, dropout", [("fp32", 0.0), ("bf16", 0.1)])
def test_block_recompute_on_two_ranks_is_bit_identical_to_none(tmp_path, shakespeare_bytes, hf_folder,
                                                              precision, dropout):
    """LoRA with train.recompute=block on 2 ranks, 3 micro-batches accumulated per step: the re-run of
    each block's forward is the same arithmetic on the same inputs (the base's, the adapters', and
    LoRA dropout's masks drawn again from the same counters), so the losses, the gradient norms and
    the final adapters are bit-identical to recompute=none's: no tolerance."""
    env = bf16_env() if precision == "bf16" else {}
    runs = {}
    for mode in ("none", "block"):
        cfg, out = lora_config(tmp_path, shakespeare_bytes, hf_folder, mode, max_steps=5, every=0,
                               micro_batch_size=2, precision=precision, recompute=mode)
        r = train(cfg, f"lora.dropout={dropout}", "parallel.check_every=1", ranks=2, env=env)
        # the header names the mode the trainer was given: both runs in `none` would pass below
        assert ("(recompute block)" in r.stdout) == (mode == "block"), r.stdout
        assert f"dropout {dropout:g} on" in r.stdout and read_lora(out)[1]["dropout"] == dropout
        rows = [{k: row[k] for k in ("step", "train_loss", "grad_norm", "lr")}
                for row in read_metrics(out) if "train_loss" in row]
        runs[mode] = rows, read_params(out)[1]
    (rows, adapters), (r_rows, r_adapters) = runs["none"], runs["block"]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    assert r_rows == rows                                    # floats compared with ==: bit-identical
    assert np.array_equal(r_adapters, adapters)


@pytest.mark.mpi
@pytest.mark.parametrize("ranks, precision", [(1, "fp32"), (2, "fp32"), (2, "bf16")])
def test_resume_is_bit_exact(tmp_path, shakespeare_bytes, hf_folder, ranks, precision):
    env = bf16_env() if precision == "bf16" else {}
    cfg, out = lora_config(tmp_path, shakespeare_bytes, hf_folder, "straight", precision=precision)
    train(cfg, "lora.dropout=0.1", ranks=ranks, env=env)
    cfg2, out2 = lora_config(tmp_path, shakespeare_bytes, hf_folder, "resumed", precision=precision)
    continue_from(out, 5, out2)
    r = train(cfg2, "lora.dropout=0.1", "--resume", "auto", ranks=ranks, env=env)
    assert "resumed from" in r.stdout and "at step 5" in r.stdout
    straight, resumed = losses(out), losses(out2)
    assert sorted(resumed) == [6, 7, 8, 9, 10]
    assert all(resumed[s] == straight[s] for s in resumed)
    for a, b in zip(state(out / "ckpt/step_0000010"), state(out2 / "ckpt/step_0000010"), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.mpi
@pytest.mark.parametrize("save_ranks, load_ranks", [(2, 1), (1, 3)])
def test_resume_on_another_number_of_ranks(tmp_path, shakespeare_bytes, hf_folder, save_ranks, load_ranks):
    cfg, out = lora_config(tmp_path, shakespeare_bytes, hf_folder, "straight")
    train(cfg, ranks=save_ranks)
    cfg2, out2 = lora_config(tmp_path, shakespeare_bytes, hf_folder, "resumed")
    continue_from(out, 5, out2)
    train(cfg2, "--resume", "auto", ranks=load_ranks)
    straight, resumed = losses(out), losses(out2)
    assert sorted(resumed) == [6, 7, 8, 9, 10]
    np.testing.assert_allclose([resumed[s] for s in resumed], [straight[s] for s in resumed], rtol=1e-5)
    a, b = state(out / "ckpt/step_0000010")[0], state(out2 / "ckpt/step_0000010")[0]
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a)


def test_resuming_on_another_base_or_without_lora_is_refused_in_one_line(tmp_path, shakespeare_bytes):
    base = save_hf(tmp_path / "base", seed=0)
    cfg, out = lora_config(tmp_path, shakespeare_bytes, base, max_steps=2, every=0)
    train(cfg)
    mf = out / "ckpt" / "step_0000002" / "manifest.json"
    saved = read_lora(out)[1]["base"]["sha256"][:16]
    other = save_hf(tmp_path / "other", seed=1)
    line = one_line(train(cfg, "--resume", "auto", "train.max_steps=4", f"init_from={other}", ok=False))
    assert line.startswith(f"distgpt.train: error: {mf}: its LoRA adapters were trained on the base {base} "
                           f"(sha256 {saved}), this run's base is {other} (sha256 ")
    save_hf(base, seed=1)                            # the same folder, other weights
    line = one_line(train(cfg, "--resume", "auto", "train.max_steps=4", ok=False))
    assert f"this run's base is {base}, which now holds other weights" in line
    save_hf(base, seed=0)
    line = one_line(train(cfg, "--resume", "auto", "train.max_steps=4", "lora.rank=0", ok=False))
    assert line.startswith(f"distgpt.train: error: {mf}: a LoRA checkpoint (LoRA rank {RANK}, alpha {ALPHA}")
    line = one_line(train(cfg, "--resume", "auto", "train.max_steps=4", "lora.rank=8", ok=False))
    assert line == (f"distgpt.train: error: {mf}: saved with other LoRA settings: lora.rank={RANK} "
                    "(this run: 8); resume with the checkpoint's lora settings, or start a new run in "
                    "another out_dir")
    r = train(cfg, "--resume", "auto", "train.max_steps=4")           # the same base again: resumes
    assert "resumed from" in r.stdout


def test_lora_on_a_model_pretrained_by_distgpt(tmp_path, shakespeare_bytes):
    """init_from a distgpt out_dir: its newest checkpoint is the frozen base; a whole model's
    checkpoint resumed by a LoRA run is refused in one line."""
    pre = tiny_config(tmp_path, shakespeare_bytes, train={"max_steps": 3})
    train(pre)
    pretrained = tmp_path / "out"
    cfg, out = lora_config(tmp_path, shakespeare_bytes, pretrained, max_steps=3, every=0)
    r = train(cfg)
    assert f"frozen base: {pretrained} (fp32" in r.stdout
    _, params = read_params(pretrained)                 # (vocab padded to 1: the pretraining config's)
    cfg_base, base = load_init(str(pretrained), MODEL)  # (padded to 64: the LoRA run's model.vocab_multiple)
    n = Layout(cfg_base).views(base)["wte"].shape[1] * 257
    assert np.array_equal(base[:n], params[:n]) and cfg_base.n_layer == 2
    assert read_lora(out)[1]["base"]["sha256"] == hashlib.sha256(base.tobytes()).hexdigest()
    r = train(cfg, f"resume={pretrained}", "out_dir=" + str(tmp_path / "o3"), ok=False)
    line = one_line(r)
    assert "a whole model's checkpoint (no LoRA), this run trains LoRA adapters (lora.rank = 4)" in line


def test_dry_run_gives_the_lora_memory_plan(tmp_path, shakespeare_bytes, hf_folder):
    cfg, out = lora_config(tmp_path, shakespeare_bytes, hf_folder)
    r = train(cfg, "--dry-run", "train.precision=fp32")
    assert "4,096 trainable parameters" in r.stdout and f"the frozen base from {hf_folder}" in r.stdout
    assert "memory per rank (estimate): adapters 0 MiB" in r.stdout
    assert "the frozen base 0 MiB per node (fp32, one copy shared by the node's ranks)" in r.stdout
    assert not out.exists()


# ----------------------------------------------------------------------------- one copy per node

WORKER = """
import sys
import numpy as np
from distgpt import dist
from distgpt.config import load_config
from distgpt.trainer import Trainer, initial_params

comm = dist.init()
cfg = load_config(None, ["init_from=" + sys.argv[1], "lora.rank=4", "model.block_size=32", "train.seq_len=16",
                         "train.precision=" + sys.argv[2], "parallel.threads_per_rank=1"])
cfg, adapters = initial_params(cfg)
t = Trainer(cfg, comm, adapters)
base = t.model.params if t.model.params is not None else t.model.base16
before = base[:4].copy()
comm.barrier()
if comm.rank == 0:
    base[:4] = 7                           # a write by rank 0 ...
t.base_node.shared_barrier()
seen = bool(np.all(base[:4] == 7))        # ... seen by rank 1
open(f"{sys.argv[3]}/rank{comm.rank}.txt", "w").write(f"{t.base_shared} {base.dtype} {seen}")
"""


@pytest.mark.mpi
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_base_is_one_copy_per_node(tmp_path, hf_folder, precision):
    """Two ranks hold one base between them: what rank 0 writes into its buffer, rank 1 reads in
    its own (a private copy per rank would not see it); bf16 bits for a bf16 run."""
    import subprocess
    import sys

    from conftest import cli_env

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = cli_env(**(bf16_env() if precision == "bf16" else {}))
    r = subprocess.run([str(MPIRUN), "-n", "2", sys.executable, str(script), str(hf_folder), precision,
                        str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    dtype = "float32" if precision == "fp32" else "uint16"
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == f"True {dtype} True"


@pytest.mark.mpi
def test_lora_under_diloco_syncs_the_adapters_and_resumes_exactly(tmp_path, shakespeare_bytes, hf_folder):
    """parallel.sync=diloco on 2 simulated hosts of 2 ranks: the outer sync runs on the adapters (each
    host loads its own shared base), and a resume across a sync is bit-exact."""
    hosts = {"MPIR_CVAR_NUM_CLIQUES": "2"}
    sync = ["parallel.sync=diloco", "parallel.diloco.inner_steps=2", "train.micro_batch_size=3"]
    cfg, out = lora_config(tmp_path, shakespeare_bytes, hf_folder, "straight", max_steps=6, every=3)
    r = train(cfg, *sync, ranks=4, env=hosts)
    assert "sync: diloco, 2 worker(s)" in r.stdout and "read by the node's 2 ranks" in r.stdout
    assert [row["step"] for row in read_metrics(out) if "pseudo_grad_norm" in row] == [2, 4, 6]
    cfg2, out2 = lora_config(tmp_path, shakespeare_bytes, hf_folder, "resumed", max_steps=6, every=3)
    continue_from(out, 3, out2)
    train(cfg2, *sync, "--resume", "auto", ranks=4, env=hosts)
    straight, resumed = losses(out), losses(out2)
    assert sorted(resumed) == [4, 5, 6] and all(resumed[s] == straight[s] for s in resumed)
    assert np.array_equal(read_params(out)[1], read_params(out2)[1])


def test_the_memory_plan_of_gpt2_xl_with_lora():
    """summary() for GPT-2 XL, LoRA r 8 on all four targets, bf16, 2 ranks on one node: the base at 2
    bytes per parameter once per node, the adapters with their gradients and moments at 16 bytes
    per element (ZeRO-1 halves the moments), activations as the model counts them with the adapters."""
    from distgpt.config import Config, LoraConfig, TrainConfig
    from distgpt.model import activation_bytes
    from distgpt.train import RUNTIME_BYTES, summary

    xl = ModelConfig(n_layer=48, n_head=25, n_embd=1600, block_size=1024)
    cfg = Config(model=xl, init_from="gpt2-xl", lora=LoraConfig(rank=8),
                 train=TrainConfig(batch_size=2, micro_batch_size=1, seq_len=1024, recompute="block"))
    lines = summary(cfg, 2, 1, "bf16")
    # per block: r x (in + out) for c_attn (1600 -> 4800), c_proj (1600 -> 1600), c_fc (1600 -> 6400),
    # mlp.c_proj (6400 -> 1600): peft's count for GPT-2 XL
    n_adapters = 48 * 8 * (6400 + 3200 + 8000 + 8000)
    assert n_adapters == 9_830_400
    assert any(f"{n_adapters:,} trainable parameters (0.63% of 1,557,611,200); the frozen base from gpt2-xl"
               in line for line in lines)
    mem = lines[-1]
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    acts = activation_bytes(xl, 1, 1024, precision="bf16", recompute="block", lora_rank=8)
    assert mem.startswith(f"memory per rank (estimate): adapters {mib(4 * n_adapters)}, grads "
                          f"{mib(4 * n_adapters)}, AdamW moments {mib(8 * n_adapters / 2)}, activations "
                          f"{mib(acts)} (recompute block)")
    base = 2 * Layout(xl).size
    small = 4 * (1024 * 1600 + 2 * 1600 + 48 * 13 * 1600)      # the float32 LayerNorms, biases and wpe
    # the bf16 kernels' workspace: the MLP's input and output gradient (BT x 4C each), the head's
    # input (BT x C) and one 512-row chunk of the logits' gradient, all bf16
    scratch = 2 * (2 * 1024 * 6400 + 1024 * 1600 + 512 * 50257)
    assert f"bf16 kernel scratch {mib(scratch)}, float32 LayerNorms/biases/wpe {mib(small)}, runtime " in mem
    per_rank = 8 * n_adapters + 8 * n_adapters / 2 + acts + small + scratch + RUNTIME_BYTES
    assert mem.endswith(f"; total {mib(per_rank)}; the frozen base {mib(base)} per node (bf16, one copy "
                        f"shared by the node's ranks); per node with 2 rank(s): {mib(base + 2 * per_rank)}")
