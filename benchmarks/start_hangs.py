"""Count MPI job starts that hang in the simulated-hosts harness (tests/hosts.py).

Each start runs, under the harness's mpirun (hydra, rsh launcher into the namespaces, UCX over
TCP), a program that only initialises MPI and passes a barrier, or with --train two steps of
distgpt.train on a tiny config; a start still running after --limit seconds hung. For a hung start
the evidence is saved before the job is killed (Hosts.evidence: the launcher log, each
namespace's TCP sockets, every process's state and kernel wait, gdb backtraces), with mpirun's
output. Options reproduce what the tests do around a start: fresh namespaces for each start, a
far rank killed, 3 hosts on a bridge, ranks or remote proxies that start late.

    sudo .venv/bin/python benchmarks/start_hangs.py --starts 60 [--hosts 3] [--per-host 2] [--rewire]
    sudo .venv/bin/python benchmarks/start_hangs.py --starts 1 --stall   # check the evidence itself

Needs root (network namespaces). Sends nothing outside the namespaces it makes; removes them on
exit. Exit code 1 when a start hung.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import hosts as simhosts  # noqa: E402

# DELAY: each rank sleeps a random time up to it before MPI starts, as distgpt's imports take seconds.
# KILL=1: the last rank (on the last host) dies by SIGKILL after the first barrier, as the tests'
# far rank does; the others wait for it in a second one. STALL=1: the last rank never starts MPI (a
# hang on purpose, to check that the evidence shows it).
PROGRAM = """\
import os, random, sys, time
time.sleep(random.random() * float(os.environ.get("DELAY", 0)))
last = int(os.environ["PMI_RANK"]) == int(os.environ["PMI_SIZE"]) - 1
while last and os.environ.get("STALL") == "1":
    time.sleep(1)
from mpi4py import MPI
MPI.COMM_WORLD.Barrier()
sys.stdout.write(f"ok {MPI.COMM_WORLD.Get_rank()}\\n")
if os.environ.get("KILL") == "1":
    if last:
        os.kill(os.getpid(), 9)
    MPI.COMM_WORLD.Barrier()
"""


def _train_program(hosts: simhosts.Hosts, per_host: int) -> tuple[list[str], dict[str, str]]:
    from conftest import cli_env, run_cli, tiny_config

    data = hosts.workdir / "data"
    r = run_cli("prepare", "--source", "tinyshakespeare", "--tokenizer", "bytes", "--out", str(data))
    if r.returncode != 0:
        sys.exit(f"start_hangs: prepare failed: {r.stderr.strip()}")
    cfg = tiny_config(hosts.workdir, data, train={"micro_batch_size": 6 // per_host, "max_steps": 2})
    command = [sys.executable, "-m", "distgpt.train", "--config", str(cfg), "parallel.threads_per_rank=1"]
    return command, cli_env()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--starts", type=int, default=40)
    ap.add_argument("--hosts", type=int, default=2)
    ap.add_argument("--per-host", type=int, default=1)
    ap.add_argument("--limit", type=float, default=20, help="seconds before a start counts as hung")
    ap.add_argument("--keep-going", action="store_true", help="do not stop at the first hang")
    ap.add_argument("--rewire", action="store_true", help="new namespaces before every start")
    ap.add_argument("--train", action="store_true", help="distgpt.train (2 steps) instead of the barrier")
    ap.add_argument("--cwd", type=Path, default=None,
                    help="run the job from here (`-m distgpt.train` imports distgpt from the working folder)")
    ap.add_argument("--kill-every", type=int, default=0,
                    help="every K-th start, the far rank is SIGKILLed after the first barrier")
    ap.add_argument("--launch-delay", type=float, default=0,
                    help="the rsh launcher sleeps a random time up to this before starting a remote proxy")
    ap.add_argument("--stall", action="store_true", help="the far rank never starts MPI (a hang on purpose)")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the job (repeatable)")
    ap.add_argument("--verbose", action="store_true", help="mpirun -verbose (hydra's own log)")
    ap.add_argument("--no-gdb", action="store_true", help="no native backtraces in the evidence")
    ap.add_argument("--evidence", type=Path, default=Path("/tmp/start_hangs"),
                    help="where the evidence of hung starts goes")
    args = ap.parse_args()

    hosts = simhosts.create(args.hosts)
    if args.launch_delay:
        text = hosts.launcher.read_text().replace(
            "esac\n", f"esac\nsleep $(awk 'BEGIN {{srand(); print rand() * {args.launch_delay}}}')\n", 1)
        hosts.launcher.write_text(text)
    prog = hosts.workdir / "barrier.py"
    prog.write_text(PROGRAM)
    program, env = [sys.executable, str(prog)], dict(os.environ)
    if args.train:
        program, env = _train_program(hosts, args.per_host)
    env.update(simhosts.MPI_ENV, STALL="1" if args.stall else "0")
    env.update(kv.split("=", 1) for kv in args.env)
    hung, times = 0, []
    try:
        for start in range(args.starts):
            if args.rewire and start:
                simhosts.rewire(hosts)
            shutil.rmtree(hosts.workdir / "out", ignore_errors=True)
            (hosts.workdir / "launcher.log").unlink(missing_ok=True)
            cmd = hosts.mpirun(args.per_host, *program)
            if args.verbose:
                cmd.insert(cmd.index("-launcher"), "-verbose")
            killing = bool(args.kill_every) and start % args.kill_every == args.kill_every - 1
            env["KILL"] = "1" if killing else "0"
            log = hosts.workdir / "job.log"
            t0 = time.monotonic()
            with open(log, "w") as f:
                job = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=f,
                                       stderr=subprocess.STDOUT, start_new_session=True, cwd=args.cwd)
                try:
                    rc = job.wait(timeout=args.limit)
                except subprocess.TimeoutExpired:
                    hung += 1
                    where = args.evidence / f"hang{hung}"
                    where.mkdir(parents=True, exist_ok=True)
                    (where / "evidence.txt").write_text(hosts.evidence(native=not args.no_gdb))
                    os.killpg(job.pid, signal.SIGKILL)
                    job.wait()
                    hosts.kill_all()
                    (where / "job.log").write_text(log.read_text())
                    print(f"start {start}: HUNG after {args.limit:.0f} s; evidence in {where}", flush=True)
                    if not args.keep_going:
                        break
                    simhosts.rewire(hosts)
                    continue
            times.append(time.monotonic() - t0)
            text = log.read_text()
            if args.train:
                ok = rc == 0 and "ranks: " in text
            else:
                ok = rc != 0 if killing else rc == 0 and text.count("ok ") == args.hosts * args.per_host
            print(f"start {start}: rc={rc} {times[-1]:.2f} s{'' if ok else ' NOT OK'}", flush=True)
            if not ok:
                print(text[-3000:])
    finally:
        simhosts.destroy(hosts)
    times.sort()
    median = f"{times[len(times) // 2]:.2f} s, slowest {times[-1]:.2f} s" if times else "-"
    print(f"{hung} hung in {len(times) + hung} starts ({args.hosts} hosts x {args.per_host}); "
          f"median start {median}")
    return 1 if hung else 0


if __name__ == "__main__":
    sys.exit(main())
