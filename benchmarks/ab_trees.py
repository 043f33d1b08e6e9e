"""Two distgpt checkouts, the same benchmark, alternated: is a change faster or slower?

    git worktree add /tmp/before <commit>
    python benchmarks/ab_trees.py /tmp/before . --config small,gpt2-t256 --rounds 3

Each round runs every tree's own benchmarks/bench_train.py (that tree's code on PYTHONPATH) once
per config, trees alternating (A B A B ...), so a machine whose speed drifts over minutes affects
both alike. Prints each (config, layout)'s median tokens/s per tree and the ratio B / A. Arguments
after `--` go to bench_train.py (e.g. `-- --layouts 2x1 --steps 8`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path


def layout_key(run: dict) -> str:
    """RxT and precision: the same row in trees whose bench_train labels it differently (older
    ones say "2x1", newer "2x1 fp32")."""
    return f"{run['ranks']}x{run['threads']} {run.get('precision', 'fp32')}"


def run_bench(tree: Path, config: str, extra: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    script = tree / "benchmarks" / "bench_train.py"
    cmd = [sys.executable, str(script), "--config", config, "--json", str(out), *extra]
    r = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{tree}: bench_train.py failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return json.loads(out.read_text())


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tree_a", type=Path, help="the baseline checkout")
    ap.add_argument("tree_b", type=Path, help="the changed checkout")
    ap.add_argument("--config", default="small", help="comma-separated bench_train configs")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    trees = {"A": args.tree_a.resolve(), "B": args.tree_b.resolve()}
    speeds: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for config in args.config.split(","):
                for name, tree in trees.items():
                    result = run_bench(tree, config, extra, Path(tmp) / f"{name}.json")
                    for run in result["configs"][config]["runs"]:
                        if run["impl"] == "distgpt" and "error" not in run:
                            speeds[(config, layout_key(run), name)].append(run["tokens_per_s"])
                    got = {k[1]: round(v[-1]) for k, v in speeds.items() if k[0] == config and k[2] == name}
                    print(f"round {rnd + 1} {config} {name}: {got} tok/s", flush=True)
    print(f"\nA = {trees['A']}\nB = {trees['B']}\n")
    print(f"{'config':12s} {'layout':8s} {'A tok/s':>9s} {'B tok/s':>9s} {'B / A':>7s}  (medians of "
          f"{args.rounds} alternated rounds)")
    for config, label in sorted({(c, lab) for c, lab, _ in speeds}):
        a = statistics.median(speeds[(config, label, "A")])
        b = statistics.median(speeds[(config, label, "B")])
        print(f"{config:12s} {label:10s} {a:9.0f} {b:9.0f} {b / a:7.3f}")


if __name__ == "__main__":
    main()
