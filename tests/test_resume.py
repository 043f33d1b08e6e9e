"""Checkpoint and resume through the real training command: exact continuation, resharding to a
different number of ranks, preemption by signal, and refusal of checkpoints that do not fit."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from distgpt.checkpoint import list_checkpoints, load_checkpoint
from distgpt.dist import Comm
from distgpt.model import Layout, ModelConfig
from distgpt.partition import Partition

from conftest import MPIRUN, bf16_env, read_metrics, run_cli, tiny_config
from snapshot import tree_digest


def _state(ckpt: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full params, m, v of a checkpoint, whatever world size wrote it."""
    layout = Layout(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=257,
                                vocab_multiple=1))
    p, m, v, _ = load_checkpoint(ckpt, Comm(), layout, Partition(layout.size, 1, 0))
    return p, m, v


def _config(tmp_path, data, name, every=5, **train):
    out = tmp_path / name
    out.mkdir()
    return tiny_config(out, data, model={"dropout": 0.1},
                       train={"max_steps": 10, "micro_batch_size": 2, **train},
                       checkpoint={"every": every, "keep": 5}), out / "out"


def _continue_from(src_out: Path, step: int, dst_out: Path) -> None:
    """Start a new out_dir that holds only the checkpoint of `step` from src_out."""
    (dst_out / "ckpt").mkdir(parents=True)
    shutil.copytree(src_out / "ckpt" / f"step_{step:07d}", dst_out / "ckpt" / f"step_{step:07d}")


@pytest.mark.mpi
@pytest.mark.parametrize("ranks, zero, precision", [(1, False, "fp32"), (2, True, "fp32"), (2, True, "bf16")])
def test_resume_is_bit_identical(tmp_path, shakespeare_bytes, ranks, zero, precision):
    env = bf16_env() if precision == "bf16" else {}
    mpi = ranks if ranks > 1 else 0
    cfg, out = _config(tmp_path, shakespeare_bytes, "straight", precision=precision)
    r = run_cli("train", "--config", str(cfg), f"parallel.zero={zero}", ranks=mpi, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    cfg2, out2 = _config(tmp_path, shakespeare_bytes, "resumed", precision=precision)
    _continue_from(out, 5, out2)
    r = run_cli("train", "--config", str(cfg2), f"parallel.zero={zero}", "--resume", "auto", ranks=mpi,
                timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and "at step 5" in r.stdout
    straight = {row["step"]: row.get("train_loss") for row in read_metrics(out)}
    resumed = {row["step"]: row.get("train_loss") for row in read_metrics(out2)}
    assert min(resumed) == 6 and max(resumed) == 10
    assert all(resumed[s] == straight[s] for s in resumed)           # bit-identical losses
    final = "ckpt/step_0000010"
    for a, b in zip(_state(out / final), _state(out2 / final), strict=True):
        assert np.array_equal(a, b)                                   # params, m, v


@pytest.mark.mpi
@pytest.mark.parametrize("save_ranks, save_zero, load_ranks, load_zero",
                         [(2, False, 1, False), (2, True, 3, False), (1, False, 2, True), (3, True, 2, True)])
def test_resume_on_a_different_number_of_ranks(tmp_path, shakespeare_bytes, save_ranks, save_zero,
                                               load_ranks, load_zero):
    # batch 12 divides over micro 2 x {1, 2, 3} ranks; dropout off so the reference does not depend on ranks
    cfg, out = _config(tmp_path, shakespeare_bytes, "straight")
    common = ["model.dropout=0.0"]
    mpi = lambda n: n if n > 1 else 0  # noqa: E731
    r = run_cli("train", "--config", str(cfg), *common, f"parallel.zero={save_zero}", ranks=mpi(save_ranks),
                timeout=120)
    assert r.returncode == 0, r.stderr
    cfg2, out2 = _config(tmp_path, shakespeare_bytes, "resumed")
    _continue_from(out, 5, out2)
    r = run_cli("train", "--config", str(cfg2), *common, f"parallel.zero={load_zero}", "resume=auto",
                ranks=mpi(load_ranks), timeout=120)
    assert r.returncode == 0, r.stderr
    straight = {row["step"]: row.get("train_loss") for row in read_metrics(out)}
    resumed = {row["step"]: row.get("train_loss") for row in read_metrics(out2)}
    assert sorted(resumed) == [6, 7, 8, 9, 10]
    np.testing.assert_allclose([resumed[s] for s in resumed], [straight[s] for s in resumed], rtol=1e-5)
    p1, m1, v1 = _state(out / "ckpt" / "step_0000010")
    p2, m2, v2 = _state(out2 / "ckpt" / "step_0000010")
    assert np.linalg.norm(p1 - p2) <= 1e-5 * np.linalg.norm(p1)


def _rank_pids(config: Path) -> dict[int, int]:
    """pids of the training ranks started with `config`, by their PMI rank."""
    pids = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            env_items = (entry / "environ").read_bytes().split(b"\0")
            env = dict(kv.split(b"=", 1) for kv in env_items if b"=" in kv)
        except OSError:
            continue
        if b"distgpt.train" in cmd and str(config).encode() in cmd and b"PMI_RANK" in env:
            pids[int(env[b"PMI_RANK"])] = int(entry.name)
    return pids


@pytest.mark.mpi
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find the ranks")
def test_sigterm_to_one_rank_checkpoints_and_exits_zero(tmp_path, shakespeare_bytes):
    cfg, out = _config(tmp_path, shakespeare_bytes, "run", max_steps=100000)
    env = {**os.environ, "DISTGPT_NO_MPI": "0"}
    cmd = [str(MPIRUN), "-n", "2", sys.executable, "-m", "distgpt.train", "--config", str(cfg),
           "checkpoint.every=0", "train.log_every=1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        pids = _rank_pids(cfg)
        assert set(pids) == {0, 1}, pids
        os.kill(pids[1], signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "signal received: checkpointing at step" in stdout
    saved = list_checkpoints(out)
    assert len(saved) == 1
    step = int(saved[0].name.split("_")[1])
    r = run_cli("train", "--config", str(cfg), f"train.max_steps={step + 2}", "resume=auto", ranks=2,
                timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"resumed from {saved[0]} at step {step}" in r.stdout
    steps = [row["step"] for row in read_metrics(out)]
    assert steps[-2:] == [step + 1, step + 2] and steps == sorted(steps)


@pytest.mark.parametrize("change, named", [
    ("model.n_embd=64", "model.n_embd=32 (this run: 64)"),
    ("model.n_layer=3", "model.n_layer=2 (this run: 3)"),
    ("model.n_head=4", "model.n_head=2 (this run: 4)"),      # the same tensor shapes: only the config tells
])
def test_resume_refuses_a_checkpoint_of_another_model(tmp_path, shakespeare_bytes, change, named):
    cfg, out = _config(tmp_path, shakespeare_bytes, "run", max_steps=5)
    assert run_cli("train", "--config", str(cfg)).returncode == 0
    before = tree_digest(out)
    r = run_cli("train", "--config", str(cfg), change, "train.max_steps=6", "resume=auto")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "manifest.json: saved for another model: " + named in lines[0], r.stderr
    assert tree_digest(out) == before


def test_resume_from_a_corrupt_checkpoint_names_the_file(tmp_path, shakespeare_bytes):
    cfg, out = _config(tmp_path, shakespeare_bytes, "run", max_steps=5)
    assert run_cli("train", "--config", str(cfg)).returncode == 0
    ckpt = out / "ckpt" / "step_0000005"
    shard = ckpt / "shard_00000.npy"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = run_cli("train", "--config", str(cfg), f"resume={ckpt}")
    assert r.returncode == 2
    assert "shard_00000.npy" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_resume_auto_without_checkpoints_starts_fresh(tmp_path, shakespeare_bytes):
    cfg, out = _config(tmp_path, shakespeare_bytes, "run", max_steps=2)
    r = run_cli("train", "--config", str(cfg), "resume=auto")
    assert r.returncode == 0, r.stderr
    assert [row["step"] for row in read_metrics(out)] == [0, 1, 2]      # step 0: the initial val loss


def test_resume_keeps_its_seed_and_has_steps_left_to_train(tmp_path, shakespeare_bytes):
    """A resumed run cannot silently change its data order (train.seed) nor train backwards: one line
    each, exit 2, the run's files untouched; --dry-run finds the same. resume=auto on a run that is
    complete (a requeued job) says so and exits 0."""
    cfg, out = _config(tmp_path, shakespeare_bytes, "run", max_steps=5)
    assert run_cli("train", "--config", str(cfg)).returncode == 0
    before = tree_digest(out)
    seed = ("train.seed=1337, this run has 7: a resumed run keeps its seed (drop the override, or start "
            "a new run)")
    for extra in ([], ["--dry-run"]):
        r = run_cli("train", "--config", str(cfg), "train.seed=7", "train.max_steps=8", "--resume", "auto",
                    *extra)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.strip().endswith(seed), r.stderr
    r = run_cli("train", "--config", str(cfg), "train.max_steps=4", "--resume", "auto")
    assert r.returncode == 2
    assert r.stderr.strip().endswith("the run is already at step 5, train.max_steps is 4: nothing to train "
                                     "(raise train.max_steps to continue it)")
    r = run_cli("train", "--config", str(cfg), "--resume", "auto")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.strip() == (f"distgpt.train: the run in {out} is complete: its newest checkpoint is at "
                                "step 5 = train.max_steps (raise train.max_steps to continue it)")
    assert tree_digest(out) == before


def test_resuming_another_history_into_an_out_dir_is_refused(tmp_path, shakespeare_bytes):
    """--resume with a checkpoint from elsewhere into an out_dir holding a run, or from an older
    checkpoint of the out_dir's own run while newer ones exist, would leave two histories that
    resume=auto later mixes: refused unless --overwrite, which removes only what is in the way."""
    cfg_a, out_a = _config(tmp_path, shakespeare_bytes, "a", max_steps=4, every=2)
    cfg_c, out_c = _config(tmp_path, shakespeare_bytes, "c", max_steps=8, every=2)
    assert run_cli("train", "--config", str(cfg_a), "checkpoint.every=2").returncode == 0
    assert run_cli("train", "--config", str(cfg_c), "checkpoint.every=2").returncode == 0
    before = tree_digest(out_c)
    r = run_cli("train", "--config", str(cfg_c), "--resume", str(out_a / "ckpt" / "step_0000002"))
    assert r.returncode == 2 and "holds another run (4 checkpoint(s), the newest at step 8" in r.stderr
    r = run_cli("train", "--config", str(cfg_c), "--resume", str(out_c / "ckpt" / "step_0000004"))
    assert r.returncode == 2 and "holds 2 checkpoint(s), the newest at step 8 after the resumed step 4" \
        in r.stderr, r.stderr
    assert tree_digest(out_c) == before
    r = run_cli("train", "--config", str(cfg_c), "--resume", str(out_c / "ckpt" / "step_0000004"),
                "train.max_steps=6", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert [p.name for p in list_checkpoints(out_c)] == ["step_0000006", "step_0000004", "step_0000002"]


def test_resume_auto_without_a_checkpoint_says_it_starts_from_scratch(tmp_path, shakespeare_bytes):
    cfg, out = _config(tmp_path, shakespeare_bytes, "run", max_steps=2)
    r = run_cli("train", "--config", str(cfg), "--resume", "auto")
    assert r.returncode == 0, r.stderr
    assert f"resume=auto: no checkpoint in {out / 'ckpt'}: starting from scratch" in r.stdout


def test_time_s_continues_across_a_resume(tmp_path, shakespeare_bytes):
    cfg, out = _config(tmp_path, shakespeare_bytes, "run", max_steps=5)
    assert run_cli("train", "--config", str(cfg)).returncode == 0
    first = read_metrics(out)
    assert run_cli("train", "--config", str(cfg), "train.max_steps=8", "--resume", "auto").returncode == 0
    rows = read_metrics(out)
    assert rows[:len(first)] == first
    times = [row["time_s"] for row in rows]
    assert times == sorted(times) and rows[len(first)]["time_s"] > first[-1]["time_s"]


@pytest.mark.mpi
def test_a_refused_resume_is_one_line_under_mpirun(tmp_path, shakespeare_bytes):
    """Rank 0 decides from the manifest and every rank raises alike: one line for the job, exit 2,
    no MPI abort."""
    cfg, out = _config(tmp_path, shakespeare_bytes, "run", max_steps=5)
    assert run_cli("train", "--config", str(cfg)).returncode == 0
    r = run_cli("train", "--config", str(cfg), "model.n_layer=3", "train.max_steps=8", "--resume", "auto",
                ranks=2, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "saved for another model: model.n_layer=2 (this run: 3)" in lines[0], r.stderr
    assert "Abort" not in r.stdout + r.stderr


def test_every_spelling_of_another_history_is_refused(tmp_path, shakespeare_bytes):
    """Decided on the resolved path: a link to an older checkpoint of the run is a rewind, and a copy
    of a checkpoint kept anywhere else (even under out_dir) is a resume from elsewhere."""
    cfg, out = _config(tmp_path, shakespeare_bytes, "run", max_steps=6, every=2)
    assert run_cli("train", "--config", str(cfg)).returncode == 0
    link = tmp_path / "older"
    link.symlink_to(out / "ckpt" / "step_0000002")
    shutil.copytree(out / "ckpt" / "step_0000004", out / "backup" / "step_0000004")
    before = tree_digest(out)
    r = run_cli("train", "--config", str(cfg), "train.max_steps=8", "--resume", str(link))
    assert r.returncode == 2 and "after the resumed step 2" in r.stderr, r.stderr
    copy = out / "backup" / "step_0000004"
    r = run_cli("train", "--config", str(cfg), "train.max_steps=8", "--resume", str(copy))
    assert r.returncode == 2 and "holds another run" in r.stderr, r.stderr
    assert tree_digest(out) == before


def test_resume_auto_does_not_start_over_on_a_run_whose_checkpoints_are_all_damaged(tmp_path,
                                                                                   shakespeare_bytes):
    cfg, out = _config(tmp_path, shakespeare_bytes, "run", max_steps=4, every=2)
    assert run_cli("train", "--config", str(cfg)).returncode == 0
    for ckpt in list_checkpoints(out):
        shard = ckpt / "shard_00000.npy"
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0xFF
        shard.write_bytes(bytes(data))
    before = tree_digest(out)
    r = run_cli("train", "--config", str(cfg), "train.max_steps=6", "--resume", "auto")
    assert r.returncode == 2
    assert "holds 2 checkpoint(s), the newest at step 4, none of them valid" in r.stderr.splitlines()[-1]
    assert tree_digest(out) == before


@pytest.mark.mpi
def test_a_missing_resume_path_is_one_line_under_mpirun(tmp_path, shakespeare_bytes):
    cfg, _ = _config(tmp_path, shakespeare_bytes, "run", max_steps=2)
    r = run_cli("train", "--config", str(cfg), "--resume", str(tmp_path / "nowhere"), ranks=2, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "nowhere" in lines[0] and "Abort" not in r.stdout + r.stderr, r.stderr
