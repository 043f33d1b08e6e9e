"""Loss curves from metrics.jsonl: `python -m distgpt.plot OUT_DIR [OUT_DIR ...] [--out loss.png]`.

Four panels: train and val loss against steps and against tokens, the learning rate, and throughput.
Several runs share the axes, one colour each, for comparison. Needs matplotlib (`pip install distgpt[plot]`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distgpt.cli import add_version, prog_name
from distgpt.fileio import DiskFullError, atomic_write


def read_metrics(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is {out_dir} a training out_dir?)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path} line {n}: not valid JSON") from None
    if not rows:
        raise ValueError(f"{path} has no records yet")
    return rows


def plot(out_dirs: list[Path], out: Path, width: int = 1200, height: int = 900) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: works on a headless cluster node
    import matplotlib.pyplot as plt

    dpi = 100
    fig, axes = plt.subplots(2, 2, figsize=(width / dpi, height / dpi), dpi=dpi)
    (ax_step, ax_tok), (ax_lr, ax_tps) = axes
    for i, run in enumerate(out_dirs):
        rows = read_metrics(run)
        colour = f"C{i}"
        label = run.name or str(run)
        val = [(r["step"], r.get("tokens", r["step"]), r["val_loss"]) for r in rows if "val_loss" in r]
        rows = [r for r in rows if "train_loss" in r]   # not the step-0 record, which has only val_loss
        steps = [r["step"] for r in rows]
        tokens = [r.get("tokens", r["step"]) for r in rows]
        loss = [r["train_loss"] for r in rows]
        ax_step.plot(steps, loss, color=colour, label=f"{label} train")
        ax_tok.plot(tokens, loss, color=colour, label=f"{label} train")
        if val:
            ax_step.plot([v[0] for v in val], [v[2] for v in val], "o--", color=colour, label=f"{label} val")
            ax_tok.plot([v[1] for v in val], [v[2] for v in val], "o--", color=colour, label=f"{label} val")
        ax_lr.plot(steps, [r["lr"] for r in rows], color=colour, label=label)
        ax_tps.plot(steps, [r["tokens_per_s"] for r in rows], color=colour, label=label)
    for ax, xlabel, ylabel in ((ax_step, "step", "loss"), (ax_tok, "tokens", "loss"),
                               (ax_lr, "step", "learning rate"), (ax_tps, "step", "tokens/s")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_write(out) as f:  # a viewer refreshing the PNG never sees half of one
            fig.savefig(f, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog_name("plot"), description=__doc__.splitlines()[0])
    add_version(parser)
    parser.add_argument("out_dirs", nargs="+", type=Path, help="training output folders (with metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="PNG to write (default: FIRST_OUT_DIR/loss.png)")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plot: error: matplotlib is not installed: pip install 'distgpt[plot]'", file=sys.stderr)
        return 2
    try:
        path = plot(args.out_dirs, args.out or args.out_dirs[0] / "loss.png")
    except (FileNotFoundError, ValueError, KeyError, DiskFullError) as e:
        print(f"plot: error: {e}", file=sys.stderr)
        return 2
    print(f"plot: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
