"""A full disk, for real: a small tmpfs mounted for each test and filled at the chosen moment.

Whatever runs out of space must fail with one line naming the file (`<tool>: error: <file>: no space
left on device`, exit code 2, or a CheckpointError saying so) and leave what was already on disk
(earlier token shards, checkpoints, `latest`, metrics.jsonl) intact and still the one that is used.
Mounting needs root (as in CI); where it is impossible the tests skip, saying why.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from distgpt.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    validate,
)
from distgpt.data import open_shards
from distgpt.dist import Comm
from distgpt.fileio import DiskFullError, append_line, atomic_write, write_text_atomic
from distgpt.partition import Partition

from ckpt_worker import LAYOUT, make_state
from conftest import run_cli, tiny_config

SOLO = Comm()  # one process: the collectives are the identity
PAGE = os.sysconf("SC_PAGE_SIZE")  # tmpfs accounts for space in whole pages
FULL = "no space left on device"


@pytest.fixture
def small_disk(tmp_path: Path):
    """mount(size) -> the mount point of a new tmpfs of that size (e.g. "4m"); unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if shutil.which("mount") is None:
            pytest.skip("no mount command on this machine: cannot make a small disk to fill")
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            why = r.stderr.strip() or f"exit code {r.returncode}"
            pytest.skip(f"cannot mount a tmpfs (needs root, or a container allowed to mount): {why}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)  # busy: detach it anyway


def free_bytes(disk: Path) -> int:
    st = os.statvfs(disk)
    return st.f_bavail * st.f_frsize


def fill(disk: Path, leave: int = 0) -> Path:
    """Take the free space of `disk` but `leave` bytes (a multiple of the page size) with a filler file."""
    assert leave % PAGE == 0
    filler = disk / f"filler{len(list(disk.glob('filler*')))}"
    remaining = free_bytes(disk) - leave
    assert remaining >= 0, f"only {free_bytes(disk)} bytes free, cannot leave {leave}"
    block = bytes(1 << 20)
    with open(filler, "wb") as f:
        while remaining:
            remaining -= f.write(block[:min(remaining, len(block))])
    assert free_bytes(disk) == leave
    return filler


def pages(n_bytes: int) -> int:
    """The space a file of n_bytes takes on a tmpfs."""
    return -(-n_bytes // PAGE) * PAGE


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path: to show nothing changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(r: subprocess.CompletedProcess, tool: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{tool}: error: "), r.stderr
    return lines[0].removeprefix(f"{tool}: error: ")


# ----------------------------------------------------------------------------- the helpers themselves

def test_atomic_write_on_a_full_disk_keeps_the_old_file(small_disk):
    disk = small_disk("64k")
    target = disk / "notes.txt"
    write_text_atomic(target, "old\n")
    fill(disk, leave=PAGE)
    with pytest.raises(DiskFullError) as e:
        with atomic_write(target) as f:
            f.write(b"x" * 3 * PAGE)  # more than is left: fails half way through
    assert str(e.value) == f"{target}: {FULL}" and e.value.errno == errno.ENOSPC
    assert isinstance(e.value, OSError)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in disk.iterdir()) == ["filler0", "notes.txt"]  # no temp file left


def test_append_line_on_a_full_disk_leaves_whole_lines(small_disk):
    disk = small_disk("64k")
    log = disk / "metrics.jsonl"
    with open(log, "a") as f:
        append_line(f, "first", log)
        fill(disk, leave=0)  # the first line's page has room left, a big line does not fit in it
        with pytest.raises(DiskFullError) as e:
            append_line(f, "y" * 3 * PAGE, log)
        assert str(e.value) == f"{log}: {FULL}"
    assert log.read_text() == "first\n"  # closing wrote nothing more


# ----------------------------------------------------------------------------- prepare

def test_prepare_onto_a_full_disk_keeps_the_previous_output(small_disk, tmp_path: Path):
    disk = small_disk("8m")
    out = disk / "data"
    small, big = tmp_path / "small.txt", tmp_path / "big.txt"
    small.write_text("to be or not to be\n" * 4000)      # 76k tokens: 2 shards of 50k tokens at most
    big.write_text("all the world's a stage\n" * 40000)  # 960k tokens: about 20 shards
    args = ("--tokenizer", "bytes", "--out", str(out), "--shard-tokens", "50000", "--workers", "1")
    r = run_cli("prepare", "--source", str(small), *args)
    assert r.returncode == 0, r.stderr
    before = snapshot(out)
    assert sorted(before) == ["manifest.json", "train_000000.bin", "train_000001.bin", "val_000000.bin"]

    # room for two of the new 100 kB shards, not three: the failure comes while writing the third
    shard_bytes = 1024 + 2 * 50000
    fill(disk, leave=2 * pages(shard_bytes) + 10 * PAGE)
    r = run_cli("prepare", "--source", str(big), *args)
    assert one_error_line(r, "prepare") == f"{out / 'train_000002.bin'}: {FULL}"

    # the old output is exactly as it was (no new shard, no staging folder) and still opens as valid
    assert snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(before)
    shards = open_shards(str(out / "train_*.bin"), 257, tokenizer="bytes")
    assert shards.total_tokens == sum(shards.n_tokens) > 60000

    # the failed run freed what it had written: with the filler gone the same command succeeds
    for filler in disk.glob("filler*"):
        filler.unlink()
    r = run_cli("prepare", "--source", str(big), *args)
    assert r.returncode == 0, r.stderr
    assert open_shards(str(out / "train_*.bin"), 257, tokenizer="bytes").total_tokens > 800000
    assert not list(out.glob(".*"))


# ----------------------------------------------------------------------------- checkpoints, in process

def save(out: Path, step: int) -> Path:
    state = make_state(step)
    return save_checkpoint(out, step, SOLO, LAYOUT, Partition(LAYOUT.size, 1, 0), *state, {"seed": step}, 3)


SHARD_BYTES = 128 + 3 * 4 * LAYOUT.size  # the .npy header, then params, m and v as float32


@pytest.mark.parametrize("fails_in, leave", [
    ("shard_00000.npy", 10 * PAGE),                # 40 of the shard's 90 kB: its write fails mid-way
    ("manifest.json", pages(SHARD_BYTES)),         # the shard fits exactly, then the manifest does not
])
def test_checkpoint_save_onto_a_full_disk(small_disk, fails_in: str, leave: int):
    disk = small_disk("2m")
    out = disk / "out"
    ckpt = out / "ckpt"
    first, second = save(out, 1), save(out, 2)
    before = snapshot(out)

    fill(disk, leave=leave)
    with pytest.raises(CheckpointError) as e:
        save(out, 3)
    assert str(e.value) == f"{ckpt / '.tmp_step_0000003' / fails_in}: {FULL}"

    # the earlier checkpoints and `latest` are untouched, the partial save is gone, auto picks step 2
    assert snapshot(out) == before
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_0000001", "step_0000002"]
    assert (ckpt / "latest").read_text() == "step_0000002\n"
    assert list_checkpoints(out) == [second, first]
    validate(first)
    validate(second)
    assert resolve_resume(out, "auto", SOLO) == second
    params, m, v, manifest = load_checkpoint(second, SOLO, LAYOUT, Partition(LAYOUT.size, 1, 0))
    assert np.array_equal(np.stack([params, m, v]), make_state(2)) and manifest["step"] == 2

    # with room again, the next save works and is the one resumed from
    for filler in disk.glob("filler*"):
        filler.unlink()
    third = save(out, 3)
    assert resolve_resume(out, "auto", SOLO) == third


# ----------------------------------------------------------------------------- training runs

@pytest.mark.slow
@pytest.mark.parametrize("leave, where", [
    (0, "metrics.jsonl"),      # not even the first metrics line fits
    (64 << 10, "ckpt"),        # the metrics fit, the 400 kB checkpoint at the end does not
])
def test_training_onto_a_full_disk(small_disk, tmp_path: Path, shakespeare_bytes: Path, leave: int,
                                   where: str):
    disk = small_disk("4m")
    out = disk / "out"
    out.mkdir()
    cfg = tiny_config(tmp_path, shakespeare_bytes, out_dir=str(out))
    fill(disk, leave=leave)
    r = run_cli("train", "--config", str(cfg), timeout=120)
    message = one_error_line(r, "distgpt.train")
    assert message.startswith(f"{out / where}") and message.endswith(f": {FULL}"), message
    assert "Traceback" not in r.stderr and not list((out / "ckpt").glob("step_*"))


@pytest.mark.slow
def test_resume_onto_a_full_disk_keeps_the_checkpoints(small_disk, tmp_path: Path, shakespeare_bytes: Path):
    disk = small_disk("8m")
    out = disk / "out"
    cfg = tiny_config(tmp_path, shakespeare_bytes, out_dir=str(out), checkpoint={"every": 2})
    r = run_cli("train", "--config", str(cfg), "train.max_steps=4", timeout=120)
    assert r.returncode == 0, r.stderr
    before = snapshot(out)
    expected = {"ckpt/step_0000002/manifest.json", "ckpt/step_0000004/manifest.json", "metrics.jsonl"}
    assert expected <= set(before)

    # today's failure: resuming rewrites metrics.jsonl (dropping records past the checkpoint) first
    fill(disk, leave=0)
    r = run_cli("train", "--config", str(cfg), "train.max_steps=6", "--resume", "auto", timeout=120)
    assert one_error_line(r, "distgpt.train") == f"{out / 'metrics.jsonl'}: {FULL}"
    assert "Traceback" not in r.stderr

    assert snapshot(out) == before
    assert resolve_resume(out, "auto", SOLO) == out / "ckpt" / "step_0000004"
    validate(out / "ckpt" / "step_0000002")
