"""LoRA fine-tuning of GPT-2 medium and XL: distgpt against transformers + peft, in one invocation.

    python benchmarks/bench_lora.py [--shapes medium,xl] [--models DIR] [--steps 2] [--warmup 1]
        [--cases distgpt:1x2:block,distgpt:1x2:none,distgpt:2x1:block,peft:1x2:ckpt,peft:1x2:none]
        [--precision bf16] [--json PATH]

The anchor is what a user of the Hugging Face stack runs: GPT2LMHeadModel.from_pretrained with its
weights in bf16, peft's LoRA r 8, alpha 16 on c_attn, c_proj (attention's and the MLP's) and c_fc
(fan_in_fan_out: GPT-2's Conv1D), adapters in float32 (peft's default), bf16 autocast, AdamW on the
adapters, with and without gradient checkpointing, dropout 0 (as distgpt's runs). distgpt runs the
same LoRA as a user would,
`python -m distgpt.train` (under mpirun for several ranks) with `lora.rank 8` on the same folder,
`train.recompute` block or none. Both train on T1024 sequences, one per rank per step (B1).

The weights: random ones of GPT-2's real shapes, written by transformers (save_pretrained, float32
safetensors, as the hub's files) into --models/gpt2-<shape> on first use. The data: random tokens,
written as a distgpt token shard.

Measured per case, each in its own processes:
- tokens/s: the fastest timed step (the least disturbed by anything else on the machine) and the
  median; distgpt's from its metrics.jsonl, peft's timed around forward, backward and step;
- peak memory of all the case's processes together, sampled every 50 ms for the whole run,
  loading included: the sum of their private pages plus the largest file-backed and shared part
  of any one of them (the node-shared base and the libraries are the same pages in every rank:
  counted once); and each process's own peak RSS (VmHWM). For one process the two agree up to
  the sampling; the first is what "the node's ranks together" hold.
distgpt's own estimate (the run header's "per node" figure) is printed beside its measurement.

GB in the output are GiB (2^30 bytes), MiB 2^20.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # GPT-2's published sizes: (n_layer, n_head, n_embd)
    "small": (12, 12, 768), "medium": (24, 16, 1024), "large": (36, 20, 1280), "xl": (48, 25, 1600)}
TARGETS = ["c_attn", "c_proj", "c_fc"]          # peft's names; c_proj matches attn's and the MLP's
SEQ = 1024
MIB = 2**20


def cpu_line() -> str:
    model, flags = platform.processor(), set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and model in ("", "x86_64"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model}; {os.cpu_count()} cores; flags: {' '.join(shown) or '-'}"


# ----------------------------------------------------------------------------- inputs

def hf_folder(models: Path, shape: str) -> Path:
    """GPT-2 of `shape` with random weights (seed 0), written by transformers, once."""
    out = models / f"gpt2-{shape}"
    if (out / "model.safetensors").exists():
        return out
    code = ("import sys, torch\nfrom transformers import GPT2Config, GPT2LMHeadModel\n"
            "L, nh, C = map(int, sys.argv[2:5])\ntorch.manual_seed(0)\n"
            "m = GPT2LMHeadModel(GPT2Config(n_layer=L, n_head=nh, n_embd=C, n_positions=1024))\n"
            "m.save_pretrained(sys.argv[1] + '.part', safe_serialization=True)\n")
    print(f"writing random GPT-2 {shape} weights with transformers into {out}", flush=True)
    subprocess.run([sys.executable, "-c", code, str(out), *map(str, SHAPES[shape])], check=True)
    os.replace(str(out) + ".part", out)
    return out


def token_shards(work: Path) -> Path:
    """Random GPT-2 token ids as a distgpt train and val shard."""
    from distgpt import data
    out = work / "data"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 64 * SEQ), ("val", 8 * SEQ)):
        data.write_shard(out / f"{split}_000000.bin", rng.integers(0, 50257, n, dtype=np.uint16))
    return out


# ----------------------------------------------------------------------------- memory

def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def memory_kib(pid: int) -> dict[str, int]:
    """VmHWM, RssAnon, RssFile and RssShmem of a process from /proc/PID/status: counters the
    kernel keeps, read without walking the page tables (smaps_rollup does walk them, under the
    process's mmap lock: sampled often, it slowed a 6 GB PyTorch process down several times)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


class Sampler(threading.Thread):
    """Peak memory of a process tree, the shared pages counted once: the sum of the processes'
    private (anonymous) pages plus the largest file-backed and shared-memory part of any one of
    them (the node-shared base, the libraries: the same pages in every rank); and each python
    process's own peak RSS (VmHWM)."""

    def __init__(self, pid: int, every: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak = 0
        self.hwm: dict[int, int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            anon = shared = 0
            for p in descendants(self.pid):
                m = memory_kib(p)
                if not m:
                    continue
                anon += m.get("RssAnon", 0)
                shared = max(shared, m.get("RssFile", 0) + m.get("RssShmem", 0))
                try:
                    name = Path(f"/proc/{p}/comm").read_text().strip()
                except OSError:
                    continue
                if name.startswith("python"):
                    self.hwm[p] = max(self.hwm.get(p, 0), m.get("VmHWM", 0))
            self.peak = max(self.peak, anon + shared)
            time.sleep(self.every)


def run_measured(cmd: list[str], env: dict, log: Path, what: str) -> tuple[str, Sampler, float]:
    """Run cmd with its output in `log`, sampling its memory: (its output, the sampler, seconds).
    A failed run stops the benchmark with the output's tail."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        s = Sampler(proc.pid)
        s.start()
        rc = proc.wait()
    s.done.set()
    s.join()
    text = log.read_text()
    if rc != 0:
        raise SystemExit(f"{what} exited {rc}; its output is in {log}:\n{text[-3000:]}")
    return text, s, time.perf_counter() - t0


# ----------------------------------------------------------------------------- distgpt

def distgpt_case(folder: Path, data_dir: Path, work: Path, ranks: int, threads: int, recompute: str,
                 steps: int, precision: str, tag: str) -> dict:
    out = work / f"out_{tag}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = {
        "init_from": str(folder),
        "model": {"block_size": SEQ, "dropout": 0.0},
        "data": {"train": str(data_dir / "train_*.bin"), "val": str(data_dir / "val_*.bin"),
                 "tokenizer": "gpt2"},
        "lora": {"rank": 8, "alpha": 16},
        "train": {"batch_size": ranks, "micro_batch_size": 1, "seq_len": SEQ, "max_steps": steps,
                  "lr": 1e-4, "warmup_steps": 1, "eval_every": 0, "eval_steps": 1, "log_every": 1,
                  "sample_every": 0, "precision": precision, "recompute": recompute.split("+")[0],
                  "recompute_keep": int(recompute.split("+")[1]) if "+" in recompute else 0},
        "checkpoint": {"every": 0},
        "parallel": {"threads_per_rank": threads},
        "out_dir": str(out),
    }
    import yaml
    path = work / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "distgpt.train", "--config", str(path)]
    if ranks > 1:
        cmd = [str(Path(sys.executable).parent / "mpirun"), "-n", str(ranks), *cmd]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    log = work / f"{tag}.log"
    text, s, wall = run_measured(cmd, env, log, f"{tag}: distgpt.train")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ms = [r["ms_per_step"] for r in records if "ms_per_step" in r]
    est = re.search(r"per node with \d+ rank\(s\): ([\d,]+) MiB", text)
    return {"ms": ms, "peak_mib": s.peak / 1024, "hwm_mib": sorted(v / 1024 for v in s.hwm.values()),
            "estimate_mib": float(est.group(1).replace(",", "")) if est else None,
            "tokens_per_step": ranks * SEQ, "wall_s": wall}


# ----------------------------------------------------------------------------- peft

def peft_worker(args: argparse.Namespace) -> None:
    """One peft run, in its own process: prints one JSON line of step times."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    low = args.precision == "bf16"
    # no dropout, as distgpt's runs here (GPT-2's config has 0.1: with it, attention leaves the fused
    # kernel for one that materialises every head's T x T probabilities)
    model = GPT2LMHeadModel.from_pretrained(args.folder, dtype=torch.bfloat16 if low else torch.float32,
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                            attn_implementation="sdpa")
    print(f"attention: {model.config._attn_implementation}", flush=True)
    if args.mode == "ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             fan_in_fan_out=True, bias="none"))
    model.train()
    # from here on VmHWM is the training's peak alone: from_pretrained maps the float32 file and
    # casts it, which a user's session pays once (Linux: writing 5 to clear_refs resets VmHWM)
    Path("/proc/self/clear_refs").write_text("5")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rng = np.random.default_rng(0)
    ms = []
    for _ in range(args.steps):
        x = torch.from_numpy(rng.integers(0, 50257, (1, SEQ)))
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ms.append((time.perf_counter() - t0) * 1000)
        print(f"step {len(ms)}: loss {loss.item():.4f}, {ms[-1]:.0f} ms", flush=True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    hwm = memory_kib(os.getpid())["VmHWM"] / 1024
    print("RESULT " + json.dumps({"ms": ms, "trainable": trainable, "training_peak_mib": hwm}), flush=True)


def peft_case(folder: Path, work: Path, threads: int, mode: str, steps: int, precision: str,
              tag: str) -> dict:
    cmd = [sys.executable, __file__, "--peft-worker", "--folder", str(folder), "--mode", mode,
           "--threads", str(threads), "--steps", str(steps), "--precision", precision]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    log = work / f"{tag}.log"
    text, s, wall = run_measured(cmd, env, log, f"{tag}: the peft run")
    res = json.loads(text.split("RESULT ", 1)[1].splitlines()[0])
    return {"ms": res["ms"], "peak_mib": s.peak / 1024, "training_peak_mib": res["training_peak_mib"],
            "hwm_mib": sorted(v / 1024 for v in s.hwm.values()), "estimate_mib": None,
            "tokens_per_step": SEQ, "wall_s": wall}


# ----------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="medium,xl")
    ap.add_argument("--cases", default="distgpt:1x2:block,distgpt:1x2:none,distgpt:2x1:block,"
                                       "peft:1x2:ckpt,peft:1x2:none",
                    help="tool:RANKSxTHREADS:mode; distgpt's mode is train.recompute (block+K: "
                         "train.recompute_keep K), peft's ckpt or none")
    ap.add_argument("--models", type=Path, default=REPO / "benchmarks" / ".models",
                    help="where the random HF folders are written (kept for later runs)")
    ap.add_argument("--work", type=Path, default=None, help="logs, configs, outputs (default: a temp dir)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--peft-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peft_worker:
        return peft_worker(args)

    sys.path.insert(0, str(REPO))
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_lora_"))
    work.mkdir(parents=True, exist_ok=True)
    data_dir = token_shards(work)
    n = args.warmup + args.steps
    print(f"CPU: {cpu_line()}\nprecision: {args.precision}; T{SEQ}, one sequence per rank per step; "
          f"{args.warmup} warm-up + {args.steps} timed steps; work dir {work}", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        folder = hf_folder(args.models, shape)
        for case in args.cases.split(","):
            tool, layout, mode = case.split(":")
            ranks, threads = map(int, layout.split("x"))
            tag = f"{shape}_{tool}_{layout}_{mode}"
            print(f"-- {tag}", flush=True)
            if tool == "distgpt":
                r = distgpt_case(folder, data_dir, work, ranks, threads, mode, n, args.precision, tag)
            elif tool == "peft" and ranks == 1:
                r = peft_case(folder, work, threads, mode, n, args.precision, tag)
            else:
                raise SystemExit(f"--cases: {case!r}: expected distgpt:RxT:none|block or peft:1xT:ckpt|none")
            timed = r["ms"][args.warmup:]
            r.update(shape=shape, tool=tool, ranks=ranks, threads=threads, mode=mode,
                     tok_s=r["tokens_per_step"] / (min(timed) / 1000),
                     tok_s_median=r["tokens_per_step"] / (statistics.median(timed) / 1000))
            rows.append(r)
            est = f", estimate {r['estimate_mib']:,.0f} MiB" if r["estimate_mib"] else ""
            if "training_peak_mib" in r:
                est += f", after loading {r['training_peak_mib']:,.0f} MiB"
            print(f"   {r['tok_s']:.1f} tok/s (median {r['tok_s_median']:.1f}); peak memory "
                  f"{r['peak_mib']:,.0f} MiB; VmHWM {', '.join(f'{h:,.0f}' for h in r['hwm_mib'])} MiB"
                  f"{est}; {r['wall_s']:.0f} s", flush=True)
    print("\n| shape | run | layout | tok/s (median) | peak memory, all processes "
          "| vs peft (same recompute) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        # distgpt's recompute (block, block+K) against peft's gradient checkpointing, none against none
        want = "none" if r["mode"] == "none" else "ckpt"
        anchor = next((a for a in rows if a["shape"] == r["shape"] and a["tool"] == "peft"
                       and a["mode"] == want), None)
        vs = "-" if anchor is None or r is anchor else (
            f"{r['tok_s'] / anchor['tok_s']:.2f}x tok/s, "
            f"{r['peak_mib'] / anchor['peak_mib']:.2f}x memory")
        run = f"{r['tool']} {'recompute ' if r['tool'] == 'distgpt' else ''}{r['mode']}"
        print(f"| {r['shape']} | {run} | {r['ranks']}x{r['threads']} | {r['tok_s']:.1f} "
              f"({r['tok_s_median']:.1f}) | {r['peak_mib'] / 1024:.2f} GB | {vs} |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_line(), "precision": args.precision, "rows": rows},
                                        indent=1))


if __name__ == "__main__":
    main()
