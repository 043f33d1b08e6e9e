"""A rank's threads: how many it gets (the policy) and the pool that runs the kernels on them.

Each core should run exactly one busy thread. A rank therefore gets its share of its node's cores
(or the cores its launcher bound it to), runs that many threads of its own through `parallel_for`,
and holds BLAS and OpenMP to one thread inside each of them: an idle BLAS worker pool spinning
against ours would only steal cycles. NumPy ufuncs and BLAS calls release the GIL, so the threads
run in parallel.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

_pool: ThreadPoolExecutor | None = None
_n_threads = 1


def set_threads(n: int) -> None:
    """Use n threads (this one and n - 1 workers) for parallel_for."""
    global _pool, _n_threads
    if _pool is not None:
        _pool.shutdown()
        _pool = None
    _n_threads = max(1, int(n))
    if _n_threads > 1:
        _pool = ThreadPoolExecutor(_n_threads - 1, thread_name_prefix="distgpt-ops")


def n_threads() -> int:
    return _n_threads


def parallel_for(n: int, fn: Callable[[int, int], None], grain: int = 1) -> None:
    """fn(lo, hi) over a split of range(n) into one contiguous part per thread (parts of at least
    `grain` items: tiny work is not worth a thread hand-off)."""
    parts = min(_n_threads, n // max(1, grain))
    if parts <= 1:
        fn(0, n)
        return
    bounds = [n * i // parts for i in range(parts + 1)]
    futures = [_pool.submit(fn, bounds[i], bounds[i + 1]) for i in range(1, parts)]
    fn(bounds[0], bounds[1])
    for f in futures:
        f.result()


@dataclass
class ThreadSetup:
    threads: int
    blas: str            # the BLAS libraries NumPy loaded, as threadpoolctl names them
    oversubscribed: bool
    limiter: object      # keeps the threadpoolctl limit alive


def setup(ranks_on_node: int, threads_per_rank: int | str) -> ThreadSetup:
    """Give this rank its share of its node's cores and start that many kernel threads."""
    from threadpoolctl import threadpool_info, threadpool_limits

    cores = os.cpu_count() or 1
    bound = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    if threads_per_rank == "auto":
        # a launcher that bound this rank to some cores has already chosen for us
        threads = bound if bound < cores else max(1, cores // ranks_on_node)
    else:
        threads = int(threads_per_rank)
    oversubscribed = threads * ranks_on_node > cores
    limiter = threadpool_limits(limits=1)
    os.environ["OMP_NUM_THREADS"] = "1"
    set_threads(threads)
    blas = ", ".join(sorted({f"{i.get('internal_api')} {i.get('version') or ''}".strip()
                             for i in threadpool_info() if i.get("user_api") == "blas"})) or "unknown"
    return ThreadSetup(threads, blas, oversubscribed, limiter)
