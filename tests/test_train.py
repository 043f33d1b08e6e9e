"""The training command as a user runs it: loss goes down, metrics are exact, bad configs stop early."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import read_metrics, require_mkl, run_cli, tiny_config


@pytest.mark.slow
def test_training_lowers_train_and_val_loss(tmp_path, shakespeare_bytes):
    cfg = tiny_config(tmp_path, shakespeare_bytes,
                      model={"n_embd": 64, "n_head": 4, "block_size": 64},
                      train={"batch_size": 16, "micro_batch_size": 8, "seq_len": 64, "max_steps": 60,
                             "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5, "log_every": 10,
                             "eval_every": 20, "eval_steps": 4})
    r = run_cli("train", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    rows = read_metrics(tmp_path / "out")
    assert [row["step"] for row in rows] == [0, 1, 10, 20, 30, 40, 50, 60]
    assert set(rows[0]) == {"step", "val_loss", "tokens", "time_s"}   # the curve starts at the initial loss
    assert abs(rows[0]["val_loss"] - np.log(257)) < 0.1      # ~ln(257) at initialisation
    train = rows[1:]
    vals = [row["val_loss"] for row in rows if "val_loss" in row]
    assert len(vals) == 4
    assert train[0]["train_loss"] > 5.0
    assert train[-1]["train_loss"] < train[0]["train_loss"] - 2.0
    assert vals[-1] < vals[0] - 0.2 and vals[-1] < 3.3
    assert "step      0 | val loss" in r.stdout
    assert "step     60/60 | loss" in r.stdout and "tok/s" in r.stdout


def test_metrics_floats_read_back_exactly(tmp_path, shakespeare_bytes):
    cfg = tiny_config(tmp_path, shakespeare_bytes, train={"max_steps": 3, "eval_every": 3})
    assert run_cli("train", "--config", str(cfg)).returncode == 0
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4                                    # the initial val loss, then steps 1-3
    for line in lines:
        row = json.loads(line)
        assert json.dumps(row) == line                       # repr-exact floats survive the round trip
    for line in lines[1:]:
        for key in ("step", "train_loss", "lr", "grad_norm", "tokens_per_s"):
            assert key in json.loads(line)
    assert "val_loss" in json.loads(lines[-1])


def test_dry_run_prints_the_plan_without_data(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {n_layer: 12, n_head: 12, n_embd: 768, block_size: 1024}\n"
                   "train: {batch_size: 8, micro_batch_size: 4, seq_len: 1024}\n")
    r = run_cli("train", "--config", str(cfg), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "parameters: 124,439,808" in r.stdout             # GPT-2 124M, vocab 50257
    assert "2 accumulation steps" in r.stdout
    assert "memory per rank (estimate)" in r.stdout and "FLOPs per token" in r.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.mpi
def test_batch_that_does_not_divide_over_ranks(tmp_path, shakespeare_bytes):
    cfg = tiny_config(tmp_path, shakespeare_bytes)                 # batch 12, micro 4: 12 = 4 x 3 ranks
    r = run_cli("train", "--config", str(cfg), "train.max_steps=1", ranks=3, timeout=60)
    assert r.returncode == 0, r.stderr
    r = run_cli("train", "--config", str(cfg), "train.micro_batch_size=3", ranks=3, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == ("distgpt.train: error: train.batch_size = 12: expected a multiple of "
                                "train.micro_batch_size x ranks = 3 x 3 = 9")


def test_progress_bar_on_a_terminal(tmp_path, shakespeare_bytes):
    """On a terminal rank 0 draws a live bar (step, loss, tokens/s, ETA); log lines still appear."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    cfg = tiny_config(tmp_path, shakespeare_bytes, train={"max_steps": 4, "log_every": 2})
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))   # a 160-column terminal
    proc = subprocess.Popen([sys.executable, "-m", "distgpt.train", "--config", str(cfg)], stdout=follower,
                            stderr=subprocess.PIPE)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    screen = b"".join(chunks).decode(errors="replace")
    assert "4/4" in screen and "loss=" in screen and "tok_s=" in screen and "\r" in screen
    assert "step      2/4 | loss" in screen


def test_compiled_kernels_train_exactly_like_their_numpy_twins(tmp_path, shakespeare_bytes):
    """DISTGPT_JIT=0 swaps the numba loops (AdamW, GELU) for NumPy ufuncs doing the same float
    operations: a whole run, losses, gradient norms and val loss, must come out bit for bit."""
    runs = {}
    for flag, header in (("1", "AdamW (compiled, numba)"), ("0", "AdamW (NumPy ufuncs)")):
        run_dir = tmp_path / f"jit{flag}"
        run_dir.mkdir()
        cfg = tiny_config(run_dir, shakespeare_bytes, train={"max_steps": 4, "eval_every": 4})
        r = run_cli("train", "--config", str(cfg), env={"DISTGPT_JIT": flag})
        assert r.returncode == 0, r.stderr
        assert header in r.stdout
        runs[flag] = [(row.get("train_loss"), row.get("grad_norm"), row.get("val_loss"))
                      for row in read_metrics(run_dir / "out")]
    assert len(runs["1"]) == 5 and runs["1"][-1][2] is not None
    assert runs["0"] == runs["1"]


def test_matmul_library_is_chosen_by_distgpt_blas(tmp_path, shakespeare_bytes):
    """DISTGPT_BLAS=numpy and =mkl both train, say which library runs the matmuls, and agree to
    rounding (another summation order); an unknown value is a one-line error naming it."""
    require_mkl()
    losses = {}
    for name, header in (("numpy", "matmuls: NumPy's BLAS"), ("mkl", "matmuls: MKL ")):
        run_dir = tmp_path / name
        run_dir.mkdir()
        cfg = tiny_config(run_dir, shakespeare_bytes, train={"max_steps": 3, "eval_every": 3})
        r = run_cli("train", "--config", str(cfg), env={"DISTGPT_BLAS": name})
        assert r.returncode == 0, r.stderr
        assert header in r.stdout
        losses[name] = [row["train_loss"] for row in read_metrics(run_dir / "out") if "train_loss" in row]
    assert len(losses["mkl"]) == 3
    assert np.allclose(losses["mkl"], losses["numpy"], rtol=1e-5)
    r = run_cli("train", "--config", str(cfg), env={"DISTGPT_BLAS": "cuda"})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "distgpt.train: error: environment variable DISTGPT_BLAS='cuda': expected one of auto, numpy, mkl "
        "(library of the fp32 matmuls: auto takes MKL on Intel CPUs where it is installed)")


def test_a_warmup_longer_than_the_run_is_said_in_the_header(tmp_path, shakespeare_bytes):
    """Legal (a quick look at a long config, as the quickstart's train.max_steps=40 with its 50 warmup
    steps), but the learning rate then never reaches train.lr: one warning line says so."""
    cfg = tiny_config(tmp_path, shakespeare_bytes, train={"max_steps": 2, "warmup_steps": 4, "lr": 1e-3})
    r = run_cli("train", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert ("warning: train.warmup_steps (4) > train.max_steps (2): the learning rate stops at 5.00e-04, "
            "below train.lr (0.001), and never decays") in r.stdout
    r = run_cli("train", "--config", str(cfg), "train.warmup_steps=2", "out_dir=" + str(tmp_path / "o2"))
    assert "warning: train.warmup_steps" not in r.stdout
