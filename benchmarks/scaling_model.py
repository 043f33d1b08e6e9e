"""Step time and efficiency of data-parallel GPT-2 training on N hosts, from compute rate and bytes moved.

    python benchmarks/scaling_model.py [--check bench_hosts.json ...] [--core-tok-s 80] [--cores 32]
        [--host-tokens 8192] [--seq-len 1024] [--hosts 4,16] [--rates 1,10,100]

The model (GradReducer with the comm thread, replicated unless --zero):
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

--check compares the model with bench_hosts.py results (its --json): t_c and the backward share are
taken from that run's one-host case, so only the network part is predicted. Without --check, it
predicts hosts of --cores cores at --core-tok-s tokens/s per core (this machine's measured rate).
"""

from __future__ import annotations

import argparse
import json
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


def flops_per_token(seq_len: int) -> float:
    return 6 * P + 12 * L * seq_len * C         # parameters' matmuls, and attention's


def step_time(t_c: float, hosts: int, gbit: float, wire: str, micro: int = 1, zero: bool = False,
              backward_share: float = BACKWARD_SHARE, threads: int = 1) -> float:
    if hosts == 1:
        return t_c
    w = 4 if wire == "fp32" else 2
    rate = gbit * 1e9 / 8 * TCP
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


def check(paths: list[str]) -> None:
    print("| case | micro-batches | grad_wire | measured ms | model ms | model / measured |")
    print("| --- | --- | --- | --- | --- | --- |")
    for path in paths:
        rows = json.loads(Path(path).read_text())
        base = {r["micro"]: r for r in rows if r["case"] == "one host"}
        for r in rows:
            if r["case"] == "one host":
                continue
            one = base[r["micro"]]
            split = one["split"]
            share = split["backward"] / max(1e-9, split["forward"] + split["backward"] + split["optim"])
            hosts, rate = int(r["case"].split()[0]), r["case"].split()[-1]
            gbit = float(rate.removesuffix("gbit")) if rate.endswith("gbit") else 40.0
            model = 1000 * step_time(one["ms_per_step"] / 1000, hosts, gbit, r["wire"], r["micro"],
                                     r["zero"], share)
            print(f"| {r['case']} | {r['micro']} | {r['wire']} | {r['ms_per_step']:.0f} | {model:.0f} | "
                  f"{model / r['ms_per_step']:.2f} |")


def predict(args: argparse.Namespace) -> None:
    t_c = args.host_tokens * flops_per_token(args.seq_len) / (
        args.cores * args.core_tok_s * flops_per_token(256))      # the rate was measured at T256
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
    args = p.parse_args(argv)
    if args.check:
        check(args.check)
    else:
        predict(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
