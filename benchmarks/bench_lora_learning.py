"""LoRA against full fine-tuning from the same distgpt-pretrained model: val loss curves on Tiny Shakespeare.

    python benchmarks/bench_lora_learning.py [--work DIR] [--shakespeare PATH] [--json PATH] [--md PATH]
        [--png PATH] [--pretrain-steps 1200] [--finetune-steps 400] [--eval-every 50] [--eval-steps 8]
        [--lora-rank 8] [--lora-alpha 16] [--lora-lr 4e-3,8e-3,1.6e-2] [--full-lr 1e-3,2e-3,4e-3]
        [--threads 2] [--seed 1337] [--keep] [--rerun]

One invocation, every step through distgpt's own commands (subprocesses, one rank, no mpirun):
1. `distgpt.prepare --source builtin --tokenizer bytes` (the standard library's source) and
   `distgpt.prepare --source SHAKESPEARE --tokenizer bytes` (one document, split by tokens: the last
   10% is val), into WORK/data; the same 257-token byte vocabulary, so the pretrained model reads
   Shakespeare as it is.
2. Pretrain configs/quickstart.yaml's model (4 layers, 4 heads, 128 wide, block 128, batch 16 x 128,
   lr 2e-3 -> 2e-4) for --pretrain-steps steps on the builtin corpus, into WORK/runs/pretrain.
3. From that out_dir (init_from: its final checkpoint), fine-tuning runs on Tiny Shakespeare with the
   same data order (seed), batch, steps, warmup and cosine schedule shape, evaluated on the same fixed
   val windows at step 0 (distgpt evaluates the starting model) and every --eval-every steps:
   (a) LoRA: lora.rank, alpha, all four targets (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj), the
       base frozen, one run per --lora-lr; (b) full fine-tuning, every parameter, one run per --full-lr.
   Each lr decays to a tenth of itself; weight decay 0 in all (configs/finetune_shakespeare.yaml's).
   Each method is shown at its best lr (the lowest final val loss), so that the comparison is not one
   method's lr against the other's; the report says when the best lr is at the edge of its grid (the
   grid should then be widened), and that the choice is made on the val set the curves are drawn on.
Everything runs with train.precision=fp32 pinned (the same arithmetic on every CPU; each run's header is
checked for it). The curves are read from each run's metrics.jsonl; the trainable-parameter counts from
the runs' headers; wall time is the whole command (start-up, evals, checkpoint), train time the
run's own time_s (both depend on what else the machine runs). Every run's step-0 val loss is the same
model's (LoRA's B starts at zero), so they must agree; the report says by how much. The --png is
distgpt.plot's four panels of the two best runs.

Prints a markdown report (the curves of the two best runs: step, LoRA val loss, full FT val loss; the
final val loss of every lr), writes it to --md and everything to --json. WORK defaults to a temporary
folder, removed at the end unless --keep. A given --work is kept, and a second invocation continues
where the first stopped: a finished command (prepare or train) whose command line and config are
unchanged is not run again (its record, NAME.done.json next to its output, is written once it has
exited 0; a new pretraining makes every fine-tuning run stale; --rerun runs everything again).
Exit code 0 when everything ran and checked out, 1 otherwise (the problems are listed), 2 on bad
arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distgpt.cpu import this_cpu

REPO = Path(__file__).resolve().parents[1]
PRECISION = "fp32"
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
# quickstart.yaml's model; the fine-tuning runs name it too, so that a checkpoint of another shape
# is refused by distgpt's own check rather than silently fine-tuned
MODEL = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128, "vocab_size": 257, "vocab_multiple": 1,
         "dropout": 0.0}
BATCH, MICRO, SEQ = 16, 8, 128
# the step-0 losses are one model on one val set: with B = 0 the adapters add exact zeros, so only a
# change in how the base's matmuls are called (LoRA's path vs the full model's) could move them, and
# fp32 summation-order differences in a mean over 16k tokens stay far below this
STEP0_RTOL = 1e-5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", help="folder for data and runs (default: a temporary folder)")
    p.add_argument("--shakespeare", default=str(SHAKESPEARE),
                   help="Tiny Shakespeare's input.txt (default ../shared/data/tinyshakespeare/input.txt)")
    p.add_argument("--json", help="write every number here (JSON)")
    p.add_argument("--md", help="write the markdown report here")
    p.add_argument("--png", help="distgpt.plot's curves of both fine-tuning runs here (needs matplotlib)")
    p.add_argument("--pretrain-steps", type=int, default=1200)
    p.add_argument("--finetune-steps", type=int, default=400)
    p.add_argument("--warmup", type=int, default=20, help="fine-tuning warmup steps (both runs)")
    p.add_argument("--eval-every", type=int, default=50, help="fine-tuning eval interval (steps)")
    p.add_argument("--eval-steps", type=int, default=8,
                   help=f"train.eval_steps: val windows = this x {BATCH} sequences of {SEQ} tokens")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-lr", default="4e-3,8e-3,1.6e-2", help="LoRA learning rates, one run each")
    p.add_argument("--full-lr", default="1e-3,2e-3,4e-3", help="full fine-tuning lrs, one run each")
    p.add_argument("--threads", type=int, default=2, help="parallel.threads_per_rank (one rank)")
    p.add_argument("--seed", type=int, default=1337, help="train.seed: init, data order, LoRA's A")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    p.add_argument("--rerun", action="store_true", help="run again the finished runs of a given --work")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one command may take")
    args = p.parse_args(argv)
    for name in ("pretrain_steps", "finetune_steps", "eval_every", "eval_steps", "lora_rank", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an integer >= 1")
    if args.warmup < 0 or args.warmup >= args.finetune_steps:
        p.error(f"--warmup {args.warmup}: expected 0 <= warmup < --finetune-steps {args.finetune_steps}")
    if not args.lora_alpha > 0:
        p.error(f"--lora-alpha {args.lora_alpha}: expected a number > 0")
    for name in ("lora_lr", "full_lr"):
        text = getattr(args, name)
        try:
            lrs = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            lrs = []
        if not lrs or any(not lr > 0 for lr in lrs) or len(set(lrs)) < len(lrs):
            p.error(f"--{name.replace('_', '-')} {text}: expected distinct numbers > 0, comma-separated")
        setattr(args, name, sorted(lrs))
    if not Path(args.shakespeare).is_file():
        p.error(f"--shakespeare {args.shakespeare}: no such file (Tiny Shakespeare's input.txt)")
    if args.work is not None:
        work = Path(args.work).resolve()
        if work == REPO or REPO in work.parents:
            p.error(f"--work {args.work} is inside the repository {REPO}: give a folder elsewhere")
        if work.exists() and not work.is_dir():
            p.error(f"--work {args.work} is a file, not a folder")
    return args


# ----------------------------------------------------------------------------- commands

class CommandFailed(RuntimeError):
    pass


def run(cmd: list[str], log: Path, timeout: float) -> tuple[str, float]:
    """Run one distgpt command with its output in `log`; (stdout, wall seconds). A failure raises
    CommandFailed with the command and the tail of its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("DISTGPT_TINYSHAKESPEARE", None)    # the source is always named on the command line
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                  cwd=REPO, timeout=timeout)
            code: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            code = f"timeout after {timeout:g} s"
    wall = time.perf_counter() - t0
    out = log.read_text(errors="replace")
    if code != 0:
        tail = "\n".join(out.strip().splitlines()[-15:])
        raise CommandFailed(f"{' '.join(cmd)}: exit code {code} (log {log})\n{tail}")
    return out, wall


def run_once(cmd: list[str], log: Path, timeout: float, done: Path, key: dict,
             rerun: bool) -> tuple[str, float, bool]:
    """run() and False, unless `done` records this command and key (the run finished before in this
    work folder): then its output and wall time from that record, and True. The record is written
    after the run exits 0 and removed before it starts: it never describes a run that did not finish."""
    key = {"command": cmd, **key}
    if done.is_file() and not rerun:
        old = json.loads(done.read_text())
        if old.get("key") == key:
            return old["stdout"], old["wall_s"], True
    done.unlink(missing_ok=True)
    stdout, wall = run(cmd, log, timeout)
    write_atomic(done, json.dumps({"key": key, "stdout": stdout, "wall_s": wall}))
    return stdout, wall, False


def prepare(source: str, out: Path, logs: Path, timeout: float, rerun: bool) -> Path:
    """Byte shards of `source` in `out` (prepare moves its files in whole, manifest last)."""
    run_once([sys.executable, "-m", "distgpt.prepare", "--source", source, "--tokenizer", "bytes",
              "--out", str(out)], logs / f"prepare_{out.name}.log", timeout, done_path(out), {},
             rerun or not (out / "manifest.json").is_file())
    return out


def done_path(out: Path) -> Path:
    return out.parent / f"{out.name}.done.json"


def done_record(out: Path) -> str:
    return done_path(out).read_text()


def tokens_per_split(data: Path) -> dict[str, int]:
    shards = json.loads((data / "manifest.json").read_text())["shards"]
    return {split: sum(e["n_tokens"] for e in shards if e["split"] == split) for split in ("train", "val")}


def write_yaml(path: Path, doc: dict) -> Path:
    import yaml

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(path)
    return path


def data_section(data: Path) -> dict:
    return {"train": str(data / "train_*.bin"), "val": str(data / "val_*.bin"), "tokenizer": "bytes"}


def pretrain_command(args: argparse.Namespace, data: Path, out_dir: Path) -> list[str]:
    """configs/quickstart.yaml as it is, on our data, for fewer steps, fp32, one rank, no samples."""
    d = data_section(data)
    return [sys.executable, "-m", "distgpt.train", "--config", str(REPO / "configs" / "quickstart.yaml"),
            f"data.train={d['train']}", f"data.val={d['val']}", f"train.max_steps={args.pretrain_steps}",
            f"train.precision={PRECISION}", f"train.seed={args.seed}", "train.sample_every=0",
            "checkpoint.every=0", "checkpoint.keep=1", f"parallel.threads_per_rank={args.threads}",
            f"out_dir={out_dir}", "overwrite_out_dir=true"]


def finetune_config(args: argparse.Namespace, data: Path, base: Path, path: Path) -> Path:
    """What the two fine-tuning runs share; lr and lora.rank go on their command lines."""
    return write_yaml(path, {
        "init_from": str(base),
        "model": MODEL,
        "data": data_section(data),
        "train": {"batch_size": BATCH, "micro_batch_size": MICRO, "seq_len": SEQ,
                  "max_steps": args.finetune_steps, "warmup_steps": args.warmup, "weight_decay": 0.0,
                  "grad_clip": 1.0, "seed": args.seed, "eval_every": args.eval_every,
                  "eval_steps": args.eval_steps, "log_every": 10, "sample_every": 0, "precision": PRECISION},
        "checkpoint": {"every": 0, "keep": 1},
        "parallel": {"threads_per_rank": args.threads},
    })


def finetune_command(cfg: Path, out_dir: Path, lr: float, lora: tuple[int, float] | None) -> list[str]:
    cmd = [sys.executable, "-m", "distgpt.train", "--config", str(cfg), f"train.lr={lr:g}",
           f"train.min_lr={lr / 10:g}", f"out_dir={out_dir}", "overwrite_out_dir=true"]
    if lora is not None:
        cmd += [f"lora.rank={lora[0]}", f"lora.alpha={lora[1]:g}",
                "lora.targets=[" + ", ".join(TARGETS) + "]"]
    return cmd


# ----------------------------------------------------------------------------- reading a run

PARAMS = re.compile(r"^parameters: ([\d,]+)", re.M)
LORA_PARAMS = re.compile(r"^LoRA: .*?: ([\d,]+) trainable parameters", re.M)


def read_run(name: str, cmd: list[str], stdout: str, wall: float, out_dir: Path) -> dict:
    records = [json.loads(ln) for ln in (out_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    total = PARAMS.search(stdout)
    lora = LORA_PARAMS.search(stdout)
    n_total = int(total.group(1).replace(",", "")) if total else None
    trained = [r for r in records if "ms_per_step" in r]
    res = {
        "name": name, "command": cmd, "out_dir": str(out_dir),
        "params_total": n_total,
        "params_trainable": int(lora.group(1).replace(",", "")) if lora else n_total,
        "val_curve": [[r["step"], r["val_loss"]] for r in records if "val_loss" in r],
        "train_curve": [[r["step"], r["train_loss"]] for r in records if "train_loss" in r],
        "wall_s": round(wall, 1),
        "train_s": round(records[-1].get("time_s", 0.0), 1) if records else None,
        # the first step compiles and warms up: the median of the logged steps is the steady rate
        "ms_per_step_median": (round(sorted(r["ms_per_step"] for r in trained)[len(trained) // 2], 1)
                               if trained else None),
        "header": [ln for ln in stdout.splitlines()[:25]
                   if ln.startswith(("model:", "parameters:", "LoRA:", "batch:", "optimizer:", "ranks:",
                                     "precision:", "matmuls:", "frozen base:"))],
        "problems": [],
    }
    if f"precision: {PRECISION}" not in stdout:
        res["problems"].append(f"{name}: the run's header does not say 'precision: {PRECISION}'")
    if not res["val_curve"] or res["val_curve"][0][0] != 0:
        res["problems"].append(f"{name}: metrics.jsonl has no step-0 val loss")
    return res


def sample(ckpt: Path, prompt: str, seed: int, log: Path, timeout: float) -> str:
    out, _ = run([sys.executable, "-m", "distgpt.sample", "--ckpt", str(ckpt), "--prompt", prompt,
                  "--max-new-tokens", "200", "--temperature", "0.8", "--top-k", "40", "--seed", str(seed)],
                 log, timeout)
    # the last line is sample's speed ("[N tokens in T s, ...]"): not part of the text
    return re.sub(r"\n?\[\d+ tokens in [^\]]*\]\s*$", "", out.strip())


# ----------------------------------------------------------------------------- report

def cpu_info() -> dict:
    cpu = this_cpu()
    return {"model": cpu.model or "unknown", "vendor": cpu.vendor, "cores": os.cpu_count(),
            "flags": [f for f in CPU_FLAGS if f in cpu.flags]}


def final_loss(r: dict) -> float:
    return r["val_curve"][-1][1]


def best_of(runs: list[dict]) -> dict:
    return min(runs, key=final_loss)


def report(args: argparse.Namespace, res: dict) -> str:
    cpu, pre, runs = res["cpu"], res["pretrain"], res["runs"]
    lora, full = res["best"]["lora"], res["best"]["full"]
    pre_val = pre["val_curve"]
    lines = [
        "# LoRA vs full fine-tuning from a distgpt-pretrained model (Tiny Shakespeare, bytes)", "",
        f"CPU: {cpu['model']} ({cpu['cores']} cores); flags: {', '.join(cpu['flags']) or 'none'}; "
        f"precision {PRECISION} (train.precision pinned, checked in every run's header); 1 rank, "
        f"{args.threads} threads",
        f"pretrain: configs/quickstart.yaml's model (4 layers, 4 heads, 128 wide, block 128, "
        f"{pre['params_total']:,} parameters), {args.pretrain_steps} steps of {BATCH} x {SEQ} bytes of the "
        f"builtin corpus (the standard library's source), lr 2e-3 -> 2e-4: val loss {pre_val[0][1]:.4f} -> "
        f"{pre_val[-1][1]:.4f}, {pre['wall_s']:.0f} s",
        f"fine-tuning (every run): {args.finetune_steps} steps of {BATCH} x {SEQ} bytes of Tiny Shakespeare, "
        f"the same data order (seed {args.seed}), warmup {args.warmup}, cosine to lr/10, weight decay 0, "
        f"clip 1.0; val loss on the same {args.eval_steps * BATCH} windows of {SEQ} bytes (the last 10% of "
        f"the text) at step 0 and every {args.eval_every} steps. LoRA: rank {args.lora_rank}, alpha "
        f"{args.lora_alpha:g}, on {', '.join(TARGETS)}.",
        "", f"Val loss, each method at its best lr (LoRA lr {lora['lr']:g}, full fine-tuning lr "
            f"{full['lr']:g}):",
        "", "| step | LoRA val loss | full FT val loss |", "|---:|---:|---:|"]
    a, b = dict(map(tuple, lora["val_curve"])), dict(map(tuple, full["val_curve"]))
    for s in sorted(set(a) | set(b)):
        lines.append(f"| {s} | " + " | ".join(f"{d[s]:.4f}" if s in d else "-" for d in (a, b)) + " |")
    lines += ["", "Every run (wall: the whole command; train: the run's time_s; ms/step: median of the "
                  "logged steps; times depend on what else the machine was running):", "",
              "| method | lr | trainable parameters | final val loss | wall s | train s | ms/step |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        mark = " (best)" if r is lora or r is full else ""
        share = f" ({r['params_trainable'] / r['params_total']:.2%})" if r["method"] == "lora" else ""
        lines.append(f"| {r['method']} | {r['lr']:g}{mark} | {r['params_trainable']:,}{share} | "
                     f"{final_loss(r):.4f} | {r['wall_s']:.0f} | {r['train_s']:.0f} | "
                     f"{r['ms_per_step_median']:.0f} |")
    lines += ["", f"Step 0 is the pretrained model in every run: val loss {a[0]:.6f} (largest relative "
                  f"difference between runs {res['step0_relative_spread']:.1e}). The best lr is chosen on "
                  "the val set the curves are drawn on (no separate test split)."]
    for method, grid, best in (("LoRA", args.lora_lr, lora), ("full fine-tuning", args.full_lr, full)):
        if len(grid) > 1 and best["lr"] in (grid[0], grid[-1]):
            lines.append(f"{method}'s best lr {best['lr']:g} is at the edge of its grid {grid}: a wider grid "
                         "might do better.")
    for name, r in (("LoRA", lora), ("full fine-tuning", full)):
        if r.get("sample"):
            lines += ["", f"{name} (lr {r['lr']:g}), a sample (`distgpt.sample --prompt 'ROMEO:' "
                          "--temperature 0.8 --top-k 40`):", "```", r["sample"], "```"]
    if res["problems"]:
        lines += ["", "PROBLEMS:"] + [f"- {p}" for p in res["problems"]]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def plot(runs: list[Path], png: Path, log: Path, timeout: float) -> str | None:
    """distgpt.plot's panels of the runs into png; None, or why not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install distgpt[plot]): no PNG"
    png.parent.mkdir(parents=True, exist_ok=True)
    try:
        run([sys.executable, "-m", "distgpt.plot", *map(str, runs), "--out", str(png)], log, timeout)
    except CommandFailed as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    temporary = args.work is None
    work = Path(tempfile.mkdtemp(prefix="distgpt-lora-learning-")) if temporary else Path(args.work).resolve()
    logs, runs = work / "logs", work / "runs"
    for d in (logs, runs):
        d.mkdir(parents=True, exist_ok=True)
    grid = [("lora", lr) for lr in args.lora_lr] + [("full", lr) for lr in args.full_lr]
    print(f"work folder: {work}; pretraining, then {len(grid)} fine-tuning runs", flush=True)
    res: dict = {"cpu": cpu_info(), "precision": PRECISION, "args": vars(args), "problems": [], "runs": []}
    code = 1
    try:
        t0 = time.perf_counter()
        builtin = prepare("builtin", work / "data" / "builtin", logs, args.timeout, args.rerun)
        shakes = prepare(str(Path(args.shakespeare).resolve()), work / "data" / "shakespeare", logs,
                         args.timeout, args.rerun)
        res["data"] = {"builtin": tokens_per_split(builtin), "shakespeare": tokens_per_split(shakes)}
        print(f"data prepared ({time.perf_counter() - t0:.0f} s)", flush=True)

        out = runs / "pretrain"
        cmd = pretrain_command(args, builtin, out)
        # the keys hold the records of what a run reads: new data or a new base make it stale
        key = {"data": done_record(builtin)}
        stdout, wall, reused = run_once(cmd, logs / "pretrain.log", args.timeout, done_path(out), key,
                                        args.rerun or not (out / "metrics.jsonl").is_file())
        res["pretrain"] = pre = read_run("pretrain", cmd, stdout, wall, out)
        pre["reused"] = reused
        v = pre["val_curve"]
        print(f"pretrain: val loss {v[0][1]:.4f} -> {v[-1][1]:.4f} in {wall:.0f} s"
              + (" (finished before)" if reused else ""), flush=True)
        res["problems"] += pre["problems"]
        # the pretrained model must have learnt something before fine-tuning means anything: from the
        # uniform 5.55 nats a byte model halves its loss within a few hundred steps of this recipe
        if v[-1][1] > 0.5 * v[0][1]:
            res["problems"].append(f"pretrain: val loss only {v[0][1]:.4f} -> {v[-1][1]:.4f}")

        cfg = finetune_config(args, shakes, out, work / "finetune.yaml")
        for i, (method, lr) in enumerate(grid, 1):
            name = f"{method}_lr{lr:g}"
            run_dir = runs / name
            lora = (args.lora_rank, args.lora_alpha) if method == "lora" else None
            cmd = finetune_command(cfg, run_dir, lr, lora)
            key = {"config": cfg.read_text(), "data": done_record(shakes), "base": done_record(out)}
            stdout, wall, reused = run_once(cmd, logs / f"{name}.log", args.timeout, done_path(run_dir), key,
                                            args.rerun or not (run_dir / "metrics.jsonl").is_file())
            r = read_run(name, cmd, stdout, wall, run_dir)
            r.update(method=method, lr=lr, reused=reused)
            if lora and f"frozen base: {out}" not in stdout:
                r["problems"].append(f"{name}: the header does not name {out} as the frozen base")
            res["runs"].append(r)
            res["problems"] += r["problems"]
            v = r["val_curve"]
            print(f"[{i}/{len(grid)}] {name}: val loss {v[0][1]:.4f} -> {v[-1][1]:.4f} in {wall:.0f} s"
                  + (" (finished before)" if reused else ""), flush=True)
        firsts = [r["val_curve"][0][1] for r in res["runs"]]
        res["step0_relative_spread"] = (max(firsts) - min(firsts)) / min(firsts)
        if res["step0_relative_spread"] > STEP0_RTOL:
            res["problems"].append(f"step 0: the runs' val losses {firsts} are one model's but differ by "
                                   f"more than {STEP0_RTOL:g} relative")
        best = {m: best_of([r for r in res["runs"] if r["method"] == m]) for m in ("lora", "full")}
        res["best"] = {m: r["name"] for m, r in best.items()}
        for m, r in best.items():
            r["sample"] = sample(Path(r["out_dir"]), "ROMEO:", args.seed, logs / f"sample_{m}.log",
                                 args.timeout)
        if args.png:
            why = plot([Path(best["lora"]["out_dir"]), Path(best["full"]["out_dir"])], Path(args.png),
                       logs / "plot.log", args.timeout)
            res["png"] = None if why else str(Path(args.png).resolve())
            if why:
                print(f"no plot: {why}", flush=True)
        text = report(args, {**res, "best": best})
        print("\n" + text, end="")
        if args.md:
            write_atomic(Path(args.md), text)
        code = 0 if not res["problems"] else 1
    except CommandFailed as e:
        res["problems"].append(str(e))
        print(f"bench_lora_learning: {e}", file=sys.stderr, flush=True)
    finally:
        if args.json:
            write_atomic(Path(args.json), json.dumps(res, indent=1) + "\n")
        if temporary and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
