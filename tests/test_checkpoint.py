"""Sharded checkpoints (distgpt/checkpoint.py): round trip, pruning, resharding across world sizes under
real mpirun, crash safety under SIGKILL at every stage of a save, and detection of damaged files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distgpt.checkpoint import (
    CRASH_ENV,
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    read_params,
    resolve_resume,
    save_checkpoint,
    validate,
)
from distgpt.dist import Comm
from distgpt.model import Layout, ModelConfig
from distgpt.partition import Partition, even_ranges

from ckpt_worker import LAYOUT, make_state
from conftest import MPIRUN

WORKER = Path(__file__).with_name("ckpt_worker.py")
N = LAYOUT.size
SOLO = Comm()  # a single process: every collective is the identity


def save(out: Path, step: int, seed: int, keep: int = 3, meta: dict | None = None) -> Path:
    state = make_state(seed)
    meta = {"seed": seed} if meta is None else meta
    return save_checkpoint(out, step, SOLO, LAYOUT, Partition(N, 1, 0), *state, meta, keep)


def load(path: Path, layout: Layout = LAYOUT) -> tuple[np.ndarray, dict]:
    params, m, v, manifest = load_checkpoint(path, SOLO, layout, Partition(layout.size, 1, 0))
    return np.stack([params, m, v]), manifest


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def run_worker(*args: str, world: int | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """The worker alone (world None: a plain process) or under `mpirun -n world`."""
    cmd = [sys.executable, str(WORKER), *args]
    if world is not None:
        cmd = [str(MPIRUN), "-n", str(world), *cmd]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=full_env)


def shard_file(path: Path, i: int = 0) -> Path:
    return path / f"shard_{i:05d}.npy"


# ----------------------------------------------------------------------------- round trip

def test_round_trip_is_bit_exact(tmp_path: Path):
    meta = {"config": {"lr": 6e-4, "zero": True}, "loader": {"step": 7}, "tokens_seen": 123456,
            "rng": np.random.default_rng(3).bit_generator.state}
    path = save(tmp_path, 7, seed=1, meta=meta)
    assert path == tmp_path / "ckpt" / "step_0000007"
    state, manifest = load(path)
    assert same_bits(state, make_state(1))
    assert manifest["meta"] == meta and manifest["step"] == 7 and manifest["world_size"] == 1
    assert manifest["layout"] == LAYOUT.describe() and manifest["n_params"] == N

    # the shard is a plain memory-mappable .npy and the manifest records its true size
    mm = np.load(shard_file(path), mmap_mode="r")
    assert mm.shape == (3, N) and mm.dtype == np.float32 and same_bits(np.asarray(mm), state)
    assert manifest["shards"][0]["bytes"] == shard_file(path).stat().st_size
    assert validate(path) == manifest

    # sample/export reads the parameters alone, from a folder or from the output directory
    for where in (path, tmp_path):
        manifest2, params = read_params(where)
        assert manifest2 == manifest and same_bits(params, state[0])

    # any rank's part of any partition loads, not only the one saved
    part = Partition(N, 3, 1)
    params, m, v, _ = load_checkpoint(path, SOLO, LAYOUT, part)
    start, end = part.owned
    assert same_bits(np.stack([params, m, v]), state[:, start:end])


def test_keep_prunes_and_latest_points_to_newest(tmp_path: Path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, seed=step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000004", "step_0000003"]
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_0000004"
    assert resolve_resume(tmp_path, "auto", SOLO) == tmp_path / "ckpt" / "step_0000004"

    # a damaged checkpoint does not count towards `keep`: the older complete one survives instead
    with open(shard_file(tmp_path / "ckpt" / "step_0000004"), "r+b") as f:
        f.truncate(1000)
    save(tmp_path, 5, seed=5, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000005", "step_0000003"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step_0000003", "step_0000005"]


def test_empty_and_missing(tmp_path: Path):
    assert list_checkpoints(tmp_path) == []
    assert resolve_resume(tmp_path, "auto", SOLO) is None
    with pytest.raises(CheckpointError, match="nowhere"):
        resolve_resume(tmp_path, str(tmp_path / "nowhere"), SOLO)
    with pytest.raises(CheckpointError, match="step_0000009"):
        resolve_resume(tmp_path, str(tmp_path / "ckpt" / "step_0000009"), SOLO)
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        read_params(tmp_path)


def test_unserialisable_meta_fails_before_writing(tmp_path: Path):
    with pytest.raises(CheckpointError, match="step_0000001"):
        save(tmp_path, 1, seed=0, meta={"bad": object()})
    assert list_checkpoints(tmp_path) == []


# ----------------------------------------------------------------------------- resharding under mpirun

@pytest.mark.mpi
@pytest.mark.parametrize("saved_world, load_worlds", [(2, (1, 3)), (1, (2,)), (3, (2,))])
def test_resharding_across_world_sizes(tmp_path: Path, saved_world: int, load_worlds: tuple[int, ...]):
    r = run_worker("save", str(tmp_path), "11", world=saved_world)
    assert r.returncode == 0, r.stderr
    path = tmp_path / "ckpt" / "step_0000001"
    manifest = validate(path)
    assert manifest["world_size"] == saved_world and len(manifest["shards"]) == saved_world
    assert tuple((s["start"], s["end"]) for s in manifest["shards"]) == even_ranges(N, saved_world)

    for world in load_worlds:
        r = run_worker("load", str(tmp_path), world=world)
        assert r.returncode == 0, r.stderr
        parts = [np.load(tmp_path / f"loaded_w{world}_r{rank}.npy") for rank in range(world)]
        sizes = [e - s for s, e in even_ranges(N, world)]
        assert [p.shape[1] for p in parts] == sizes
        assert same_bits(np.concatenate(parts, axis=1), make_state(11))


# ----------------------------------------------------------------------------- crash safety

CRASH_POINTS = ["mid_shard", "after_shard", "before_manifest", "after_manifest", "before_latest"]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sigkill_during_save_leaves_previous_checkpoint(tmp_path: Path, point: str):
    ckpt = tmp_path / "ckpt"
    previous = save(tmp_path, 10, seed=10)
    r = run_worker("save", str(tmp_path), "20", "--step", "20", env={CRASH_ENV: point})
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)

    validate(previous)
    assert (ckpt / "latest").read_text().strip() == "step_0000010"
    if point == "before_latest":
        # the folder was already published complete; only the `latest` pointer lags behind
        assert resolve_resume(tmp_path, "auto", SOLO) == ckpt / "step_0000020"
    else:
        assert list_checkpoints(tmp_path) == [previous]
        assert resolve_resume(tmp_path, "auto", SOLO) == previous
        assert (ckpt / ".tmp_step_0000020").is_dir()  # the debris is there, and ignored

    # saving the same step again succeeds (replacing a published one), and clears the debris
    path = save(tmp_path, 20, seed=21)
    state, manifest = load(path)
    assert same_bits(state, make_state(21)) and manifest["meta"]["seed"] == 21
    assert resolve_resume(tmp_path, "auto", SOLO) == path
    assert (ckpt / "latest").read_text().strip() == "step_0000020"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_0000010", "step_0000020"]


@pytest.mark.mpi
def test_sigkill_of_one_rank_under_mpirun(tmp_path: Path):
    assert run_worker("save", str(tmp_path), "10", "--step", "10", world=2).returncode == 0
    r = run_worker("save", str(tmp_path), "20", "--step", "20", world=2, env={CRASH_ENV: "before_manifest"})
    assert r.returncode != 0
    assert (tmp_path / "ckpt" / ".tmp_step_0000020" / "shard_00001.npy").is_file()  # got that far
    assert resolve_resume(tmp_path, "auto", SOLO) == tmp_path / "ckpt" / "step_0000010"
    assert run_worker("save", str(tmp_path), "20", "--step", "20", world=2).returncode == 0
    assert resolve_resume(tmp_path, "auto", SOLO) == tmp_path / "ckpt" / "step_0000020"


# ----------------------------------------------------------------------------- damaged checkpoints

def truncate_shard(path: Path) -> Path:
    with open(shard_file(path), "r+b") as f:
        f.truncate(shard_file(path).stat().st_size - 4)
    return shard_file(path)


def flip_byte(path: Path) -> Path:
    with open(shard_file(path), "r+b") as f:
        f.seek(5000)
        b = f.read(1)
        f.seek(5000)
        f.write(bytes([b[0] ^ 0x01]))
    return shard_file(path)


def delete_manifest(path: Path) -> Path:
    (path / "manifest.json").unlink()
    return path / "manifest.json"


def delete_shard(path: Path) -> Path:
    shard_file(path).unlink()
    return shard_file(path)


def garble_manifest(path: Path) -> Path:
    mf = path / "manifest.json"
    mf.write_text(mf.read_text()[:-20])
    return mf


def bump_version(path: Path) -> Path:
    mf = path / "manifest.json"
    mf.write_text(json.dumps({**json.loads(mf.read_text()), "version": 99}))
    return mf


@pytest.mark.parametrize("damage, message", [
    (truncate_shard, "truncated"), (flip_byte, "sha256"), (delete_manifest, "missing"),
    (delete_shard, "missing"), (garble_manifest, "unreadable"), (bump_version, "version 99"),
])
def test_damage_is_detected_and_auto_falls_back(tmp_path: Path, damage, message: str, capsys):
    good = save(tmp_path, 1, seed=1)
    bad = save(tmp_path, 2, seed=2)
    bad_file = damage(bad)

    with pytest.raises(CheckpointError, match=message) as e:
        validate(bad)
    assert str(bad_file) in str(e.value)
    with pytest.raises(CheckpointError, match="step_0000002"):
        resolve_resume(tmp_path, str(bad), SOLO)
    assert resolve_resume(tmp_path, "auto", SOLO) == good
    assert resolve_resume(tmp_path, str(tmp_path), SOLO) == good  # an out_dir: its newest valid
    # each skipped checkpoint is one warning line naming it and why (not Python's two-line warning)
    warned = capsys.readouterr().err.splitlines()
    assert len(warned) == 2 and all(line.startswith("distgpt: warning: skipping checkpoint step_0000002: ")
                                    and message.split(".")[0] in line for line in warned), warned


def test_verify_on_load_catches_corruption(tmp_path: Path):
    path = save(tmp_path, 1, seed=1)
    bad_file = flip_byte(path)
    load(path)  # without verify only the structure is checked (resolve_resume already hashed)
    with pytest.raises(CheckpointError, match="sha256") as e:
        load_checkpoint(path, SOLO, LAYOUT, Partition(N, 1, 0), verify=True)
    assert str(bad_file) in str(e.value)


@pytest.mark.parametrize("cfg, tensor", [
    (dict(vocab_size=51), "wte"),            # a shape differs
    (dict(block_size=4), "wpe"),             # a shape differs, then every offset after it
    (dict(n_layer=3), "h.2.ln_1.weight"),    # the model has a tensor the checkpoint lacks
    (dict(n_layer=1), "h.1.ln_1.weight"),    # the checkpoint has a tensor the model lacks
])
def test_mismatching_layout_is_refused(tmp_path: Path, cfg: dict, tensor: str):
    path = save(tmp_path, 1, seed=1)
    base = dict(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=50, vocab_multiple=1)
    other = Layout(ModelConfig(**{**base, **cfg}))
    with pytest.raises(CheckpointError, match=tensor) as e:
        load(path, other)
    assert "manifest.json" in str(e.value)
