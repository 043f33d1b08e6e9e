"""The choice of gradient reducer (parallel.reduce) and of where the flat buffers live."""

from __future__ import annotations

import warnings

import numpy as np

from distgpt.dist.comm import Comm
from distgpt.dist.reducers import GradReducer, HierarchicalReducer, Reducer, SharedMemoryReducer
from distgpt.partition import Partition


def make_reducer(comm: Comm, partition: Partition, layer_ranges: list[tuple[int, int]], params: np.ndarray,
                 bucket_bytes: int, method: str, wire: str = "fp32", comm_thread: bool = True,
                 token_table: tuple[int, int] | None = None) -> Reducer:
    """The gradient reducer for `method` (parallel.reduce), holding the flat buffers: auto picks
    shared memory when every rank is on one node and there is more than one rank; on several
    nodes with several ranks each, shared memory within nodes and MPI between them
    (HierarchicalReducer); otherwise GradReducer's bucketed MPI sum (collectives at 2 ranks, point
    to point from 3). `params` is this rank's initial parameter vector; under ZeRO-1 on one node it
    is copied (rank 0's) into one shared buffer, otherwise it is used as it is."""
    if method in ("auto", "shared_memory") and comm.size > 1:
        buffers, why_not = comm.shared_buffers(params.size, params.dtype)
        if buffers is not None:
            shared = None
            if partition.zero:
                # ZeRO-1: each rank updates only its slice, so one copy of the parameters can serve
                # the whole node, and the allgather after the update is just a barrier
                shared, why_not = comm.shared_buffers(params.size, params.dtype, per_rank=False)
                if shared is None and comm.rank == 0:
                    warnings.warn(f"parameters not shared between ranks: {why_not}", stacklevel=2)
            if shared is None:
                return SharedMemoryReducer(comm, partition, buffers, params, shares_params=False)
            if comm.rank == 0:
                shared[0][:] = params
            comm.shared_barrier()
            return SharedMemoryReducer(comm, partition, buffers, shared[0], shares_params=True)
        if method == "shared_memory":
            raise RuntimeError(f"parallel.reduce = shared_memory is not possible: {why_not} "
                               f"(use auto or mpi)")
        if comm.n_nodes == 1 and comm.rank == 0:
            warnings.warn(f"gradient sum through MPI, not shared memory: {why_not}", stacklevel=2)
    # several nodes with several ranks each (the same on every node, a fact all ranks agree on)
    if method == "auto" and comm.n_nodes > 1 and comm.local_size > 1 and comm.same_ranks_per_node:
        buffers, why_not = comm.node_buffers(params.size, params.dtype)
        if buffers is not None:
            return HierarchicalReducer(comm, partition, buffers, params)
        if comm.rank == 0:
            warnings.warn(f"gradient sum through MPI only, not shared memory first: {why_not}", stacklevel=2)
    return GradReducer(comm, partition, layer_ranges, params, bucket_bytes, wire, comm_thread, token_table)
