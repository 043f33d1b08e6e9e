"""Data parallelism: the communicator, the gradient reducers, and the watchdog over both.

- comm.py: `Comm`, one interface for a single process (every collective the identity) and for MPI
  through mpi4py (`MPIComm`, when an MPI launcher started the process); `init()` picks.
- reducers.py: the `Reducer` protocol and its three implementations, which sum the flat gradient
  buffer over the ranks and own the flat buffers (shared memory has to be allocated through MPI):
  SharedMemoryReducer (every rank on one node: each rank sums its slice of all the ranks' buffers),
  HierarchicalReducer (several nodes with several ranks each: shared memory within a node, then MPI
  within columns of equal local rank), GradReducer (otherwise: MPI on buckets of whole layers, while
  the last backward runs, with a comm thread; gradients may travel as bf16).
- buckets.py: GradReducer's bucket arithmetic, plain functions.
- policy.py: `make_reducer`, the choice between the three (parallel.reduce).
- watchdog.py: the `Watchdog` that ends a rank stuck in a collective; the names shared with the
  training loop (`Phase`, `STOP_SIGNALS`, `TIMEOUT_EXIT`).
"""

from distgpt.dist.buckets import BucketSpan, bucket_bounds, bucket_parts
from distgpt.dist.comm import launch_rank, Column, Comm, MPIComm, init, launched_by_mpi
from distgpt.dist.policy import make_reducer
from distgpt.dist.reducers import GradReducer, HierarchicalReducer, Reducer, SharedMemoryReducer
from distgpt.dist.watchdog import INTERRUPT_EXIT, STOP_SIGNALS, TIMEOUT_EXIT, Phase, Watchdog

__all__ = [
    "INTERRUPT_EXIT", "STOP_SIGNALS", "TIMEOUT_EXIT", "BucketSpan", "Column", "Comm", "GradReducer",
    "HierarchicalReducer", "MPIComm", "Phase", "Reducer", "SharedMemoryReducer", "Watchdog", "bucket_bounds", "bucket_parts",
    "init", "launch_rank", "launched_by_mpi", "make_reducer",
]
