"""sgemm (NumPy's OpenBLAS, MKL) against the bf16 gemms (oneDNN's dnnl_gemm_bf16bf16f32, MKL's
cblas_gemm_bf16bf16f32) on GPT-2's matmuls, as distgpt runs them.

    python benchmarks/bench_gemm.py [--threads 1,2] [--rows 1024] [--repeats 3] [--only qkv,head]
                                    [--sgemm numpy,mkl] [--bf16 onednn,mkl]

For each GPT-2 124M matmul at B*T = `rows` (the four linears and the tied head) and its two
backward products, plus a 4096^3 square: GFLOP/s of float32 sgemm per BLAS and of each bf16
gemm, the cost of rounding the activation operands to bf16 (what distgpt.ops pays per call
unless the activation is stored in bf16; weights are converted once per optimizer step, shown
apart), and each bf16 gemm with that conversion against the fastest sgemm. Operands have the
layouts distgpt passes (weights (in, out), transposed views for the backward products, the
head's (V, C) embedding), and rows are split over the threads as distgpt.ops does, each library
itself single-threaded. Libraries that are not installed are left out.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distgpt import bf16, blas, gemm16  # noqa: E402
from distgpt.cpu import this_cpu  # noqa: E402
from distgpt.threads import parallel_for, set_threads  # noqa: E402

C, V = 768, 50257
LINEARS = {"qkv": (C, 3 * C), "attn_proj": (C, C), "fc": (C, 4 * C), "mlp_proj": (4 * C, C)}


def cpu_line() -> str:
    cpu = this_cpu()
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in cpu.flags]
    return f"CPU: {cpu.model or platform.processor()}; flags: {' '.join(flags)}"


def split_rows(gemm: Callable, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """out = a @ b with out's rows split over the threads (distgpt.ops.matmul / weight_grad)."""
    parallel_for(a.shape[0], lambda lo, hi: gemm(a[lo:hi], b, out[lo:hi]), grain=64)


def best_time(fn: Callable[[], None], repeats: int) -> float:
    fn()                                                         # warm: page faults, MKL's first call
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def cases(rows: int, rng: np.random.Generator, only: set[str] | None):
    """(name, a, b, activations) per product: a @ b in fp32 operands, and which of a, b are
    activations (rounded per call) rather than weights (rounded once per step)."""
    f = lambda *s: rng.standard_normal(s, dtype=np.float32)     # noqa: E731
    for name, (k, n) in LINEARS.items():
        if only and name not in only:
            continue
        x, w, d = f(rows, k), f(k, n), f(rows, n)
        yield f"{name} fwd", x, w, (True, False)
        yield f"{name} dx", d, w.T, (True, False)
        yield f"{name} dW", x.T, d, (True, True)
    if not only or "head" in only:
        x, wte, g = f(rows, C), f(V, C), f(rows, V)
        yield "head fwd", x, wte.T, (True, False)
        yield "head dx", g, wte, (True, False)
        yield "head dwte", g.T, x, (True, True)
    if not only or "square" in only:
        yield "square 4096^3", f(4096, 4096), f(4096, 4096), (True, False)


def to_bf16_like(x: np.ndarray, out: np.ndarray) -> None:
    """Round x into out, keeping a transposed view's layout (a transposed activation is the
    transpose of a contiguous one in distgpt: round that, row-split over the threads)."""
    if x.flags.c_contiguous:
        bf16.to_bf16(x, out, parallel=True)
    else:
        bf16.to_bf16(x.T, out.T, parallel=True)


def bf16_buffer(x: np.ndarray) -> np.ndarray:
    return np.empty(x.shape, np.uint16) if x.flags.c_contiguous else np.empty(x.shape[::-1], np.uint16).T


def measure(name: str, a: np.ndarray, b: np.ndarray, acts: tuple[bool, bool], repeats: int,
            sgemms: dict[str, blas.Choice], bf16s: dict[str, gemm16.Choice]) -> list[str]:
    M, K = a.shape
    N = b.shape[1]
    flop = 2.0 * M * N * K
    out = np.empty((M, N), np.float32)
    a16, b16 = bf16_buffer(a), bf16_buffer(b)
    to_bf16_like(a, a16)
    to_bf16_like(b, b16)
    t32 = []
    for choice in sgemms.values():
        blas.use(choice)
        t32.append(best_time(lambda: split_rows(blas.gemm, a, b, out), repeats))
    t16 = []
    for choice16 in bf16s.values():
        gemm16.use(choice16)
        t16.append(best_time(lambda: split_rows(gemm16.gemm_bf16, a16, b16, out), repeats))
    act = [(x, x16) for x, x16, is_act in ((a, a16, acts[0]), (b, b16, acts[1])) if is_act]
    weight = [(x, x16) for x, x16, is_act in ((a, a16, acts[0]), (b, b16, acts[1])) if not is_act]
    t_act = best_time(lambda: [to_bf16_like(x, x16) for x, x16 in act], repeats) if act else 0.0
    t_w = best_time(lambda: [to_bf16_like(x, x16) for x, x16 in weight], repeats) if weight else 0.0
    g = lambda t: f"{flop / t / 1e9:8.0f}"                     # noqa: E731
    return [name, f"{M}x{K}x{N}", *map(g, t32), *map(g, t16), f"{t_act * 1e3:7.2f}", f"{t_w * 1e3:7.2f}",
            *(f"{min(t32) / t:5.2f}x / {min(t32) / (t + t_act):5.2f}x" for t in t16)]


def header(sgemms: list[str], bf16s: list[str]) -> list[str]:
    return ["product", "MxKxN", *(f"sgemm {lib} GF/s" for lib in sgemms),
            *(f"bf16 {lib} GF/s" for lib in bf16s),
            "act conv ms", "weight conv ms", *(f"{lib} / best sgemm (+act conv)" for lib in bf16s)]


def print_table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        cells = zip(r, widths, strict=True)
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(cells)))


def installed(sgemms: list[str], bf16s: list[str]) -> tuple[dict[str, blas.Choice], dict[str, gemm16.Choice]]:
    """The named libraries that load, each kind through its own loader (blas.load, gemm16.load; a bf16
    gemm that is not fast on this CPU is measured all the same)."""
    def loadable(kind: str, names: list[str], load) -> dict:
        have = {}
        for lib in names:
            try:
                have[lib] = load(lib)
            except blas.BlasError as exc:
                print(f"left out: {kind} {lib}: {exc}", file=sys.stderr)
        return have
    return (loadable("sgemm", sgemms, blas.load),
            loadable("bf16", bf16s, lambda lib: gemm16.load(lib, emulated=True)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2", help="thread counts to measure, comma-separated")
    p.add_argument("--rows", type=int, default=1024, help="B*T rows of the activations")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (the best is kept)")
    p.add_argument("--only", help="subset: qkv,attn_proj,fc,mlp_proj,head,square")
    p.add_argument("--sgemm", default="numpy,mkl", help="sgemm libraries (DISTGPT_BLAS values)")
    p.add_argument("--bf16", default="onednn,mkl", help="bf16 gemm libraries (DISTGPT_BF16_GEMM values)")
    args = p.parse_args(argv)
    sgemms, bf16s = installed(args.sgemm.split(","), args.bf16.split(","))
    if not sgemms or not bf16s:
        print("nothing to compare", file=sys.stderr)
        return 2
    print(cpu_line())
    previous, previous16 = blas.use(None), gemm16.use(None)     # put back at the end
    limiter = threadpool_limits(limits=1)        # as distgpt.threads.setup: OpenBLAS single-threaded too
    only = set(args.only.split(",")) if args.only else None
    for threads in (int(t) for t in args.threads.split(",")):
        set_threads(threads)
        print(f"\n{threads} thread(s), rows split over them, each library single-threaded")
        rng = np.random.default_rng(0)
        print_table(header(list(sgemms), list(bf16s)), [measure(name, a, b, acts, args.repeats, sgemms, bf16s)
                                            for name, a, b, acts in cases(args.rows, rng, only)])
    set_threads(1)
    limiter.unregister()
    blas.use(previous)
    gemm16.use(previous16)
    return 0


if __name__ == "__main__":
    sys.exit(main())
