"""The README's main command, end to end on a reduced size: prepare the offline corpus, train on every
core through launch/local.sh (mpirun), sample, plot."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import read_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.mpi
def test_quickstart_pipeline_end_to_end(tmp_path):
    env = {**os.environ, "QUICKSTART_DIR": str(tmp_path), "DISTGPT_SKIP_INSTALL": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(ROOT / "launch" / "quickstart.sh"), "train.max_steps=40",
                        "train.eval_every=20", "train.log_every=10", "train.sample_every=40",
                        "checkpoint.every=20"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "out" / "quickstart"
    rows = read_metrics(out)
    assert rows[-1]["step"] == 40
    train = [row for row in rows if "train_loss" in row]
    assert train[-1]["train_loss"] < train[0]["train_loss"] - 1.0        # visibly falling
    assert f"ranks: {len(os.sched_getaffinity(0))}" in r.stdout           # every core: one rank each
    assert "sample at step 40:" in r.stdout and "--- a sample from the trained model:" in r.stdout
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1200, 900)
    assert "quickstart: done in" in r.stdout
