"""DiLoCo against synchronous data parallelism at equal tokens: final val loss on Tiny Shakespeare.

    python benchmarks/bench_diloco_convergence.py --out DIR [--workers 2,4] [--baselines 2,4]
        [--inner-steps 10,50,200] [--outer-lrs 0.5,0.7,1.0] [--steps 2000] [--seed 1337]
        [--eval-every 200] [--eval-steps 20] [--weight-decay 0.1] [--corpus PATH] [--set KEY=VALUE ...]
        [--rerun]

The recipe is nanoGPT's CPU run of shakespeare_char (its README: 4 layers, 4 heads, 128 wide, block
64, batch 12, 2000 iterations, lr 1e-3 cosine to 1e-4 over the whole run, warmup 100, beta2 0.99,
dropout 0; its defaults: weight decay 0.1, grad clip 1.0), here on bytes (vocab 257) and in fp32
(train.precision pinned: the same arithmetic on every CPU). Every run is `distgpt.train` under
`mpirun -n W -genv MPIR_CVAR_NUM_CLIQUES W`: MPICH's fake nodes, so W ranks are W nodes of one rank
each (one DiLoCo worker each); the script checks that the run's header says so. The global batch of
12 sequences is split over the W ranks (micro-batch 12 / W, no accumulation), so every configuration
trains on the same tokens: the synchronous baseline (parallel.sync=step, same launch) and DiLoCo
(parallel.sync=diloco) for every (W, inner_steps H, outer_lr), outer momentum 0.9, Nesterov.

Evaluation: val loss over a fixed set of eval_steps x 12 windows of 64 tokens (20 x 12 = 240, as
nanoGPT's eval_iters=20 at batch 12) at step 0, every eval_every steps and at the end. Under DiLoCo
the workers' parameters agree only right after an outer sync (every H steps and at the last step),
so the final val loss is the global model's; so is every curve point at a step that H divides (the
default eval_every 200 is a multiple of every default H). A point between syncs is the mean over
the workers' own (different) models, each on its share of the windows; the table marks those.

Everything goes under --out (refused inside this repository): data/ (the byte shards, prepared once),
runs/NAME/ (each run's out_dir: metrics.jsonl, the final checkpoint, the log, result.json),
results.json and results.md (rewritten after every run, so a stopped grid keeps what it finished).
A run whose result.json holds the same command and recipe is not run again unless --rerun. Runs go one after
another (the cores are shared; fake nodes give convergence, not speed: the wall times are a
by-product). Exit code 0 when every run finished, 1 when one failed (its command and error tail are
in the results), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from distgpt.cpu import this_cpu

REPO = Path(__file__).resolve().parents[1]
MPIRUN = Path(sys.executable).parent / "mpirun"
BATCH = 12
PRECISION = "fp32"
TARGETS = {2: 0.015, 4: 0.03}   # issue 23: DiLoCo's final val loss within +1.5% (2 workers), +3% (4)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")

RECIPE = {
    "model": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "vocab_size": 257,
              "vocab_multiple": 1, "dropout": 0.0},
    "train": {"batch_size": BATCH, "seq_len": 64, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 100,
              "beta1": 0.9, "beta2": 0.99, "grad_clip": 1.0, "precision": PRECISION, "sample_every": 0},
    "checkpoint": {"every": 0, "keep": 1},
}


def csv(kind: type, text: str) -> list:
    return [kind(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for data, runs and results (outside the repo)")
    p.add_argument("--workers", default="2,4", help="DiLoCo worker counts (= MPI nodes = ranks)")
    p.add_argument("--baselines", default=None,
                   help="rank counts of the synchronous baseline (default: --workers); each DiLoCo W is "
                        "compared with the baseline on W ranks, or the first baseline if that is not run")
    p.add_argument("--inner-steps", default="10,50,200", help="parallel.diloco.inner_steps values")
    p.add_argument("--outer-lrs", default="0.5,0.7,1.0", help="parallel.diloco.outer_lr values")
    p.add_argument("--outer-momentum", type=float, default=0.9)
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--steps", type=int, default=2000, help="train.max_steps (default 2000)")
    p.add_argument("--seed", type=int, default=1337, help="train.seed (init and data order)")
    p.add_argument("--eval-every", type=int, default=200, help="train.eval_every (default 200)")
    p.add_argument("--eval-steps", type=int, default=20,
                   help="train.eval_steps: val windows = this x 12 (default 20)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="train.weight_decay (nanoGPT's 0.1)")
    p.add_argument("--corpus", help="a local Tiny Shakespeare input.txt (default: $DISTGPT_TINYSHAKESPEARE, "
                                    "else ../shared/data/tinyshakespeare/input.txt, else prepare downloads)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra distgpt.train override for every run (e.g. parallel.check_every=0)")
    p.add_argument("--rerun", action="store_true", help="run again the runs that already have a result")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one run may take")
    args = p.parse_args(argv)
    try:
        args.workers = csv(int, args.workers)
        args.baselines = csv(int, args.baselines) if args.baselines is not None else list(args.workers)
        args.inner_steps = csv(int, args.inner_steps)
        args.outer_lrs = csv(float, args.outer_lrs)
    except ValueError as e:
        p.error(f"a comma-separated list of numbers was expected: {e}")
    for w in args.workers + args.baselines:
        if w < 1 or BATCH % w:
            p.error(f"{w} workers: the batch of {BATCH} sequences must divide over them (1, 2, 3, 4, 6, 12)")
    if any(h < 1 for h in args.inner_steps) or any(lr <= 0 for lr in args.outer_lrs) or args.steps < 1:
        p.error("--inner-steps and --steps must be >= 1, --outer-lrs > 0")
    if any("=" not in kv for kv in args.set):
        p.error(f"--set expects KEY=VALUE, got {[kv for kv in args.set if '=' not in kv]}")
    out = Path(args.out).resolve()
    if out == REPO or REPO in out.parents:
        p.error(f"--out {args.out} is inside the repository {REPO}: give a folder elsewhere (e.g. /tmp/...)")
    if out.exists() and not out.is_dir():
        p.error(f"--out {args.out} is a file, not a folder")
    args.out = out
    return args


# ----------------------------------------------------------------------------- data and runs

def default_corpus(given: str | None) -> Path | None:
    if given:
        return Path(given)
    env = os.environ.get("DISTGPT_TINYSHAKESPEARE")
    if env:
        return Path(env)
    shared = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
    return shared if shared.is_file() else None


def prepare_data(out: Path, corpus: Path | None) -> Path:
    """Byte-level Tiny Shakespeare shards in out/data (made once; prepare builds them aside and
    moves them in whole, so an existing manifest means a complete set)."""
    data = out / "data" / "shakespeare_bytes"
    if (data / "manifest.json").is_file():
        return data
    env = dict(os.environ)
    if corpus is not None:
        if not corpus.is_file():
            raise SystemExit(f"bench_diloco_convergence: --corpus {corpus}: no such file")
        env["DISTGPT_TINYSHAKESPEARE"] = str(corpus)
    cmd = [sys.executable, "-m", "distgpt.prepare", "--source", "tinyshakespeare", "--tokenizer", "bytes",
           "--out", str(data)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"bench_diloco_convergence: {' '.join(cmd)}: exit code {proc.returncode}\n"
                         f"{proc.stderr.strip()}")
    return data


def base_config(args: argparse.Namespace, data: Path) -> Path:
    """The recipe as a YAML file in --out; what differs between runs goes on the command line."""
    import yaml

    cfg = json.loads(json.dumps(RECIPE))
    cfg["data"] = {"train": str(data / "train_*.bin"), "val": str(data / "val_*.bin"), "tokenizer": "bytes"}
    cfg["train"].update(max_steps=args.steps, seed=args.seed, weight_decay=args.weight_decay,
                        eval_every=args.eval_every, eval_steps=args.eval_steps, log_every=log_every(args))
    cfg["parallel"] = {"threads_per_rank": 1}
    path = args.out / "recipe.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    tmp.replace(path)
    return path


def log_every(args: argparse.Namespace) -> int:
    """Log (and write metrics) at every outer sync of every H, and at every eval."""
    g = 0
    for h in args.inner_steps:
        g = math.gcd(g, h)
    return max(1, math.gcd(g, args.eval_every) if args.eval_every else g)


def cells(args: argparse.Namespace) -> list[dict]:
    """Every run of the grid, baselines first (each DiLoCo cell is read against one)."""
    out = [{"name": f"sync_w{w}", "workers": w, "sync": "step"} for w in args.baselines]
    for w in args.workers:
        for h in args.inner_steps:
            for lr in args.outer_lrs:
                out.append({"name": f"diloco_w{w}_h{h}_olr{lr:g}", "workers": w, "sync": "diloco",
                            "inner_steps": h, "outer_lr": lr})
    return out


def command(args: argparse.Namespace, cfg_path: Path, cell: dict, run_dir: Path) -> list[str]:
    w = cell["workers"]
    overrides = [f"train.micro_batch_size={BATCH // w}", f"out_dir={run_dir}",
                 f"parallel.sync={cell['sync']}"]
    if cell["sync"] == "diloco":
        overrides += [f"parallel.diloco.inner_steps={cell['inner_steps']}",
                      f"parallel.diloco.outer_lr={cell['outer_lr']:g}",
                      f"parallel.diloco.outer_momentum={args.outer_momentum:g}",
                      f"parallel.diloco.nesterov={str(args.nesterov).lower()}"]
    return [str(MPIRUN), "-n", str(w), "-genv", "MPIR_CVAR_NUM_CLIQUES", str(w),
            sys.executable, "-m", "distgpt.train", "--config", str(cfg_path), *overrides, *args.set]


HEADER_NODES = re.compile(r"ranks: (\d+) on (\d+) node\(s\), (\d+) per node")


def run_cell(args: argparse.Namespace, cfg_path: Path, cell: dict) -> dict:
    run_dir = args.out / "runs" / cell["name"]
    cmd = command(args, cfg_path, cell, run_dir)
    result_file = run_dir / "result.json"
    if result_file.is_file() and not args.rerun:
        old = json.loads(result_file.read_text())
        if old.get("command") == cmd and old.get("recipe") == cfg_path.read_text() and old.get("ok"):
            return {**old, "cached": True}
    run_dir.mkdir(parents=True, exist_ok=True)
    result_file.unlink(missing_ok=True)          # ours: a stale result must not outlive a new run
    fresh = not (run_dir / "metrics.jsonl").exists() and not (run_dir / "ckpt").exists()
    full = cmd + ([] if fresh else ["--overwrite"])   # removes only that earlier run's ckpt/ and metrics
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with open(run_dir / "stdout.log", "w") as fo, open(run_dir / "stderr.log", "w") as fe:
        try:
            proc = subprocess.run(full, env=env, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL,
                                  cwd=args.out, timeout=args.timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = time.perf_counter() - t0
    stdout = (run_dir / "stdout.log").read_text(errors="replace")
    stderr = (run_dir / "stderr.log").read_text(errors="replace")
    res: dict = {**cell, "command": cmd, "recipe": cfg_path.read_text(), "wall_s": round(wall, 1),
                 "exit_code": code, "ok": False}
    if code != 0:
        tail = (stderr.strip() or stdout.strip()).splitlines()[-15:]
        res["error"] = "\n".join(tail)
        return res
    m = HEADER_NODES.search(stdout)
    nodes = int(m.group(2)) if m else None
    res["header_nodes"] = nodes
    res["header"] = [ln for ln in stdout.splitlines()[:40]
                     if ln.startswith(("ranks:", "precision:", "gradient sum:", "optimizer:"))
                     or (("diloco" in ln.lower() or "outer" in ln.lower()) and not ln.startswith("memory"))]
    problems = []
    if nodes != cell["workers"]:
        problems.append(f"the header says {nodes} node(s), expected {cell['workers']} (MPICH fake nodes)")
    if f"precision: {PRECISION}" not in stdout:
        problems.append(f"the header does not say 'precision: {PRECISION}'")
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    curve = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    final = [v for s, v in curve if s == args.steps]
    if not final:
        stopped = re.search(r"^(.*(?:stop signal received|interrupted).*)$", stdout, re.M)
        problems.append(f"metrics.jsonl has no val loss at step {args.steps}"
                        + (f" (the run says: {stopped.group(1).strip()})" if stopped else ""))
    outer = [r for r in records if "outer_bytes" in r or "pseudo_grad_norm" in r]
    if cell["sync"] == "diloco":
        res["outer_syncs_logged"] = len(outer)
        res["outer_bytes_rank0"] = sum(r.get("outer_bytes", 0) for r in outer)
        res["outer_s_rank0"] = round(sum(r.get("outer_s", 0.0) for r in outer), 3)
        res["pseudo_grad_norms"] = [(r["step"], r["pseudo_grad_norm"])
                                    for r in outer if "pseudo_grad_norm" in r]
        expected = len({*range(cell["inner_steps"], args.steps + 1, cell["inner_steps"]), args.steps})
        res["outer_syncs_expected"] = expected
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    res.update(val_curve=curve, train_curve=train[:: max(1, len(train) // 40)] + train[-1:],
               final_val_loss=final[0] if final else None, problems=problems, ok=not problems)
    tmp = result_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(result_file)
    return res


# ----------------------------------------------------------------------------- report

def baseline_for(results: list[dict], workers: int) -> dict | None:
    base = {r["workers"]: r for r in results if r["sync"] == "step" and r.get("final_val_loss") is not None}
    return base.get(workers) or (next(iter(base.values())) if base else None)


def cpu_line() -> str:
    cpu = this_cpu()
    flags = [f for f in CPU_FLAGS if f in cpu.flags]
    return f"CPU: {cpu.model or 'unknown'} ({os.cpu_count()} cores here); flags: {', '.join(flags) or 'none'}"


def report(args: argparse.Namespace, results: list[dict]) -> str:
    lines = [f"# DiLoCo vs synchronous data parallelism, Tiny Shakespeare (bytes), {args.steps} steps", "",
             cpu_line(), f"precision: {PRECISION} (train.precision pinned; checked in every run's header)",
             f"recipe: 4 layers, 4 heads, 128 wide, block/seq_len 64, global batch {BATCH} sequences "
             f"({BATCH * 64:,} tokens/step), lr 1e-3 -> 1e-4 cosine, warmup 100, AdamW beta2 0.99, "
             f"weight decay {args.weight_decay:g}, grad clip 1.0, dropout 0, seed {args.seed}",
             f"eval: {args.eval_steps} x {BATCH} fixed val windows of 64 tokens, every {args.eval_every} "
             f"steps and at the end; DiLoCo: outer momentum {args.outer_momentum:g}, "
             f"nesterov {str(args.nesterov).lower()}; W workers = W MPICH fake nodes of 1 rank, "
             f"micro-batch {BATCH}/W", "",
             "| run | W | sync | H | outer lr | final val loss | vs sync baseline | target | meets | "
             "outer syncs | wall s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in results:
        loss = r.get("final_val_loss")
        base = baseline_for(results, r["workers"])
        if r["sync"] == "step":
            other = [b for b in results if b["sync"] == "step" and b is not r and b.get("final_val_loss")]
            rel = (f"{loss / other[0]['final_val_loss'] - 1:+.1e} vs W={other[0]['workers']}"
                   if loss is not None and other else "(reference)")
            target, meets = "", ""
        else:
            rel_v = loss / base["final_val_loss"] - 1 if loss is not None and base else None
            rel = f"{rel_v * 100:+.2f}%" + ("" if base and base["workers"] == r["workers"]
                                           else f" (vs W={base['workers']})" if base else "") \
                if rel_v is not None else "-"
            limit = TARGETS.get(r["workers"])
            target = f"+{limit * 100:g}%" if limit is not None else "-"
            meets = "-" if rel_v is None or limit is None else ("yes" if rel_v <= limit else "**no**")
        status = f"{loss:.4f}" if loss is not None else f"FAILED (exit {r.get('exit_code')})"
        if r.get("problems"):
            status += " (" + "; ".join(r["problems"]) + ")"
        syncs = (f"{r.get('outer_syncs_logged', '-')}/{r.get('outer_syncs_expected', '-')}"
                 if r["sync"] == "diloco" else f"{args.steps} (every step)")
        lines.append(f"| {r['name']} | {r['workers']} | {r['sync']} | {r.get('inner_steps', '')} | "
                     f"{r.get('outer_lr', '')} | {status} | {rel} | {target} | {meets} | {syncs} | "
                     f"{r.get('wall_s', '')} |")
    done = [r for r in results if r["sync"] == "diloco" and r.get("final_val_loss") is not None]
    for w in sorted({r["workers"] for r in done}):
        mine = [r for r in done if r["workers"] == w]
        base = baseline_for(results, w)
        if base and w in TARGETS:
            ok = sum(r["final_val_loss"] / base["final_val_loss"] - 1 <= TARGETS[w] for r in mine)
            lines.append(f"\n{w} workers: {ok} of {len(mine)} cells within +{TARGETS[w] * 100:g}% of the "
                         f"synchronous baseline on {base['workers']} ranks.")
    curves = [r for r in results if r.get("val_curve")]
    if curves:
        steps = sorted({s for r in curves for s, _ in r["val_curve"]})
        lines += ["", "Val loss curves (* = between outer syncs: the mean over the workers' own models, "
                      "each on its share of the windows; all other DiLoCo points are the global model):", "",
                  "| run | " + " | ".join(str(s) for s in steps) + " |",
                  "|---|" + "---:|" * len(steps)]
        for r in curves:
            at = dict(r["val_curve"])
            h = r.get("inner_steps")
            cells_ = [("-" if s not in at else f"{at[s]:.4f}"
                       + ("*" if h and s % h and s not in (0, args.steps) else "")) for s in steps]
            lines.append(f"| {r['name']} | " + " | ".join(cells_) + " |")
    failed = [r for r in results if not r.get("ok")]
    for r in failed:
        lines += ["", f"FAILED {r['name']}: `{' '.join(r['command'])}`", "```",
                  r.get("error") or "; ".join(r.get("problems", [])), "```"]
    return "\n".join(lines) + "\n"


def write_results(args: argparse.Namespace, results: list[dict]) -> str:
    text = report(args, results)
    meta = {"cpu": {"model": this_cpu().model, "vendor": this_cpu().vendor,
                    "flags": sorted(f for f in CPU_FLAGS if f in this_cpu().flags), "cores": os.cpu_count()},
            "precision": PRECISION, "steps": args.steps, "seed": args.seed, "batch": BATCH,
            "weight_decay": args.weight_decay, "eval_every": args.eval_every, "eval_steps": args.eval_steps,
            "outer_momentum": args.outer_momentum, "nesterov": args.nesterov, "targets": TARGETS,
            "extra_overrides": args.set}
    for name, body in (("results.json", json.dumps({"meta": meta, "runs": results}, indent=1)),
                       ("results.md", text)):
        tmp = args.out / (name + ".tmp")
        tmp.write_text(body)
        tmp.replace(args.out / name)
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not MPIRUN.exists():
        raise SystemExit(f"bench_diloco_convergence: no mpirun next to {sys.executable} (pip install mpich)")
    data = prepare_data(args.out, default_corpus(args.corpus))
    cfg_path = base_config(args, data)
    todo = cells(args)
    print(cpu_line(), f"| precision {PRECISION} | {len(todo)} runs into {args.out}", flush=True)
    results: list[dict] = []
    for i, cell in enumerate(todo, 1):
        res = run_cell(args, cfg_path, cell)
        results.append(res)
        loss = res.get("final_val_loss")
        print(f"[{i}/{len(todo)}] {cell['name']}: "
              + (f"val loss {loss:.4f}" if loss is not None else f"FAILED (exit {res.get('exit_code')})")
              + (" (cached)" if res.get("cached") else f", {res['wall_s']:.0f} s")
              + (f"; {'; '.join(res['problems'])}" if res.get("problems") else ""), flush=True)
        if res.get("error"):
            print("  " + " ".join(res["command"]) + "\n  " + res["error"].replace("\n", "\n  "), flush=True)
        write_results(args, results)
    print()
    print(write_results(args, results), end="")
    return 0 if all(r.get("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
