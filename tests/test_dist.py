"""Data-parallel training over real mpirun: the same numbers on any number of ranks, and a failing
rank takes the job down quickly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from distgpt import dist
from distgpt.checkpoint import read_params
from distgpt.partition import Partition, even_ranges
from distgpt.trainer import check_params_agree

from conftest import MPIRUN, bf16_env, read_metrics, rel, run_cli, tiny_config

# (ranks, micro_batch_size, zero, reduce): global batch 12 -> accumulation 12 / (micro x ranks).
# reduce "auto" is the shared-memory reducer here (one node); "mpi" the bucketed collectives.
LAYOUTS = [(1, 12, False, "auto"), (1, 4, False, "auto"), (2, 6, False, "auto"), (2, 2, False, "auto"),
           (3, 4, False, "auto"), (3, 2, False, "auto"), (2, 2, True, "auto"), (3, 4, True, "auto"),
           (3, 2, True, "auto"), (2, 2, False, "mpi"), (3, 4, False, "mpi"), (3, 2, True, "mpi")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shakespeare_bytes):
    return _train(tmp_path_factory.mktemp("ref"), shakespeare_bytes, *LAYOUTS[0])


def _train(tmp_path, data_dir, ranks, micro, zero, reduce, precision="fp32", env=None, sections=None,
           **parallel):
    cfg = tiny_config(tmp_path, data_dir, train={"micro_batch_size": micro, "max_steps": 5, "eval_every": 5,
                                                 "precision": precision},
                      parallel={"zero": zero, "reduce": reduce, "check_every": 1,  # ranks agree, every step
                                "bucket_mb": 0.01, **parallel},     # mpi: small buckets, several in flight
                      **(sections or {}))
    r = run_cli("train", "--config", str(cfg), ranks=ranks if ranks > 1 else 0, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    (tmp_path / "stdout.txt").write_text(r.stdout)
    rows = read_metrics(tmp_path / "out")
    _, params = read_params(tmp_path / "out")
    vals = [row["val_loss"] for row in rows if "val_loss" in row]      # at step 0 and at the end
    return [row["train_loss"] for row in rows if "train_loss" in row], vals, params


@pytest.mark.mpi
@pytest.mark.parametrize("ranks, micro, zero, reduce", LAYOUTS[1:])
def test_world_size_invariance(tmp_path, shakespeare_bytes, reference, ranks, micro, zero, reduce):
    ref_losses, ref_val, ref_params = reference
    losses, val, params = _train(tmp_path, shakespeare_bytes, ranks, micro, zero, reduce)
    assert len(losses) == 5
    if ranks > 1:
        summary = (tmp_path / "stdout.txt").read_text()
        assert ("gradient sum: shared memory" in summary) == (reduce == "auto")
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert len(val) == 2
    np.testing.assert_allclose(val, ref_val, rtol=1e-6)
    assert np.linalg.norm(params - ref_params) <= 1e-5 * np.linalg.norm(ref_params)


@pytest.mark.mpi
@pytest.mark.parametrize("ranks, micro, zero", [(2, 2, False), (3, 4, True)])
def test_world_size_invariance_without_the_comm_thread(tmp_path, shakespeare_bytes, reference, ranks, micro,
                                                       zero):
    ref_losses, _, ref_params = reference
    losses, _, params = _train(tmp_path, shakespeare_bytes, ranks, micro, zero, "mpi", comm_thread=False)
    assert "comm thread" not in (tmp_path / "stdout.txt").read_text()
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert np.linalg.norm(params - ref_params) <= 1e-5 * np.linalg.norm(ref_params)


@pytest.mark.mpi
@pytest.mark.parametrize("ranks, micro, zero, thread", [(2, 2, False, True), (3, 4, True, True),
                                                        (3, 2, False, False)])
def test_bf16_on_the_wire_trains_like_fp32(tmp_path, shakespeare_bytes, reference, ranks, micro, zero,
                                           thread):
    """Gradients rounded to bf16 for the network change the sums by ~0.4% at most (8 mantissa
    bits): the losses stay within 1e-3 of fp32's, and every rank applies the same update (the
    parameter check runs every step, and a difference would end the run)."""
    ref_losses, ref_val, ref_params = reference
    losses, val, params = _train(tmp_path, shakespeare_bytes, ranks, micro, zero, "mpi", grad_wire="bf16",
                                 comm_thread=thread)
    assert "bf16 on the wire" in (tmp_path / "stdout.txt").read_text()
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-3)
    np.testing.assert_allclose(val, ref_val, rtol=1e-3)
    assert 0 < np.linalg.norm(params - ref_params) <= 1e-2 * np.linalg.norm(ref_params)


def _bf16_start(folder: Path, ulp: int) -> Path:
    """The tiny model's scratch initialisation as a Hugging Face folder (init_from), every nonzero
    parameter moved `ulp` float32 ulps (0: unchanged)."""
    from distgpt.config import ModelConfig
    from distgpt.model import Layout, init_params
    from distgpt.weights import save_hf

    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=257, vocab_multiple=1)
    params = np.zeros(Layout(cfg).size, np.float32)
    init_params(Layout(cfg), params, 1337)
    if ulp:
        params = np.where(params != 0, np.nextafter(params, np.float32(np.inf * ulp)), params)
    folder.mkdir(parents=True)
    save_hf(folder, cfg, params.astype(np.float32))
    return folder


@pytest.mark.mpi
def test_world_size_invariance_in_bf16(tmp_path, shakespeare_bytes):
    """What the number of ranks may change in bf16, and by how much.

    Step 1 is invariant up to float32 summation order: every row's matmul inputs are rounded to
    bf16 alike however the rows are split, so the loss, the gradient norm and the updated
    parameters differ only through the order in which ranks and micro-batches are summed: k float32
    terms carry a relative rounding error below k x 2^-24 (4e-7 for k = 6), so 1e-6 holds.

    Later steps are not: a last-bit difference in an fp32 master weight can flip its bf16 rounding,
    a 2^-8 relative change that grows over the steps, whatever caused the last-bit difference. The
    yardstick is therefore of the same nature: two 1-rank runs whose starting parameters differ by
    one float32 ulp. After 5 steps 1, 2 and 3 ranks, with and without ZeRO-1 and accumulation, are no
    farther from the 1-rank run than that (measured on a Zen 4 through oneDNN: layouts 1.1e-4, the
    yardstick 3.8e-4; through MKL's bf16 gemm 0.6-1.0e-4 against 3.7e-4). A rank whose slice of the
    node's shared bf16 copy were stale would multiply with weights a step or more old, a change of
    about lr / |w| (5%) on that slice: far beyond the yardstick."""
    env = bf16_env()
    start, nudged = _bf16_start(tmp_path / "init", 0), _bf16_start(tmp_path / "init_nudged", 1)

    def run(name: str, ranks: int, micro: int, zero: bool, reduce: str, init: Path):
        run_dir = tmp_path / name
        run_dir.mkdir()
        losses, _, params = _train(run_dir, shakespeare_bytes, ranks, micro, zero, reduce, "bf16", env,
                                   {"init_from": str(init), "checkpoint": {"every": 1, "keep": 5}})
        rows = read_metrics(run_dir / "out")
        _, first = read_params(run_dir / "out" / "ckpt" / "step_0000001")
        return {"loss": losses, "norm1": rows[1]["grad_norm"], "params1": first, "params": params}

    ref = run("ref", 1, 12, False, "auto", start)
    yardstick = rel(run("nudged", 1, 12, False, "auto", nudged)["params"], ref["params"])
    layouts = {"2-2-zero": (2, 2, True, "auto"), "3-4": (3, 4, False, "auto"),
               "3-2-zero-mpi": (3, 2, True, "mpi")}
    for name, layout in layouts.items():
        got = run(name, *layout, start)
        assert got["loss"][0] == pytest.approx(ref["loss"][0], rel=1e-6), name
        assert got["norm1"] == pytest.approx(ref["norm1"], rel=1e-6), name
        assert rel(got["params1"], ref["params1"]) <= 1e-6, name
        distance = rel(got["params"], ref["params"])
        assert distance <= yardstick, f"{name}: {distance:.3g} from 1 rank, a 1-ulp start: {yardstick:.3g}"
    shared = (tmp_path / "2-2-zero" / "stdout.txt").read_text()     # ZeRO-1 on one node
    assert "bf16 weights: one copy per node, each rank converting its slice" in shared
    private = (tmp_path / "3-4" / "stdout.txt").read_text()
    assert "one copy per node" not in private
    # each step, rank 0 converts its slice of the shared copy (about half of it), not the whole copy
    # once more in its first forward; a private copy is remade whole by the next pass
    counted = r"rank 0 converted ([\d,]+) elements per step, the copy holds ([\d,]+)"
    done, whole = (int(v.replace(",", "")) for v in re.search(counted, shared).groups())
    assert 0.4 * whole < done < 0.6 * whole
    done, whole = (int(v.replace(",", "")) for v in re.search(counted, private).groups())
    assert done == whole


@pytest.mark.mpi
@pytest.mark.parametrize("how, rank", [("raise", 1), ("raise", 0), ("kill", 1)])
def test_failing_rank_brings_job_down(tmp_path, shakespeare_bytes, how, rank):
    cfg = tiny_config(tmp_path, shakespeare_bytes, train={"micro_batch_size": 6, "max_steps": 50})
    start = time.monotonic()
    fail = f"{rank}:2" + (":9" if how == "kill" else "")
    r = run_cli("train", "--config", str(cfg), ranks=2, timeout=60, env={"DISTGPT_FAIL_AT": fail})
    elapsed = time.monotonic() - start
    assert r.returncode != 0
    assert elapsed < 30
    if how == "raise":
        assert f"distgpt.train: rank {rank}: failed: RuntimeError: injected failure" in r.stderr


@pytest.mark.mpi
def test_auto_threads_share_the_cores_between_ranks(tmp_path, shakespeare_bytes):
    cfg = tiny_config(tmp_path, shakespeare_bytes, train={"micro_batch_size": 6, "max_steps": 1})
    r = run_cli("train", "--config", str(cfg), ranks=2, timeout=60)
    assert r.returncode == 0, r.stderr
    per_rank = max(1, (os.cpu_count() or 1) // 2)
    assert f"ranks: 2 on 1 node(s), 2 per node; threads per rank: {per_rank}" in r.stdout
    assert "MPI: MPICH" in r.stdout or "MPI: Open MPI" in r.stdout


@pytest.mark.mpi
def test_oversubscription_warns(tmp_path, shakespeare_bytes):
    cfg = tiny_config(tmp_path, shakespeare_bytes, train={"micro_batch_size": 6, "max_steps": 1})
    threads = f"parallel.threads_per_rank={os.cpu_count()}"
    r = run_cli("train", "--config", str(cfg), threads, ranks=2, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "warning: 2 ranks x" in r.stdout


class _DisagreeingComm(dist.Comm):
    size = 3

    def allgather_obj(self, obj):
        return [obj, obj + 1, obj]


def test_parameter_mismatch_across_ranks_is_an_error():
    params = np.ones(10, np.float32)
    check_params_agree(dist.Comm(), params, 0)
    with pytest.raises(RuntimeError, match=r"parameters differ across ranks at step 7: ranks \[1\]"):
        check_params_agree(_DisagreeingComm(), params, 7)


def test_partition_ranges_tile_the_vector_evenly():
    for n in (1, 7, 1000, 1003):
        for world in (1, 2, 3, 4):
            ranges = even_ranges(n, world)
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
            assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1
            for rank in range(world):
                zero, replicated = Partition(n, world, rank, zero=True), Partition(n, world, rank)
                assert zero.owned == replicated.owned == ranges[rank]
                assert zero.updated == ranges[rank] and replicated.updated == (0, n)


def test_partition_refuses_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank 3 is outside 0..2"):
        Partition(10, 3, 3)


def test_single_process_without_mpi(tmp_path, shakespeare_bytes):
    cfg = tiny_config(tmp_path, shakespeare_bytes, train={"max_steps": 2})
    r = run_cli("train", "--config", str(cfg), env={"DISTGPT_NO_MPI": "1"})
    assert r.returncode == 0, r.stderr
    assert "MPI: none (single process)" in r.stdout


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_both_gradient_reducers_sum_every_slice_in_both_modes(ranks):
    worker = Path(__file__).with_name("reducer_worker.py")
    r = subprocess.run([str(MPIRUN), "-n", str(ranks), sys.executable, str(worker)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(" ok") == ranks
