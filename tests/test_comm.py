"""The communicator's one interface (distgpt/dist/comm.py), the reducers' protocol and the watchdog's
shared names, without mpirun: the single-process Comm has every member MPIComm has (so no caller
asks which one it holds), each reducer has every member of Reducer, and the identity collectives
of one process are the identity."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from distgpt import dist, switches
from distgpt.dist.comm import _MPIColumn
from distgpt.partition import Partition


def _public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_")}


@pytest.mark.parametrize("interface, mpi", [(dist.Comm, dist.MPIComm), (dist.Column, _MPIColumn)])
def test_the_single_process_side_has_every_method_of_the_mpi_side(interface, mpi):
    ours, theirs = _public_methods(interface), _public_methods(mpi)
    assert sorted(set(theirs) - set(ours)) == []
    for name, sig in theirs.items():
        mine = ours[name].parameters
        assert list(sig.parameters) == list(mine), name
        assert [p.default for p in sig.parameters.values()] == [p.default for p in mine.values()], name


def test_the_single_process_comm_has_every_attribute_of_an_mpi_comm():
    """MPIComm's attributes are set when MPI starts, so they are read from a real one (a singleton
    MPI process, no launcher needed)."""
    code = ("import json; from distgpt.dist import MPIComm; c = MPIComm(); col = c.column(); "
            "print(json.dumps([sorted(vars(c)), sorted(vars(col))]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    comm_attrs, column_attrs = json.loads(r.stdout.splitlines()[-1])
    solo, solo_column = dist.Comm(), dist.Comm().column()
    assert [a for a in comm_attrs if not a.startswith("_") and not hasattr(solo, a)] == []
    assert [a for a in column_attrs if not a.startswith("_") and not hasattr(solo_column, a)] == []
    assert {"rank", "size", "local_rank", "threads_ok", "same_ranks_per_node"} <= set(comm_attrs)


def test_one_process_collectives_are_the_identity():
    comm = dist.Comm()
    buf = np.arange(6, dtype=np.float32)
    assert comm.allreduce_(buf) is buf and np.array_equal(buf, np.arange(6))
    assert comm.bcast_obj({"a": 1}) == {"a": 1} and comm.allgather_obj(3) == [3]
    recv = np.zeros((1, 6), np.float32)
    comm.allgather_(buf, recv)
    assert np.array_equal(recv[0], buf)
    out = np.zeros(6, np.float32)
    assert comm.start_reduce_scatter(buf, out, [6]) is None and np.array_equal(out, buf)
    assert comm.start_allreduce(buf) is None
    requests = comm.start_exchange([], [], tag=0)
    assert requests == [] and comm.test_all(requests)
    comm.wait_all(requests)
    for buffers, why in (comm.shared_buffers(6, np.float32), comm.node_buffers(6, np.float32)):
        assert buffers is None and "single process" in why
    column = comm.column()
    assert (column.members, column.rank, column.size) == ([0], 0, 1)
    out[:] = 0
    column.reduce_scatter_(buf, out, [6])
    column.allgatherv_(out, [(0, 6)])
    assert np.array_equal(out, buf)
    with comm.watch(dist.Phase.GRADIENT_SUM, 0):     # no watchdog: nothing to mark
        comm.barrier()
        comm.shared_barrier()
        comm.node_barrier()


def test_one_process_cannot_name_another_rank():
    with pytest.raises(ValueError, match=r"ranks \[1\]"):
        dist.Comm().start_exchange([(1, np.zeros(2))], [], tag=0)


def test_no_mpi_switch_overrides_the_launcher(monkeypatch):
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.delenv("DISTGPT_NO_MPI", raising=False)
    assert dist.launched_by_mpi()
    monkeypatch.setenv("DISTGPT_NO_MPI", "1")
    assert not dist.launched_by_mpi() and type(dist.init()) is dist.Comm
    monkeypatch.setenv("DISTGPT_NO_MPI", "yes")
    with pytest.raises(switches.SwitchError, match="DISTGPT_NO_MPI='yes': expected one of 0, 1"):
        dist.launched_by_mpi()


# ----------------------------------------------------------------------------- the reducers' protocol

N = 40


def _reducers(comm: dist.Comm, zero: bool) -> list:
    part = Partition(N, comm.size, comm.rank, zero)
    params = np.zeros(N, np.float32)
    buffers = [np.zeros(N, np.float32) for _ in range(comm.size)]
    return [dist.GradReducer(comm, part, [(10, 20), (20, 30)], params, 1, token_table=(2, 5)),
            dist.SharedMemoryReducer(comm, part, buffers, params, shares_params=False),
            dist.HierarchicalReducer(comm, part, buffers, params)]


def test_every_reducer_has_every_member_of_the_protocol():
    methods = {name for name, fn in vars(dist.Reducer).items() if inspect.isfunction(fn)}
    members = set(dist.Reducer.__annotations__) | {name for name in methods if not name.startswith("_")}
    assert {"hooks", "finish", "norm_sq_contribution", "norm_sq", "allgather_params"} <= members
    for red in _reducers(dist.Comm(), zero=False):
        assert [m for m in sorted(members) if not hasattr(red, m)] == [], type(red).__name__


class _Rank1Of2(dist.Comm):
    """Rank 1 of two on one node, without MPI: as much as the reducers' constructors ask."""

    rank, size, local_rank, local_size = 1, 2, 1, 2

    def allgather_obj(self, obj):
        return [0, obj]          # (only ever asked for the local ranks)


def test_only_the_mpi_reducer_of_several_ranks_hands_backward_its_hooks():
    assert [red.hooks for red in _reducers(dist.Comm(), zero=False)] == [None, None, None]
    mpi, shared, hierarchical = _reducers(_Rank1Of2(), zero=True)
    assert mpi.hooks is mpi and shared.hooks is None and hierarchical.hooks is None


@pytest.mark.parametrize("zero", [False, True])
def test_the_norm_pieces_give_the_squared_norm_of_the_sum(zero):
    """Replicated, every rank holds the whole sum and contributes nothing to the statistics
    allreduce; under ZeRO-1 its slice's squares are its term (here the only rank's: the sum)."""
    red = _reducers(dist.Comm(), zero)[0]
    red.grads[:] = np.arange(N, dtype=np.float32) / 7
    red.finish()
    want = float(np.dot(red.grads, red.grads))
    contribution = red.norm_sq_contribution()
    assert contribution == (want if zero else 0.0)
    assert red.norm_sq(contribution) == want


# ----------------------------------------------------------------------------- the watchdog's names

def _watchdog(timeout_s: float, **kw):
    lines: list[str] = []
    codes: list[int] = []
    stream = type("S", (), {"write": lambda self, s: lines.append(s), "flush": lambda self: None})()
    return dist.Watchdog(0, 2, timeout_s, stream=stream, exit_fn=codes.append, **kw), lines, codes


def _until(cond, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_the_watchdog_speaks_with_the_programs_prefix():
    dog, lines, codes = _watchdog(0.2, prefix="distgpt.bench")
    try:
        with dog.watch(dist.Phase.EVALUATION, 4):
            _until(lambda: codes, 5.0)
    finally:
        dog.stop()
    assert codes == [dist.TIMEOUT_EXIT]
    text = "".join(lines)
    assert "distgpt.bench: error: rank 0: step 4: timed out after 0 s in evaluation" in text
    assert "distgpt.train" not in text


def test_a_stop_signal_spares_the_checkpoint_save_but_not_a_stuck_collective():
    """grace = timeout/4 = 1 s: 1.6 s in the save after the signal stays alive; the next collective
    is ended, code 143, within about the grace."""
    previous = signal.signal(dist.STOP_SIGNALS[-1], lambda *_: None)    # the StopFlag's place
    dog, lines, codes = _watchdog(4.0)
    try:
        with dog.watch(dist.Phase.CHECKPOINT_SAVE, 9):
            os.kill(os.getpid(), dist.STOP_SIGNALS[-1])
            time.sleep(1.6)
        assert codes == []
        with dog.watch(dist.Phase.GRADIENT_SUM, 10):
            _until(lambda: codes, 3.0)
    finally:
        dog.stop()
        signal.signal(dist.STOP_SIGNALS[-1], previous)
    assert codes == [143]
    assert "step 10: stop signal while stuck for 1 s in gradient sum" in "".join(lines)


def test_a_second_ctrl_c_ends_a_rank_stuck_in_any_collective_at_once():
    """Ctrl-C is a stop signal to the watchdog too (exit code 130); the second one does not wait for
    the grace period (1 s here), not even in the checkpoint save."""
    previous = signal.signal(signal.SIGINT, lambda *_: None)              # the StopFlag's place
    dog, lines, codes = _watchdog(4.0)
    try:
        with dog.watch(dist.Phase.CHECKPOINT_SAVE, 3):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.3)
            assert codes == []                      # the first one waits for the step boundary
            start = time.monotonic()
            os.kill(os.getpid(), signal.SIGINT)
            _until(lambda: codes, 3.0)
            elapsed = time.monotonic() - start
    finally:
        dog.stop()
        signal.signal(signal.SIGINT, previous)
    assert codes == [dist.INTERRUPT_EXIT] and elapsed < 0.9
    assert "step 3: stop signal while stuck" in "".join(lines)
