"""The hierarchical gradient sum (shared memory on each node, then MPI within columns of equal
local rank) on one machine: MPICH's MPIR_CVAR_NUM_CLIQUES makes its ranks look like several nodes,
so the node sums and the column collectives run without simulated hosts (tests/test_multihost.py
has those, where network namespaces can be made)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MPIRUN, cli_env


@pytest.mark.mpi
@pytest.mark.parametrize("ranks, nodes", [(4, 2), (6, 2), (6, 3)])
def test_hierarchical_reducer_sums_every_slice_on_every_node(ranks, nodes):
    worker = Path(__file__).with_name("hierarchical_worker.py")
    r = subprocess.run([str(MPIRUN), "-n", str(ranks), sys.executable, str(worker)], capture_output=True,
                       text=True, timeout=120, env=cli_env(MPIR_CVAR_NUM_CLIQUES=str(nodes)))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(" ok") == ranks
