"""A training step across simulated hosts at a given bandwidth, against the same job on one host.

    sudo python benchmarks/bench_hosts.py [--config gpt2-t256] [--batch 2xHOSTS] [--hosts 2]
        [--rates 1gbit,10gbit] [--micro-batches 1,4] [--wire fp32,bf16] [--precision fp32,bf16]
        [--sync step,diloco] [--inner-steps 50] [--outer-wire fp32|bf16] [--steps 3] [--warmup 1]
        [--zero] [--no-comm-thread] [--env KEY=VALUE ...] [--json PATH]

Every run is bench_train.py's distgpt worker (the Trainer.step that distgpt.train runs) on N ranks
(--hosts) of one thread each: first all on one host (the shared-memory sum), then one rank on each
of N hosts made by tests/hosts.py (network namespaces joined by a veth, or a bridge for 3 or more;
real TCP: UCX_TLS=tcp,self), with every host's outgoing link shaped by tc to each rate (token
bucket, 50 ms of queue). The hosts share this machine's cores: rank r is pinned to core r modulo
the cores (taskset), as `mpirun -bind-to core:1` pins the ranks on one host; with more ranks than
cores (3 hosts on 2 cores) both the one-host and the N-host runs share cores, and the output says so.

--precision runs every case in each train.precision (bf16 only where the CPU has fast bf16 matmuls:
elsewhere it is left out, with the reason). --sync runs each case with parallel.sync=step (the
gradient sum crosses the hosts every step, on each --wire) and/or parallel.sync=diloco (each host
trains alone; every --inner-steps steps the hosts average their pseudo-gradients, as --outer-wire;
no gradient crosses, so --wire does not apply). Under diloco --steps is rounded up
to whole cycles of --inner-steps (the timed steps are k whole cycles' worth: k syncs).
The one-host baseline is always sync=step, once per precision and micro-batch count.

Printed per case: ms per step, the median of the timed steps and their mean (under diloco the mean
over whole cycles is the cost per step; the median is a step without a sync), the ratio to the
one-host step with the same micro-batches and precision (sync=step: median / median, as before;
diloco: mean / the one-host median), and the MB host 1 sent per step (its interface's counter over
the whole run, divided by all steps: the start's parameter broadcast goes the other way). Needs root.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from distgpt.cpu import this_cpu

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
import hosts as simhosts  # noqa: E402  (the tests' harness: one implementation of the hosts)

BENCH = HERE / "bench_train.py"


def steps_for(args: argparse.Namespace, sync: str) -> tuple[int, int]:
    """(warmup, timed steps) of a run: under diloco the timed steps rounded up to whole cycles of
    --inner-steps (any k x H consecutive steps hold k syncs)."""
    if sync == "step":
        return args.warmup, args.steps
    h = args.inner_steps
    return args.warmup, h * max(1, math.ceil(args.steps / h))


def overrides(args: argparse.Namespace, sync: str) -> list[str]:
    """The worker's config overrides (bench_train.py --set) for this sync."""
    if sync == "step":
        return []
    return ["parallel.sync=diloco", f"parallel.diloco.inner_steps={args.inner_steps}",
            f"parallel.diloco.wire={args.outer_wire}"]


def worker_command(args: argparse.Namespace, micro: int, wire: str, precision: str, sync: str,
                   out: Path) -> list[str]:
    warmup, steps = steps_for(args, sync)
    return [sys.executable, str(BENCH), "--worker", "distgpt", "--config", args.config, "--threads", "1",
            "--batch", str(args.batch * micro), "--micro-batches", str(micro), "--steps", str(steps),
            "--warmup", str(warmup), "--out", str(out), "--reduce", "auto", "--precision", precision,
            "--grad-wire", wire, *zero_args(args),
            "--comm-thread" if args.comm_thread else "--no-comm-thread",
            *(f"--set={kv}" for kv in overrides(args, sync))]


def zero_args(args: argparse.Namespace) -> list[str]:
    """--zero / --no-zero as asked, or distgpt's default (parallel.zero=auto: ZeRO-1 on one host and
    within each DiLoCo host, replicated when every step's sum crosses hosts)."""
    if args.zero is None:
        return ["--set=parallel.zero=auto"]
    return ["--zero" if args.zero else "--no-zero"]


def run(cmd: list[str], env: dict[str, str], out: Path) -> dict:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-12:])
        raise SystemExit(f"bench_hosts: {' '.join(cmd[-24:])}: exit code {proc.returncode}\n{tail}")
    return json.loads(out.read_text())


def split_list(p: argparse.ArgumentParser, flag: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    items = text.split(",")
    for item in items:
        if item not in allowed:
            p.error(f"{flag} {text}: {item!r} is not one of {', '.join(allowed)}")
    return items


def bf16_unavailable() -> str | None:
    """Why train.precision=bf16 would fail here (no fast bf16 matmuls), or None."""
    from distgpt import gemm16

    return gemm16.configure().why_not


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="gpt2-t256", help="a bench_train.py shape (default gpt2-t256)")
    p.add_argument("--batch", type=int,
                   help="sequences per micro-batch round, over all ranks (default 2 per rank: 2 x --hosts)")
    p.add_argument("--rates", default="1gbit,10gbit", help="tc rates, comma-separated ('none': unshaped)")
    p.add_argument("--micro-batches", default="1,4", help="micro-batches per rank and step, comma-separated")
    p.add_argument("--wire", default="fp32,bf16",
                   help="parallel.grad_wire values for sync=step, comma-separated")
    p.add_argument("--precision", default="fp32",
                   help="train.precision values, comma-separated: fp32, bf16 (default fp32)")
    p.add_argument("--sync", default="step", help="parallel.sync values, comma-separated: step, diloco")
    p.add_argument("--inner-steps", type=int, default=50, help="diloco: parallel.diloco.inner_steps (50)")
    p.add_argument("--outer-wire", choices=("fp32", "bf16"), default="fp32",
                   help="diloco: parallel.diloco.wire (default fp32)")
    p.add_argument("--hosts", type=int, default=2, help="simulated hosts, one rank each (default 2)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (diloco: rounded up to whole cycles)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps (diloco: rounded up to whole cycles)")
    p.add_argument("--zero", action=argparse.BooleanOptionalAction, default=None,
                   help="ZeRO-1 on or off (default: distgpt's parallel.zero=auto, ZeRO-1 on one host, "
                        "replicated across hosts)")
    p.add_argument("--comm-thread", action=argparse.BooleanOptionalAction, default=True,
                   help="parallel.comm_thread (default on)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the ranks (e.g. MPIR_CVAR_ASYNC_PROGRESS=1)")
    p.add_argument("--json", help="save every result to this file")
    args = p.parse_args(argv)
    for name, low in (("hosts", 2), ("steps", 1), ("warmup", 0), ("inner_steps", 1)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected at least {low}")
    args.batch = 2 * args.hosts if args.batch is None else args.batch
    if args.batch < 1 or args.batch % args.hosts:
        p.error(f"--batch {args.batch}: expected a positive multiple of --hosts ({args.hosts})")
    if any("=" not in kv for kv in args.env):
        p.error(f"--env {next(kv for kv in args.env if '=' not in kv)!r}: expected KEY=VALUE")
    wires = split_list(p, "--wire", args.wire, ("fp32", "bf16"))
    syncs = split_list(p, "--sync", args.sync, ("step", "diloco"))
    precisions = split_list(p, "--precision", args.precision, ("fp32", "bf16"))
    try:
        micros = [int(m) for m in args.micro_batches.split(",")]
    except ValueError:
        p.error(f"--micro-batches {args.micro_batches}: expected positive integers, comma-separated")
    if min(micros) < 1:
        p.error(f"--micro-batches {args.micro_batches}: expected positive integers, comma-separated")
    why = simhosts.unavailable()
    if why:
        p.error(f"simulated hosts: {why}")
    notes = []
    if "bf16" in precisions and (why_not := bf16_unavailable()) is not None:
        precisions.remove("bf16")
        notes.append(f"bf16 left out: {why_not}")
        if not precisions:
            p.error(f"--precision {args.precision}: bf16 is not available here ({why_not})")
    extra = dict(kv.split("=", 1) for kv in args.env)
    env = {**os.environ, **simhosts.MPI_ENV, **extra}
    cores = len(os.sched_getaffinity(0))
    if args.hosts > cores:
        notes.append(f"oversubscribed: {args.hosts} ranks on {cores} cores "
                     f"({args.hosts / cores:.1f} per core), in the one-host and the {args.hosts}-host runs "
                     f"alike: ranks r and r + {cores} share core r, so the steps are slower than on "
                     f"{args.hosts} cores")
    results: list[dict] = []
    mode = ("parallel.zero auto (ZeRO-1 on one host, replicated across hosts)" if args.zero is None
            else "ZeRO-1" if args.zero else "replicated")
    diloco_note = ""
    if "diloco" in syncs:
        warmup, steps = steps_for(args, "diloco")
        diloco_note = (f"; diloco: H={args.inner_steps}, outer wire {args.outer_wire}, {warmup} warmup + "
                       f"{steps} timed steps ({steps // args.inner_steps} whole cycle(s))")
    print(f"{args.config}, {args.batch} sequences per micro-batch round, {mode}, {args.hosts} ranks x 1 "
          f"thread, comm thread {'on' if args.comm_thread else 'off'}; step sync: {args.warmup} warmup + "
          f"{args.steps} timed steps{diloco_note}; extra env: {extra or 'none'}")
    for note in notes:
        print(f"note: {note}")
    print("| case | micro-batches | precision | sync | wire | ms/step median | ms/step mean | vs one host "
          "| MB sent/step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="bench_hosts-") as tmp:
        base: dict[tuple[int, str], float] = {}
        for precision in precisions:
            for micro in micros:
                out = Path(tmp) / f"one-{micro}-{precision}.json"
                cmd = [str(simhosts.MPIRUN), "-n", str(args.hosts), "-bind-to", "core:1",
                       *worker_command(args, micro, "fp32", precision, "step", out)]
                r = run(cmd, env, out)
                base[micro, precision] = r["ms_per_step"]
                results.append({"case": "one host", "micro": micro, "wire": "fp32",
                                "ranks_per_host": args.hosts, "cores": cores, **r})
                print(f"| one host, shared memory | {micro} | {precision} | step | - | "
                      f"{r['ms_per_step']:.0f} | {r['mean_ms_per_step']:.0f} | 1.00 | 0 |", flush=True)
        made = simhosts.create(args.hosts)
        try:
            for rate in args.rates.split(","):
                if rate != "none":
                    made.shape(rate)
                for precision in precisions:
                    for micro in micros:
                        for sync in syncs:
                            # diloco: no gradient leaves a host (one rank each), grad_wire is moot
                            for wire in wires if sync == "step" else ["fp32"]:
                                row = measure(args, made, env, Path(tmp), rate, micro, wire, precision, sync,
                                              base[micro, precision], cores)
                                results.append(row)
        finally:
            simhosts.destroy(made)
    cpu = this_cpu().model or "?"
    print(f"CPU: {cpu}, {cores} cores; MPI: {results[0].get('mpi', '?')}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def measure(args: argparse.Namespace, made: simhosts.Hosts, env: dict[str, str], tmp: Path, rate: str,
            micro: int, wire: str, precision: str, sync: str, base_ms: float, cores: int) -> dict:
    """One N-host case: run it, print its row, return its result."""
    out = tmp / f"hosts-{rate}-{micro}-{wire}-{precision}-{sync}.json"
    before = made.tx_bytes(1)
    # rank r on core r, as -bind-to core:1 does on one host (each host's proxy would bind its own
    # rank to core 0: the hosts share the cores)
    pinned = ["sh", "-c", 'exec taskset -c "$((PMI_RANK % $(nproc)))" "$@"', "sh"]
    r = run(made.mpirun(1, *pinned, *worker_command(args, micro, wire, precision, sync, out)), env, out)
    warmup, steps = steps_for(args, sync)
    sent = (made.tx_bytes(1) - before) / (steps + warmup) / 1e6
    ratio = (r["ms_per_step"] if sync == "step" else r["mean_ms_per_step"]) / base_ms
    row = {"case": f"{args.hosts} hosts {rate}", "micro": micro, "wire": wire, "ranks_per_host": 1,
           "cores": cores, "mb_sent_per_step": sent, "vs_one_host": ratio, **r}
    shown = wire if sync == "step" else f"outer {args.outer_wire}"
    if sync == "diloco" and r.get("outer_ms"):
        shown += f", {r['outer_syncs']} syncs of {sum(r['outer_ms']) / len(r['outer_ms']):.0f} ms"
    print(f"| {args.hosts} hosts x 1 rank, {rate} | {micro} | {precision} | {sync} | {shown} | "
          f"{r['ms_per_step']:.0f} | {r['mean_ms_per_step']:.0f} | {ratio:.2f} | {sent:.1f} |", flush=True)
    return row


if __name__ == "__main__":
    sys.exit(main())
