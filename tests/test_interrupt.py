"""Ctrl-C is a stop, not a crash: the first one stops every rank at the step boundary, writes a
checkpoint that `--resume auto` continues bit-exactly and exits 130 with one line and no
traceback; a second one exits at once, leaving no half-written checkpoint. The same under mpirun,
which forwards a Ctrl-C (SIGINT to mpiexec, as a terminal sends it) to every rank."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from distgpt.checkpoint import list_checkpoints, read_params, validate

from conftest import cli_command, cli_env, read_metrics, run_cli, tiny_config

MAX_STEPS = 60


def _config(tmp_path: Path, data: Path, name: str) -> tuple[Path, Path]:
    """A model big enough that a step takes tens of milliseconds (the interrupt lands mid-run), with
    dropout so that the resumed steps depend on the step and row counters being restored."""
    folder = tmp_path / name
    folder.mkdir()
    cfg = tiny_config(folder, data, model={"n_embd": 64, "n_head": 4, "block_size": 64, "dropout": 0.1},
                      train={"seq_len": 64, "max_steps": MAX_STEPS, "micro_batch_size": 6, "log_every": 1},
                      parallel={"threads_per_rank": 1})
    return cfg, folder / "out"


def _processes_with(text: str) -> list[int]:
    """pids of the processes whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _start(cfg: Path, ranks: int) -> subprocess.Popen:
    return subprocess.Popen(cli_command("train", "--config", str(cfg), ranks=ranks), env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [0, pytest.param(2, marks=pytest.mark.mpi)])
def test_ctrl_c_checkpoints_at_the_stop_step_and_resume_continues_bit_exactly(tmp_path, shakespeare_bytes,
                                                                              ranks):
    ref_cfg, ref_out = _config(tmp_path, shakespeare_bytes, "straight")
    r = run_cli("train", "--config", str(ref_cfg), ranks=ranks, timeout=300)
    assert r.returncode == 0, r.stderr

    cfg, out = _config(tmp_path, shakespeare_bytes, "interrupted")
    proc = _start(cfg, ranks)
    try:
        _wait_for_step(out, 3, proc)
        proc.send_signal(signal.SIGINT)        # to mpiexec under mpirun: it forwards it to the ranks
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "BAD TERMINATION" not in stdout + stderr
    assert "distgpt.train: interrupted: stopping at the end of this step" in stderr
    saved = list_checkpoints(out)
    assert len(saved) == 1, saved
    stop = int(saved[0].name.split("_")[1])
    assert 3 <= stop < MAX_STEPS, f"the run ended at step {stop} before the interrupt landed"
    assert f"interrupted (Ctrl-C): checkpointing at step {stop} and exiting" in stdout
    validate(saved[0])
    assert [row["step"] for row in read_metrics(out)][-1] == stop

    r = run_cli("train", "--config", str(cfg), "--resume", "auto", ranks=ranks, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"at step {stop}" in r.stdout
    straight = {row["step"]: row["train_loss"] for row in read_metrics(ref_out) if "train_loss" in row}
    resumed = {row["step"]: row["train_loss"] for row in read_metrics(out) if "train_loss" in row}
    assert resumed == straight                                       # every step's loss, bit for bit
    _, p_straight = read_params(ref_out)
    _, p_resumed = read_params(out)
    assert np.array_equal(p_straight, p_resumed)


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [0, pytest.param(2, marks=pytest.mark.mpi)])
def test_a_second_ctrl_c_exits_at_once_without_a_checkpoint(tmp_path, shakespeare_bytes, ranks):
    # a slower step, so that the second Ctrl-C lands while the first one is still waiting for the
    # step boundary
    folder = tmp_path / "run"
    folder.mkdir()
    cfg = tiny_config(folder, shakespeare_bytes,
                      model={"n_layer": 4, "n_embd": 256, "n_head": 4, "block_size": 128},
                      train={"seq_len": 128, "batch_size": 24, "micro_batch_size": 12, "max_steps": 10000,
                             "log_every": 1}, parallel={"threads_per_rank": 1})
    out = folder / "out"
    proc = _start(cfg, ranks)
    try:
        _wait_for_step(out, 2, proc)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        second = time.monotonic()
        stdout, stderr = proc.communicate(timeout=30)
        elapsed = time.monotonic() - second
    finally:
        if proc.poll() is None:
            proc.kill()
    assert elapsed < 5, elapsed
    assert "Traceback" not in stderr
    if ranks == 0:
        assert proc.returncode == 130
        assert "distgpt.train: interrupted again: exiting now without a checkpoint" in stderr
    else:
        # MPICH's mpiexec answers a second Ctrl-C itself ("force abort": it kills the ranks, and
        # its own exit code is its business); what matters is that no rank is left running
        time.sleep(0.5)
        assert not _processes_with(str(cfg)), "ranks left running after the second Ctrl-C"
    # nothing half-written is taken for a checkpoint: whatever is listed validates in full
    for path in list_checkpoints(out):
        validate(path)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGUSR1, 0)])
def test_a_signal_during_the_final_checkpoint_lets_it_finish(tmp_path, shakespeare_bytes, monkeypatch, capsys,
                                                            sig, code):
    """With checkpoint.every 0 the final save is a run's only checkpoint: a Ctrl-C or SLURM's
    SIGUSR1 arriving during it must not lose the run (it finishes, then the exit code says so)."""
    from threadpoolctl import threadpool_limits

    from distgpt import checkpoint, train

    real_save = checkpoint.save_checkpoint

    def signalled_save(*args, **kwargs):
        os.kill(os.getpid(), sig)           # handled between bytecodes, i.e. right here
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", signalled_save)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    cfg = tiny_config(tmp_path, shakespeare_bytes, train={"max_steps": 3}, parallel={"threads_per_rank": 1})
    with threadpool_limits(limits=None):
        assert train.main(["--config", str(cfg)]) == code
    saved = list_checkpoints(tmp_path / "out")
    assert [p.name for p in saved] == ["step_0000003"]
    validate(saved[0])
    assert "Traceback" not in capsys.readouterr().err


def test_ctrl_c_during_a_step_stops_at_the_end_of_that_step(tmp_path, shakespeare_bytes, monkeypatch):
    """The stop is read just before the step's small allreduce: a Ctrl-C during the third step's
    forward checkpoints at step 3, not one step later."""
    from threadpoolctl import threadpool_limits

    from distgpt import model, train

    real_forward = model.GPT.forward
    calls = []

    def forward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3 * 3:                 # 3 micro-batches a step: the third step's last
            os.kill(os.getpid(), signal.SIGINT)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(model.GPT, "forward", forward)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    cfg = tiny_config(tmp_path, shakespeare_bytes, train={"max_steps": 50}, parallel={"threads_per_rank": 1})
    with threadpool_limits(limits=None):
        assert train.main(["--config", str(cfg)]) == 130
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["step_0000003"]
