"""A training step across simulated hosts at a given bandwidth, against the same job on one host.

    sudo python benchmarks/bench_hosts.py [--config gpt2-t256] [--batch 4] [--hosts 2]
        [--rates 1gbit,10gbit] [--micro-batches 1,4] [--wire fp32,bf16] [--steps 3] [--warmup 1]
        [--zero] [--no-comm-thread] [--env KEY=VALUE ...] [--json PATH]

Every run is bench_train.py's distgpt worker (the Trainer.step that distgpt.train runs) on N ranks
(--hosts) of one thread each: first all on one host (the shared-memory sum), then one rank on each
of N hosts made by tests/hosts.py (network namespaces joined by a veth, or a bridge for 3 or more;
real TCP: UCX_TLS=tcp,self), with every host's outgoing link shaped by tc to each rate (token
bucket, 50 ms of queue). The hosts share this machine's cores: rank r is pinned to core r
(taskset), as `mpirun -bind-to core:1` pins the ranks on one host.

Printed per case: ms per step (median of the timed steps), the ratio to the one-host step with the
same micro-batches, and the MB host 1 sent per step (its interface's counter over the whole run,
divided by all steps: the start's parameter broadcast goes the other way). Needs root.
"""

from __future__ import annotations

import argparse
import json
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


def worker_command(args: argparse.Namespace, micro: int, wire: str, out: Path) -> list[str]:
    return [sys.executable, str(BENCH), "--worker", "distgpt", "--config", args.config, "--threads", "1",
            "--batch", str(args.batch * micro), "--micro-batches", str(micro), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--out", str(out), "--reduce", "auto", "--precision", "fp32",
            "--grad-wire", wire, "--zero" if args.zero else "--no-zero",
            "--comm-thread" if args.comm_thread else "--no-comm-thread"]


def run(cmd: list[str], env: dict[str, str], out: Path) -> dict:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-12:])
        raise SystemExit(f"bench_hosts: {' '.join(cmd[-20:])}: exit code {proc.returncode}\n{tail}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="gpt2-t256", help="a bench_train.py shape (default gpt2-t256)")
    p.add_argument("--batch", type=int, default=4,
                   help="sequences per micro-batch round, over all ranks (default 4)")
    p.add_argument("--rates", default="1gbit,10gbit", help="tc rates, comma-separated ('none': unshaped)")
    p.add_argument("--micro-batches", default="1,4", help="micro-batches per rank and step, comma-separated")
    p.add_argument("--wire", default="fp32,bf16", help="parallel.grad_wire values, comma-separated")
    p.add_argument("--hosts", type=int, default=2, help="simulated hosts, one rank each (default 2)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--zero", action=argparse.BooleanOptionalAction, default=False,
                   help="ZeRO-1 (default off: replicated, whose gather is of gradients, not parameters)")
    p.add_argument("--comm-thread", action=argparse.BooleanOptionalAction, default=True,
                   help="parallel.comm_thread (default on)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the ranks (e.g. MPIR_CVAR_ASYNC_PROGRESS=1)")
    p.add_argument("--json", help="save every result to this file")
    args = p.parse_args(argv)
    why = simhosts.unavailable()
    if why:
        p.error(f"simulated hosts: {why}")
    extra = dict(kv.split("=", 1) for kv in args.env)
    env = {**os.environ, **simhosts.MPI_ENV, **extra}
    micros = [int(m) for m in args.micro_batches.split(",")]
    wires = args.wire.split(",")
    results: list[dict] = []
    mode = "ZeRO-1" if args.zero else "replicated"
    print(f"{args.config}, {args.batch} sequences per micro-batch round, {mode}, {args.hosts} ranks x 1 "
          f"thread, comm thread {'on' if args.comm_thread else 'off'}; extra env: {extra or 'none'}")
    print("| case | micro-batches | grad_wire | ms/step | vs one host | MB sent/step |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="bench_hosts-") as tmp:
        base: dict[int, float] = {}
        for micro in micros:
            out = Path(tmp) / f"one-{micro}.json"
            cmd = [str(simhosts.MPIRUN), "-n", str(args.hosts), "-bind-to", "core:1",
                   *worker_command(args, micro, "fp32", out)]
            r = run(cmd, env, out)
            base[micro] = r["ms_per_step"]
            results.append({"case": "one host", "micro": micro, "wire": "fp32", **r})
            print(f"| one host, shared memory | {micro} | - | {r['ms_per_step']:.0f} | 1.00 | 0 |",
                  flush=True)
        made = simhosts.create(args.hosts)
        try:
            for rate in args.rates.split(","):
                if rate != "none":
                    made.shape(rate)
                for micro in micros:
                    for wire in wires:
                        out = Path(tmp) / f"two-{rate}-{micro}-{wire}.json"
                        before = made.tx_bytes(1)
                        # rank r on core r, as -bind-to core:1 does on one host (each host's
                        # proxy would bind its own rank to core 0: the hosts share the cores)
                        pinned = ["sh", "-c", 'exec taskset -c "$((PMI_RANK % $(nproc)))" "$@"', "sh"]
                        r = run(made.mpirun(1, *pinned, *worker_command(args, micro, wire, out)), env, out)
                        sent = (made.tx_bytes(1) - before) / (args.steps + args.warmup) / 1e6
                        ratio = r["ms_per_step"] / base[micro]
                        results.append({"case": f"{args.hosts} hosts {rate}", "micro": micro, "wire": wire,
                                        "mb_sent_per_step": sent, "vs_one_host": ratio, **r})
                        print(f"| {args.hosts} hosts x 1 rank, {rate} | {micro} | {wire} | "
                              f"{r['ms_per_step']:.0f} | "
                              f"{ratio:.2f} | {sent:.0f} |", flush=True)
        finally:
            simhosts.destroy(made)
    cpu = this_cpu().model or "?"
    print(f"CPU: {cpu}, {os.cpu_count()} cores; MPI: {results[0].get('mpi', '?')}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
