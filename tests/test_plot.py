"""python -m distgpt.plot on metrics files: a valid PNG of the requested size, several runs, clear errors."""

from __future__ import annotations

import json
import struct

from conftest import run_cli


def _metrics(folder, scale):
    folder.mkdir(parents=True)
    rows = [{"step": s, "train_loss": scale * 5.0 / s, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1000.0,
             "tokens": 512 * s, **({"val_loss": scale * 5.5 / s} if s % 5 == 0 else {})}
            for s in range(1, 21)]
    rows.insert(0, {"step": 0, "val_loss": scale * 6.0, "tokens": 0, "time_s": 0.0})   # as train writes it
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_writes_a_png_comparing_runs(tmp_path):
    _metrics(tmp_path / "a", 1.0)
    _metrics(tmp_path / "b", 1.2)
    r = run_cli("plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp.png"))
    assert r.returncode == 0, r.stderr
    png = (tmp_path / "cmp.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == (1200, 900)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "cmp.png"]  # no temp file left


def test_plot_of_a_folder_without_metrics_is_one_line(tmp_path):
    r = run_cli("plot", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip() == f"plot: error: {tmp_path / 'metrics.jsonl'} does not exist " \
                               f"(is {tmp_path} a training out_dir?)"
