"""A run never loses another run's work, and finds out_dir problems before it trains: a fresh run
into an out_dir holding a run is refused (or, asked to, starts over removing only what distgpt
wrote); a folder that cannot take the run is one line before the first step; a failed run leaves
no empty folder. In every refusal, everything on disk is byte-identical afterwards."""

from __future__ import annotations

import pytest

from distgpt.checkpoint import list_checkpoints

from conftest import bf16_env, read_metrics, run_cli, tiny_config
from snapshot import tree_digest


def _one_error_line(r, *parts: str) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("distgpt.train: error: "), r.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def test_a_fresh_run_into_an_out_dir_holding_a_run_is_refused(tmp_path, shakespeare_bytes):
    cfg = tiny_config(tmp_path, shakespeare_bytes, train={"max_steps": 3})
    out = tmp_path / "out"
    assert run_cli("train", "--config", str(cfg)).returncode == 0
    before = tree_digest(out)
    r = run_cli("train", "--config", str(cfg), "train.seed=7")
    _one_error_line(r, f"out_dir {out} holds another run (1 checkpoint(s), the newest at step 3 and "
                       "metrics.jsonl)", "--resume auto", "another out_dir", "--overwrite")
    assert "step" not in r.stdout                       # refused before the first step
    assert tree_digest(out) == before


def test_overwrite_starts_over_and_keeps_what_distgpt_did_not_write(tmp_path, shakespeare_bytes):
    cfg = tiny_config(tmp_path, shakespeare_bytes, train={"max_steps": 4}, checkpoint={"every": 2})
    out = tmp_path / "out"
    assert run_cli("train", "--config", str(cfg)).returncode == 0
    (out / "notes.txt").write_text("my notes")
    (out / "ckpt" / "README").write_text("what these checkpoints are")
    mine = {k: v for k, v in tree_digest(out).items() if k in ("notes.txt", "ckpt/README")}
    r = run_cli("train", "--config", str(cfg), "train.max_steps=2", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert {k: v for k, v in tree_digest(out).items() if k in mine} == mine
    assert [p.name for p in list_checkpoints(out)] == ["step_0000002"]       # the old run's 2 and 4 gone
    assert [row["step"] for row in read_metrics(out)] == [0, 1, 2]          # its step-0 val loss first
    # resume=auto continues the new run, not the old run's newer step 4
    r = run_cli("train", "--config", str(cfg), "train.max_steps=3", "--resume", "auto")
    assert r.returncode == 0, r.stderr
    assert "at step 2" in r.stdout


@pytest.mark.parametrize("case", ["out_dir is a file", "ckpt is a file", "metrics is a folder",
                                  "not writable"])
def test_out_dir_problems_stop_the_run_before_training(tmp_path, shakespeare_bytes, case):
    out = tmp_path / "out"
    expect = {"out_dir is a file": "exists and is not a folder",
              "ckpt is a file": "is a file, where the checkpoint folder goes",
              "metrics is a folder": "is a folder, where the metrics file goes",
              "not writable": "is not a writable folder"}[case]
    if case == "out_dir is a file":
        out.write_text("a user's file")
    elif case == "ckpt is a file":
        out.mkdir()
        (out / "ckpt").write_text("a user's file")
    elif case == "metrics is a folder":
        (out / "metrics.jsonl").mkdir(parents=True)
    else:
        out = tmp_path / "proc_out" / "run"
    if case == "not writable":
        cfg = tiny_config(tmp_path, shakespeare_bytes, out_dir="/proc/distgpt_run")
    else:
        cfg = tiny_config(tmp_path, shakespeare_bytes, train={"max_steps": 3})
    before = tree_digest(tmp_path)
    r = run_cli("train", "--config", str(cfg))
    _one_error_line(r, expect)
    assert "Traceback" not in r.stderr and "| loss" not in r.stdout
    assert tree_digest(tmp_path) == before


def test_a_failed_run_leaves_no_empty_out_dir(tmp_path, shakespeare_bytes):
    cfg = tiny_config(tmp_path, shakespeare_bytes)
    r = run_cli("train", "--config", str(cfg), f"resume={tmp_path / 'no_such_run'}")
    assert r.returncode == 2 and "no_such_run" in r.stderr
    assert not (tmp_path / "out").exists()


def test_dry_run_checks_the_data_and_out_dir_after_printing_the_plan(tmp_path, shakespeare_bytes):
    cfg = tiny_config(tmp_path, shakespeare_bytes, train={"max_steps": 3})
    r = run_cli("train", "--config", str(cfg), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "checks passed: data, out_dir" in r.stdout and not (tmp_path / "out").exists()
    r = run_cli("train", "--config", str(cfg), "--dry-run", f"data.train={tmp_path}/nothing_*.bin")
    _one_error_line(r, "nothing_*.bin")
    assert "memory per rank (estimate)" in r.stdout         # the plan still came first
    assert run_cli("train", "--config", str(cfg)).returncode == 0
    r = run_cli("train", "--config", str(cfg), "--dry-run")
    _one_error_line(r, "holds another run")


def test_dry_run_estimates_the_memory_of_the_precision_auto_resolves_to(tmp_path, shakespeare_bytes):
    env = bf16_env()
    cfg = tiny_config(tmp_path, shakespeare_bytes, train={"precision": "bf16"})
    r = run_cli("train", "--config", str(cfg), "--dry-run", env=env)
    assert r.returncode == 0, r.stderr
    assert "bf16 weights" in r.stdout
    r = run_cli("train", "--config", str(cfg), "--dry-run", "train.precision=fp32")
    assert "bf16 weights" not in r.stdout


def test_a_step_folder_distgpt_did_not_write_is_never_removed(tmp_path, shakespeare_bytes):
    """A step_* folder without a manifest in out_dir/ckpt is not a checkpoint distgpt published: a
    fresh run is refused, and with --overwrite neither the start-over nor the first save's pruning
    of old checkpoints touches it."""
    cfg = tiny_config(tmp_path, shakespeare_bytes, train={"max_steps": 2}, checkpoint={"keep": 1})
    theirs = tmp_path / "out" / "ckpt" / "step_0000100"
    theirs.mkdir(parents=True)
    (theirs / "notes.txt").write_text("not a checkpoint")
    before = tree_digest(tmp_path / "out")
    _one_error_line(run_cli("train", "--config", str(cfg)),
                    "holds another run (1 checkpoint(s), the newest at step 100)")
    assert tree_digest(tmp_path / "out") == before
    r = run_cli("train", "--config", str(cfg), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (theirs / "notes.txt").read_text() == "not a checkpoint"


def test_overwrite_and_resume_auto_contradict_each_other(tmp_path, shakespeare_bytes):
    cfg = tiny_config(tmp_path, shakespeare_bytes)
    _one_error_line(run_cli("train", "--config", str(cfg), "--overwrite", "--resume", "auto"), "choose one")
