"""Step time and efficiency of data-parallel GPT-2 training on N hosts, from compute rate and bytes moved.

    python benchmarks/scaling_model.py [--check bench_hosts.json ...] [--core-tok-s 80] [--cores 32]
        [--host-tokens 8192] [--seq-len 1024] [--hosts 4,16] [--rates 1,10,100] [--zero]
        [--diloco-h 10,50,200 | none] [--latency-ms 0.05] [--idle-share 1]

The model of a synchronous step (parallel.sync: step; GradReducer with the comm thread, replicated
unless --zero):
    compute   t_c   the step's forward + backward + update on one host, no network
    window    t_w   the backward of the step's last micro-batch, where the sum can overlap: its
                    share of t_c is BACKWARD_SHARE / micro-batches (the token table goes first,
                    at backward's start: the forward's fused head has computed its gradient)
    wire      S     bytes each host sends per step: replicated 2 (N-1)/N x P x w (its part of the
                    gradient to the others, then its part of the sums), w = 4 (fp32) or 2 (bf16);
                    ZeRO-1 (N-1)/N x P x (w + 4): the gradient parts, then fp32 parameters, which
                    gather after the update where nothing overlaps them
    tail      the last bucket (block 0 and wpe), which backward finishes last: never hidden
    convert   bf16 only: P x CONVERT_S of one core per rank (rounding, summing, widening)
    step      t = t_c + max(0, S_overlappable / B - t_w) + tail / B (+ the ZeRO gather / B)
                  (+ convert / the rank's threads)
with B the link's rate times TCP's efficiency (~0.94 of the line rate: 1448 bytes of payload per
1514 on the wire; measured 0.93-0.95 on the tc-shaped veth). Efficiency = t_c / t.

DiLoCo (parallel.sync: diloco; Douillard et al. 2023, arXiv:2311.08105): a host takes H inner steps
of t_c each with nothing crossing hosts (its ranks sum gradients in shared memory, ZeRO-1 inside the
host: all of that is in t_c), then an outer sync:
    wire      S_o   2 (N-1)/N x P x w per host and sync: the pseudo-gradient (global - local, P
                    values) allreduced as reduce-scatter + allgather. Each local rank syncs 1/ranks
                    of it with its peers on the other hosts, but all of them share the host's one
                    link, so the host's bytes go at B. (MPICH's Allreduce on 3 hosts sent 1.5x this
                    in the issue-16 runs; power-of-two host counts send S_o.)
    latency   2 (N-1) x --latency-ms: one message latency per ring step; the ranks' rings run side
                    by side. Default 0.05 ms, a LAN over TCP (MPI ping-pong half round trips are
                    20-50 us); between data centres use their one-way delay (tens of ms). TCP's
                    window growth on such paths is not modelled.
    network   t_n = S_o / B + latency
    convert   bf16 only: P x CONVERT_S / the host's cores (each core rounds and sums its slice)
    update    P x OUTER_BYTES / the host's memory bandwidth: distgpt/diloco.py's NumPy passes over
                    fp32 arrays of a rank's slice (3.9M values at 32 ranks: beyond the caches), per
                    value: the pseudo-gradient (read 2, write 1), the mean's scaling (2), its norm
                    (1), momentum *= mu (2), += delta (3), Nesterov's mu x momentum (2) and + delta
                    (3), lr x step (2), global -= (3), the copy into the inner parameters (2):
                    23 accesses, 92 bytes (a fused loop would stream 36). Bandwidth = the smaller
                    of HOST_MEM_BW (100 GB/s: a 32-core server socket, 8 DDR4-3200 channels at
                    205 GB/s peak, STREAM reaches ~60% of that) and cores x CORE_STREAM_BW (30 GB/s:
                    one core here streams AdamW's 28 bytes x 62M parameters in 56-61 ms,
                    benchmarks/README.md). GPT-2 124M on 32 cores: 115 ms per sync.
    blocking    t = t_c + (t_n + convert + update) / H        (the mean step over a cycle)
    overlapped  t = t_c + (max(0, t_n - H x t_c x idle) + convert + update) / H: the sync runs
                    behind the next H inner steps, whose link is idle (idle = --idle-share, 1: the
                    inner steps send nothing across hosts); convert and update use the cores and
                    always show. The staleness this costs in loss is not modelled.
Bytes crossing hosts per step and host: S for a step, S_o / H for DiLoCo. Efficiency here is
throughput only: DiLoCo's loss per token differs from a synchronous step's (the paper: 8 workers at
H = 500 match the synchronous baseline's perplexity with 500x less communication).

--check compares the model with bench_hosts.py results (its --json): t_c and the backward share are
taken from that run's one-host case, so only the network part is predicted. Without --check, it
predicts hosts of --cores cores at --core-tok-s tokens/s per core (this machine's measured rate):
the synchronous step's table (as before), then the synchronous step beside DiLoCo.

DiLoCo rows in a --check file (bench_hosts.py --sync diloco; its format is not final, so this reads
only these keys): "sync": "diloco"; "inner_steps": H; "wire" (or "diloco_wire"); "step_ms", every
timed step's ms, the sync steps among them; optional "ranks_per_host" (default 1: bench_hosts runs
one rank of one thread per host), "outer_syncs" (how many timed steps ran the outer sync; without
it, the timed steps whose 1-based number is a multiple of H or "max_steps" when the row has it, as
distgpt.diloco.sync_steps decides; the timed steps are warmup + 1 ..., warmup = len(losses) -
len(step_ms)) and "outer_ms" (each timed sync's own seconds x 1000, StepResult.outer.seconds).
The row is compared over its timed steps: t_c + syncs x (t_n + convert + update) / steps, with t_c
the median step of the one-host row of the same micro-batches ("sync": "diloco" if there is one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

P = 124_475_904          # GPT-2 124M parameters in distgpt's layout (vocabulary padded to 50,304)
C, L, V = 768, 12, 50_304
TAIL = 12 * C * C + 13 * C + 1024 * C     # block 0 (7.1M) and wpe: the bucket backward ends with
TCP = 0.94
# bf16 on the wire: converting and summing costs the rank ~6 ns of one core per parameter and step
# (measured here: the 10 Gbit/s step grows 0.7 s with bf16), taken from its compute threads
CONVERT_S = 5.8e-9
# backward's share of a step's compute (bench_train's split, GPT-2 T256, one micro-batch): the
# tied head's gradient is computed in the forward (the fused loss), so backward is the smaller half
BACKWARD_SHARE = 0.43
# DiLoCo's outer step: 23 fp32 accesses per parameter (see the docstring), memory-bound
OUTER_BYTES = 92
HOST_MEM_BW = 100e9
CORE_STREAM_BW = 30e9
LATENCY_S = 50e-6


class BadInput(ValueError):
    """A --check file that cannot be read as bench_hosts results: one line, exit code 2."""


def flops_per_token(seq_len: int) -> float:
    return 6 * P + 12 * L * seq_len * C         # parameters' matmuls, and attention's


def link_rate(gbit: float) -> float:
    """Payload bytes per second through a link of gbit Gbit/s."""
    return gbit * 1e9 / 8 * TCP


def step_time(t_c: float, hosts: int, gbit: float, wire: str, micro: int = 1, zero: bool = False,
              backward_share: float = BACKWARD_SHARE, threads: int = 1) -> float:
    if hosts == 1:
        return t_c
    w = 4 if wire == "fp32" else 2
    rate = link_rate(gbit)
    part = (hosts - 1) / hosts
    grads = part * P * w * (1 if zero else 2)    # replicated: the sums go back too
    tail = part * TAIL * w * (1 if zero else 2)
    window = t_c * backward_share / micro
    t = t_c + max(0.0, (grads - tail) / rate - window) + tail / rate
    if zero:
        t += part * P * 4 / rate                 # the parameter gather, after the update
    if wire == "bf16":
        t += P * CONVERT_S / threads
    return t


def step_bytes(hosts: int, wire: str, zero: bool = False) -> float:
    """Bytes one host sends per synchronous step (what step_time moves)."""
    w = 4 if wire == "fp32" else 2
    part = (hosts - 1) / hosts
    return part * P * (w + 4) if zero else 2 * part * P * w


def diloco_sync(hosts: int, gbit: float, wire: str, cores: int = 1,
                latency_s: float = LATENCY_S) -> tuple[float, float]:
    """One outer sync on a host of `cores` cores: (network seconds t_n, CPU seconds convert + update)."""
    net = step_bytes(hosts, wire) / link_rate(gbit) + 2 * (hosts - 1) * latency_s
    cpu = P * OUTER_BYTES / min(HOST_MEM_BW, cores * CORE_STREAM_BW)
    if wire == "bf16":
        cpu += P * CONVERT_S / cores
    return net, cpu


def diloco_step(t_c: float, hosts: int, gbit: float, wire: str, inner: int, cores: int = 1,
                overlap: bool = False, latency_s: float = LATENCY_S, idle: float = 1.0) -> float:
    """The mean step over a cycle of `inner` inner steps and one outer sync."""
    net, cpu = diloco_sync(hosts, gbit, wire, cores, latency_s)
    if overlap:
        net = max(0.0, net - inner * t_c * idle)
    return t_c + (net + cpu) / inner


def _get(path: str, i: int, r: dict, key: str):
    if key not in r:
        raise BadInput(f"{path}: row {i} ({r.get('case', '?')}): no key '{key}'")
    return r[key]


def _load(path: str) -> list[dict]:
    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: not a bench_hosts.py --json file ({e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise BadInput(f"{path}: expected a JSON list of result objects (bench_hosts.py --json)")
    return rows


def _case(path: str, i: int, r: dict) -> tuple[int, float]:
    """(hosts, Gbit/s) from a case like '2 hosts 1gbit' ('none': the unshaped veth, ~40 Gbit/s)."""
    words = str(_get(path, i, r, "case")).split()
    try:
        hosts, rate = int(words[0]), words[-1]
        return hosts, float(rate.removesuffix("gbit")) if rate.endswith("gbit") else 40.0
    except (ValueError, IndexError):
        raise BadInput(f"{path}: row {i}: case {r['case']!r} is not 'N hosts RATE'") from None


def _wire(path: str, i: int, r: dict, key: str = "wire") -> str:
    wire = _get(path, i, r, key)
    if wire not in ("fp32", "bf16"):
        raise BadInput(f"{path}: row {i}: {key} {wire!r} is not fp32 or bf16")
    return wire


def _diloco_row(path: str, i: int, r: dict, t_c: float, latency_s: float) -> str:
    hosts, gbit = _case(path, i, r)
    inner = _get(path, i, r, "inner_steps")
    if not isinstance(inner, int) or inner < 1:
        raise BadInput(f"{path}: row {i}: inner_steps {inner!r} is not a positive integer")
    wire = _wire(path, i, r, "diloco_wire" if "diloco_wire" in r else "wire")
    steps = [float(v) for v in _get(path, i, r, "step_ms")]
    if not steps:
        raise BadInput(f"{path}: row {i}: step_ms is empty")
    if "outer_syncs" in r:
        syncs = int(r["outer_syncs"])
    else:
        warmup = len(r.get("losses", steps)) - len(steps)
        last = r.get("max_steps")
        syncs = sum((warmup + k) % inner == 0 or warmup + k == last for k in range(1, len(steps) + 1))
    net, cpu = diloco_sync(hosts, gbit, wire, int(r.get("ranks_per_host", 1)), latency_s)
    measured = statistics.fmean(steps)
    model = 1000 * (t_c + syncs * (net + cpu) / len(steps))
    outer = f"{statistics.median(r['outer_ms']):.0f}" if r.get("outer_ms") else "-"
    return (f"| {r['case']} | {r.get('micro', 1)} | {wire} | {inner} | {len(steps)} ({syncs}) | "
            f"{measured:.0f} | {model:.0f} | {model / measured:.2f} | {outer} | {1000 * (net + cpu):.0f} |")


def check(paths: list[str], latency_s: float = LATENCY_S) -> None:
    print("| case | micro-batches | grad_wire | measured ms | model ms | model / measured |")
    print("| --- | --- | --- | --- | --- | --- |")
    diloco: list[str] = []
    for path in paths:
        rows = _load(path)
        # the one-host run of the same micro-batches (and sync, where there is one of each) gives t_c
        base = {(r.get("micro", 1), r.get("sync", "step"), r.get("precision", "fp32")): j
                for j, r in enumerate(rows) if r.get("case") == "one host"}
        for i, r in enumerate(rows):
            if r.get("case") == "one host":
                continue
            micro, sync, prec = r.get("micro", 1), r.get("sync", "step"), r.get("precision", "fp32")
            j = base.get((micro, sync, prec), base.get((micro, "step", prec)))
            if j is None:
                raise BadInput(f"{path}: row {i} ({r.get('case')}): no 'one host' row with micro {micro}")
            one = rows[j]
            t_c = _get(path, j, one, "ms_per_step") / 1000
            if sync == "diloco":
                diloco.append(_diloco_row(path, i, r, t_c, latency_s))
                continue
            split = _get(path, j, one, "split")
            share = split["backward"] / max(1e-9, split["forward"] + split["backward"] + split["optim"])
            hosts, gbit = _case(path, i, r)
            measured = _get(path, i, r, "ms_per_step")
            model = 1000 * step_time(t_c, hosts, gbit, _wire(path, i, r), micro,
                                     r.get("zero", False), share)
            print(f"| {r['case']} | {micro} | {r['wire']} | {measured:.0f} | {model:.0f} | "
                  f"{model / measured:.2f} |")
    if diloco:
        print("\nDiLoCo: the mean over the timed steps (t_c: the one-host step), and one sync on its own")
        print("| case | micro-batches | wire | H | steps (syncs) | measured mean ms | model mean ms | "
              "model / measured | measured sync ms | model sync ms |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        print("\n".join(diloco))


def compute_time(args: argparse.Namespace) -> float:
    return args.host_tokens * flops_per_token(args.seq_len) / (
        args.cores * args.core_tok_s * flops_per_token(256))      # the rate was measured at T256


def predict(args: argparse.Namespace) -> None:
    t_c = compute_time(args)
    print(f"GPT-2 124M, T{args.seq_len}, {args.host_tokens} tokens per host per step, {args.cores} cores "
          f"x {args.core_tok_s:g} tok/s (T256) per host: compute {t_c:.2f} s per step; "
          f"{'ZeRO-1' if args.zero else 'replicated'}, 1 micro-batch")
    print("| hosts | Gbit/s | fp32: step s | fp32: efficiency | bf16: step s | bf16: efficiency |")
    print("| --- | --- | --- | --- | --- | --- |")
    for hosts in args.hosts:
        for gbit in args.rates:
            cells = []
            for wire in ("fp32", "bf16"):
                t = step_time(t_c, hosts, gbit, wire, zero=args.zero, threads=args.cores)
                cells += [f"{t:.2f}", f"{t_c / t:.0%}"]
            print(f"| {hosts} | {gbit:g} | " + " | ".join(cells) + " |")


def schemes(t_c: float, hosts: int, gbit: float, wire: str,
            args: argparse.Namespace) -> list[tuple[str, float, float]]:
    """(scheme, mean step seconds, bytes crossing hosts per step and host) for one wire format."""
    rows = [("step, replicated", step_time(t_c, hosts, gbit, wire, threads=args.cores),
             step_bytes(hosts, wire)),
            ("step, ZeRO-1", step_time(t_c, hosts, gbit, wire, zero=True, threads=args.cores),
             step_bytes(hosts, wire, zero=True))]
    for h in args.diloco_h:
        for overlap in (False, True):
            t = diloco_step(t_c, hosts, gbit, wire, h, args.cores, overlap, args.latency_ms / 1000,
                            args.idle_share)
            rows.append((f"DiLoCo H={h}{', overlapped' if overlap else ''}", t, step_bytes(hosts, wire) / h))
    return rows


def predict_diloco(args: argparse.Namespace) -> None:
    t_c = compute_time(args)
    _, update = diloco_sync(2, 1.0, "fp32", args.cores)
    print(f"\nSynchronous step beside DiLoCo (same hosts, compute {t_c:.2f} s per step; per outer sync: "
          f"update {1000 * update:.0f} ms, bf16 conversion {1000 * P * CONVERT_S / args.cores:.0f} ms, "
          f"latency {args.latency_ms:g} ms per ring step, link idle {args.idle_share:.0%} of inner steps). "
          "MB: crossing hosts per step and host")
    print("| hosts | Gbit/s | scheme | fp32: step s | fp32: efficiency | fp32: MB | "
          "bf16: step s | bf16: efficiency | bf16: MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for hosts in args.hosts:
        for gbit in args.rates:
            fp32 = schemes(t_c, hosts, gbit, "fp32", args)
            bf16 = schemes(t_c, hosts, gbit, "bf16", args)
            for (name, t32, b32), (_, t16, b16) in zip(fp32, bf16, strict=True):
                cells = [f"{t32:.2f}", f"{t_c / t32:.1%}", f"{b32 / 1e6:,.1f}",
                         f"{t16:.2f}", f"{t_c / t16:.1%}", f"{b16 / 1e6:,.1f}"]
                print(f"| {hosts} | {gbit:g} | {name} | " + " | ".join(cells) + " |")


def _ints(s: str) -> list[int]:
    if s == "none":
        return []
    values = [int(x) for x in s.split(",")]
    if any(v < 1 for v in values):
        raise ValueError(s)
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", nargs="*", default=[], help="bench_hosts.py --json results to compare with")
    p.add_argument("--core-tok-s", type=float, default=80.0,
                   help="GPT-2 T256 training tokens/s per core (default 80: this AMD EPYC, AVX2, fp32)")
    p.add_argument("--cores", type=int, default=32)
    p.add_argument("--host-tokens", type=int, default=8192,
                   help="tokens per host per step (default 8 x 1024)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--hosts", type=lambda s: [int(x) for x in s.split(",")], default=[4, 16])
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 10.0, 100.0])
    p.add_argument("--zero", action="store_true")
    p.add_argument("--diloco-h", type=_ints, default=[10, 50, 200],
                   help="DiLoCo inner steps per outer sync, comma-separated ('none': no DiLoCo table)")
    p.add_argument("--latency-ms", type=float, default=LATENCY_S * 1000,
                   help="one message's latency between hosts (default 0.05: a LAN; tens of ms between sites)")
    p.add_argument("--idle-share", type=float, default=1.0,
                   help="share of an inner step the link is free for an overlapped outer sync (default 1)")
    args = p.parse_args(argv)
    if not 0 <= args.idle_share <= 1 or args.latency_ms < 0:
        p.error("--idle-share must be in [0, 1] and --latency-ms >= 0")
    if args.check:
        try:
            check(args.check, args.latency_ms / 1000)
        except BadInput as e:
            print(f"scaling_model: {e}", file=sys.stderr)
            return 2
    else:
        predict(args)
        if args.diloco_h:
            predict_diloco(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
