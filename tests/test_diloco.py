"""DiLoCo (parallel.sync = diloco, distgpt/diloco.py): hosts that train alone for inner_steps steps,
then agree through an outer SGD-Nesterov step on the averaged pseudo-gradient.

The outer optimizer against torch.optim.SGD; one host with outer lr 1 and no momentum against
synchronous training; on simulated hosts (network namespaces, tests/hosts.py): the parameter check
within each host at every step and across hosts after every sync, the live outer step against a
NumPy transcription of the paper's update on the states it read, exact resume across a sync, the
documented rule for resuming on another number of hosts, and a link lost during a sync."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import hosts as simhosts
import numpy as np
import pytest
from test_multihost import TIMEOUT_S, TRAIN, _env, _fail_stuck, _run, _two_hosts

from distgpt import dist
from distgpt.checkpoint import list_checkpoints, load_worker_state, read_params
from distgpt.config import ConfigError, load_config
from distgpt.diloco import outer_update, sync_steps, wire_bytes
from distgpt.model import Layout
from distgpt.partition import Partition

from conftest import read_metrics, run_cli, tiny_config

HERE = Path(__file__).resolve().parent
H = 3                          # inner steps: syncs at steps 3, 6 and (max_steps) 8
STEPS = 8
DILOCO = ("parallel.sync=diloco", f"parallel.diloco.inner_steps={H}")


@pytest.fixture(scope="module")
def hosts():
    yield from _two_hosts()


def _losses(out: Path) -> dict[int, float]:
    return {row["step"]: row["train_loss"] for row in read_metrics(out) if "train_loss" in row}


def _rows(ckpt: Path) -> dict[int, np.ndarray]:
    """worker -> its full (rows, n) state, assembled from the shard files of one checkpoint."""
    import json

    manifest = json.loads((ckpt / "manifest.json").read_text())
    parts: dict[int, list] = {}
    for rec in sorted(manifest["shards"], key=lambda r: (r.get("worker", 0), r["start"])):
        parts.setdefault(rec.get("worker", 0), []).append(np.load(ckpt / rec["file"]))
    return {k: np.concatenate([p[:3] for p in v], axis=1) if k else np.concatenate(v, axis=1)
            for k, v in parts.items()}


# ----------------------------------------------------------------------------- the outer optimizer

@pytest.mark.parametrize("nesterov", [True, False])
def test_outer_update_is_torch_sgd_with_momentum_on_the_pseudo_gradient(nesterov):
    """torch.optim.SGD(momentum, nesterov, dampening 0) stepping the global parameters with the
    pseudo-gradient as their gradient, 3 steps. fp32 in both; the two compute the same three
    roundings per element in the same order, so 1 ulp of slack (2^-24 relative, ~6e-8) covers it,
    while a reversed sign or a lost momentum term is off by ~lr x |delta| ~ 1e-2."""
    import torch

    rng = np.random.default_rng(0)
    g = rng.standard_normal(1000).astype(np.float32)
    mom = np.zeros_like(g)
    ref = torch.nn.Parameter(torch.tensor(g))
    opt = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=nesterov)
    for _ in range(3):
        delta = (0.02 * rng.standard_normal(1000)).astype(np.float32)
        outer_update(g, mom, delta, 0.7, 0.9, nesterov)
        ref.grad = torch.tensor(delta)
        opt.step()
        np.testing.assert_allclose(g, ref.detach().numpy(), rtol=0, atol=4 * np.spacing(np.abs(g).max()))
    buf = opt.state[ref]["momentum_buffer"].numpy()
    np.testing.assert_allclose(mom, buf, rtol=1e-6, atol=1e-9)


def test_outer_lr_one_without_momentum_lands_on_the_workers_mean():
    rng = np.random.default_rng(1)
    g = rng.standard_normal(100).astype(np.float32)
    workers = [g - 0.01 * rng.standard_normal(100).astype(np.float32) for _ in range(3)]
    delta = sum(g - p for p in workers) / np.float32(3)
    outer_update(g, np.zeros_like(g), delta, 1.0, 0.0, True)
    np.testing.assert_allclose(g, np.mean(workers, axis=0), atol=1e-6)


def test_syncs_every_inner_steps_and_at_the_end():
    assert [s for s in range(1, 9) if sync_steps(s, 3, 8)] == [3, 6, 8]
    assert [s for s in range(1, 7) if sync_steps(s, 3, 6)] == [3, 6]


def test_wire_bytes_are_a_reduce_scatter_and_an_allgather():
    assert wire_bytes(1000, 1, "fp32") == 0
    assert wire_bytes(1000, 2, "fp32") == 4000         # half out, half of the sums back: 2 x 500 x 4
    assert wire_bytes(1000, 2, "bf16") == 2000
    assert wire_bytes(1200, 3, "fp32") == 2 * 2 * 400 * 4


@pytest.mark.parametrize("override, message", [
    ("parallel.sync=sometimes", "parallel.sync = 'sometimes': expected step or diloco"),
    ("parallel.diloco.inner_steps=0", "parallel.diloco.inner_steps = 0: expected a positive integer"),
    ("parallel.diloco.outer_lr=0", "parallel.diloco.outer_lr = 0.0: expected a number > 0"),
    ("parallel.diloco.outer_momentum=1", "parallel.diloco.outer_momentum = 1.0: expected a number in [0, 1)"),
    ("parallel.diloco.wire=fp16", "parallel.diloco.wire = 'fp16': expected fp32 or bf16"),
    ("parallel.diloco.inner_step=5", "unknown config key 'parallel.diloco.inner_step'; did you mean "
                                     "'parallel.diloco.inner_steps'?"),
])
def test_bad_diloco_settings_are_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == message


def test_zero_auto_is_replicated_only_when_steps_cross_hosts():
    par = load_config(None, []).parallel
    assert par.zero == "auto" and par.zero_for(1) and not par.zero_for(2)
    assert load_config(None, list(DILOCO)).parallel.zero_for(2)
    assert load_config(None, ["parallel.zero=true"]).parallel.zero_for(2)


# ----------------------------------------------------------------------------- one host

@pytest.mark.parametrize("ranks", [0, pytest.param(2, marks=pytest.mark.mpi)])
def test_one_host_with_outer_lr_one_and_no_momentum_trains_like_sync_step(tmp_path, shakespeare_bytes, ranks):
    """One worker (one process, or 2 ranks of one host: ZeRO-1 in shared memory), outer lr 1,
    momentum 0: each sync sets global := global - (global - params), which is params up to one
    rounding of the subtraction and one of the difference (|x| <= ~1: 2 x 2^-24 ~ 1.2e-7 per sync,
    3 syncs), so the run is synchronous training within 1e-6."""
    runs = {}
    for name, extra in (("step", ()), ("diloco", (*DILOCO, "parallel.diloco.outer_lr=1",
                                                   "parallel.diloco.outer_momentum=0"))):
        (tmp_path / name).mkdir()
        train = {"max_steps": STEPS, "micro_batch_size": 6}
        cfg = tiny_config(tmp_path / name, shakespeare_bytes, train=train)
        r = run_cli("train", "--config", str(cfg), "parallel.threads_per_rank=1", *extra, ranks=ranks,
                    timeout=120)
        assert r.returncode == 0, r.stderr
        runs[name] = (_losses(tmp_path / name / "out"), read_params(tmp_path / name / "out")[1])
    (ls, ps), (ld, pd) = runs["step"], runs["diloco"]
    assert ls.keys() == ld.keys() == set(range(1, STEPS + 1))
    np.testing.assert_allclose([ld[s] for s in ls], [ls[s] for s in ls], rtol=0, atol=1e-6)
    assert np.abs(pd - ps).max() < 1e-6
    # and the syncs ran (the default outer step is not the identity: it would differ by far more)
    outer = [row for row in read_metrics(tmp_path / "diloco" / "out") if "outer_s" in row]
    assert [row["step"] for row in outer] == [3, 6, 8]
    assert all(row["outer_bytes"] == 0 and row["pseudo_grad_norm"] > 0 for row in outer)


def test_one_host_default_outer_step_differs_from_sync_step(tmp_path, shakespeare_bytes):
    """The guard above has teeth: the paper's outer lr 0.7 and momentum 0.9 move the parameters
    well away from synchronous training's (the outer step is applied, not skipped)."""
    out = {}
    for name, extra in (("step", ()), ("diloco", DILOCO)):
        (tmp_path / name).mkdir()
        cfg = tiny_config(tmp_path / name, shakespeare_bytes, train={"max_steps": STEPS})
        assert run_cli("train", "--config", str(cfg), *extra, timeout=120).returncode == 0
        out[name] = read_params(tmp_path / name / "out")[1]
    assert np.abs(out["diloco"] - out["step"]).max() > 1e-3


# ----------------------------------------------------------------------------- simulated hosts

@pytest.mark.mpi
@pytest.mark.parametrize("per_host, zero", [(1, "auto"), (2, "true"), (2, "false")])
def test_hosts_agree_within_at_every_step_and_everywhere_after_each_sync(tmp_path, shakespeare_bytes, hosts,
                                                                         per_host, zero):
    """The run checks the parameters at every step (parallel.check_every=1): within each host between
    syncs, across all ranks right after one (Trainer.check_params); a disagreement ends the run
    non-zero. The checkpoints show the other half: between syncs the hosts really differ."""
    cfg = tiny_config(tmp_path, shakespeare_bytes, checkpoint={"every": 1, "keep": 20},
                      train={"micro_batch_size": 6 // per_host, "max_steps": STEPS})
    r = _run(hosts, per_host, cfg, *DILOCO, "parallel.check_every=1", f"parallel.zero={zero}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"sync: diloco, 2 worker(s) (one per host), an outer sync every {H} steps" in r.stdout
    if per_host == 2:
        mode = "ZeRO-1" if zero == "true" else "replicated"
        assert f"gradient sum within each host: shared memory (2 ranks on one node, {mode}" in r.stdout
    out = tmp_path / "out"
    outer = {row["step"]: row for row in read_metrics(out) if "outer_s" in row}
    assert sorted(outer) == [3, 6, 8]
    n = Layout(load_config(cfg).model).size
    assert all(row["outer_bytes"] == wire_bytes(-(-n // per_host) if per_host == 2 else n, 2, "fp32")
               or row["outer_bytes"] == wire_bytes(n // per_host, 2, "fp32") for row in outer.values())
    for path in list_checkpoints(out):
        step = int(path.name.split("_")[1])
        rows = _rows(path)
        assert sorted(rows) == [0, 1] and rows[0].shape[0] == 5 and rows[1].shape[0] == 3
        same = np.array_equal(rows[0][0], rows[1][0])
        if step in outer:       # right after a sync every host holds the global parameters
            assert same and np.array_equal(rows[0][0], rows[0][3]), step
        else:                   # between syncs each host went its own way
            assert not same, step


@pytest.mark.mpi
@pytest.mark.parametrize("wire", ["fp32", "bf16"])
def test_an_outer_step_is_the_papers_update_on_the_saved_states(tmp_path, shakespeare_bytes, hosts, wire):
    """2 hosts x 2 ranks; every rank records each sync's inputs (global parameters, momentum, its
    host's parameters) and outputs on its slice (tests/diloco_worker.py). Recomputed in float64:
        delta = mean_k (global - params_k); buf = mu buf + delta; global -= lr (delta + mu buf)
    (bf16 wire: each host's delta rounded to bf16 by torch, the fp32 mean rounded again, as the
    wire carries them). Every value is |x| < ~1 and passes through ~4 fp32 roundings: 1e-6 holds,
    while a flipped sign or a missing momentum term is off by lr x |delta| > 1e-4 (asserted)."""
    import torch

    cfg = tiny_config(tmp_path, shakespeare_bytes, train={"micro_batch_size": 3, "max_steps": STEPS})
    cmd = hosts.mpirun(2, sys.executable, str(HERE / "diloco_worker.py"), str(cfg), str(tmp_path), *DILOCO,
                       f"parallel.diloco.wire={wire}", "parallel.threads_per_rank=1")
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [dict(np.load(tmp_path / f"rank_{q}.npz")) for q in range(4)]
    lr, mu = 0.7, 0.9

    def wire_round(x: np.ndarray) -> np.ndarray:
        if wire == "fp32":
            return x.astype(np.float64)
        return torch.tensor(x.astype(np.float32)).to(torch.bfloat16).to(torch.float64).numpy()

    biggest, total_sq = 0.0, np.zeros(3)
    for local in (0, 1):
        a, b = (rk for rk in ranks if int(rk["local"]) == local)
        assert list(a["step"]) == list(b["step"]) == [3, 6, 8]
        assert (int(a["lo"]), int(a["hi"])) == (int(b["lo"]), int(b["hi"]))
        assert int(a["node"]) != int(b["node"])
        for i in range(3):
            g, m = a["g0"][i].astype(np.float64), a["m0"][i].astype(np.float64)
            assert np.array_equal(a["g0"][i], b["g0"][i]) and np.array_equal(a["m0"][i], b["m0"][i])
            delta = (wire_round(a["g0"][i] - a["p0"][i]) + wire_round(b["g0"][i] - b["p0"][i])) / 2
            delta = wire_round(delta.astype(np.float32))
            buf = mu * m + delta
            new = g - lr * (delta + mu * buf)
            for rk in (a, b):
                np.testing.assert_allclose(rk["g1"][i], new, rtol=0, atol=1e-6)
                np.testing.assert_allclose(rk["m1"][i], buf, rtol=0, atol=1e-6)
                assert np.array_equal(rk["p1"][i], rk["g1"][i])     # every host starts from it
            biggest = max(biggest, float(np.abs(delta).max()))
            total_sq[i] += float(np.dot(delta, delta))
    assert biggest * lr > 1e-4
    np.testing.assert_allclose(ranks[0]["norm"], np.sqrt(total_sq), rtol=1e-5)


def _full_run(tmp_path: Path, data: Path, hosts, per_host: int, name: str = "full") -> tuple[Path, Path]:
    (tmp_path / name).mkdir()
    cfg = tiny_config(tmp_path / name, data, train={"micro_batch_size": 6 // per_host, "max_steps": STEPS},
                      checkpoint={"every": 1, "keep": 20})
    r = _run(hosts, per_host, cfg, *DILOCO)
    assert r.returncode == 0, r.stderr[-3000:]
    return cfg, tmp_path / name / "out"


@pytest.mark.mpi
@pytest.mark.parametrize("per_host", [1, 2])
def test_resume_across_an_outer_sync_is_bit_exact(tmp_path, shakespeare_bytes, hosts, per_host):
    """From step 5 (mid-cycle: each host's own parameters and moments, the outer state of step 3)
    through the sync at step 6 to the end: the same losses and parameters, to the bit."""
    cfg, full = _full_run(tmp_path, shakespeare_bytes, hosts, per_host)
    out = tmp_path / "resumed"
    r = _run(hosts, per_host, cfg, *DILOCO, f"out_dir={out}", f"--resume={full}/ckpt/step_0000005",
             "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 5 (each of the 2 hosts its own state)" in r.stdout
    want, got = _losses(full), _losses(out)
    assert {s: got[s] for s in range(6, STEPS + 1)} == {s: want[s] for s in range(6, STEPS + 1)}
    assert np.array_equal(read_params(out)[1], read_params(full)[1])


@pytest.mark.mpi
def test_resume_on_another_number_of_hosts_merges_them_by_an_early_outer_step(tmp_path, shakespeare_bytes,
                                                                              hosts):
    """The documented rule (checkpoint.load_worker_state), recomputed from the 2-host checkpoint's
    shards in float64: one outer step with the checkpoint's settings on the hosts' mean
    pseudo-gradient, moments averaged; then a run on 1 host and one on 3 hosts resume from it."""
    cfg, full = _full_run(tmp_path, shakespeare_bytes, hosts, 1)
    ckpt = full / "ckpt" / "step_0000005"
    rows = _rows(ckpt)
    g, mom = rows[0][3].astype(np.float64), rows[0][4].astype(np.float64)
    delta = ((g - rows[0][0]) + (g - rows[1][0])) / 2
    buf = 0.9 * mom + delta
    expected = g - 0.7 * (delta + 0.9 * buf)
    layout = Layout(load_config(cfg).model)
    solo = Partition(layout.size, 1, 0)
    params, m, v, outer, how = load_worker_state(ckpt, dist.Comm(), layout, solo, 1, 0)
    assert how == "2 hosts merged into 1 by an early outer step, AdamW moments averaged"
    np.testing.assert_allclose(params, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(m, (rows[0][1] + rows[1][1]) / 2, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(v, (rows[0][2] + rows[1][2]) / 2, rtol=1e-6, atol=1e-15)
    np.testing.assert_allclose(outer[1], buf, rtol=0, atol=1e-6)
    assert outer[2] == 5 and np.array_equal(outer[0], params)
    # export and sample take the same model (read_params), not the last sync's
    np.testing.assert_allclose(read_params(ckpt)[1], expected, rtol=0, atol=1e-6)
    assert np.array_equal(read_params(full / "ckpt" / "step_0000006")[1], rows_6 := _rows(
        full / "ckpt" / "step_0000006")[0][3])
    assert np.array_equal(rows_6, _rows(full / "ckpt" / "step_0000006")[1][0])
    # a synchronous run takes the merged parameters and drops the outer state
    _, _, _, none, how = load_worker_state(ckpt, dist.Comm(), layout, solo, None, 0)
    assert none is None and "merged into 1" in how
    # at a sync the hosts already agree: no outer step, worker 0's parameters as they are
    params6, *_ = load_worker_state(full / "ckpt" / "step_0000006", dist.Comm(), layout, solo, 1, 0)
    assert np.array_equal(params6, _rows(full / "ckpt" / "step_0000006")[0][0])
    # and the runs: 1 host (one process) and 3 hosts continue from it to the end
    one = run_cli("train", "--config", str(cfg), *DILOCO, f"out_dir={tmp_path / 'one'}", f"--resume={ckpt}",
                  "--overwrite", timeout=120)
    assert one.returncode == 0, one.stderr
    assert "(2 hosts merged into 1 by an early outer step, AdamW moments averaged)" in one.stdout
    made = simhosts.create(3)
    try:
        three = _run(made, 1, cfg, *DILOCO, "train.micro_batch_size=4", f"out_dir={tmp_path / 'three'}",
                     f"--resume={ckpt}", "--overwrite", n_hosts=3)
    finally:
        simhosts.destroy(made)
    assert three.returncode == 0, three.stderr[-3000:]
    assert "(2 hosts merged into 3 by an early outer step" in three.stdout
    for out in (tmp_path / "one", tmp_path / "three"):
        losses = _losses(out)
        assert sorted(losses) == [6, 7, 8] and all(np.isfinite(list(losses.values())))


@pytest.mark.mpi
def test_a_link_lost_during_an_outer_sync_ends_the_job(tmp_path, shakespeare_bytes):
    """A model big enough that its sync takes seconds on a 1 Mbit/s link; the cable is pulled once
    the step before the sync is logged, so the hosts are inside the sync's allreduce when it goes.
    The watchdog names the phase and the job ends within parallel.timeout_s + 30 s."""
    why = simhosts.unavailable()
    if why:
        pytest.skip(f"simulated hosts: {why}")
    made = simhosts.create(2)
    try:
        made.shape("1mbit")
        cfg = tiny_config(tmp_path, shakespeare_bytes, train={"micro_batch_size": 6, "max_steps": 100},
                          model={"n_layer": 2, "n_head": 2, "n_embd": 96, "block_size": 32, "vocab_size": 257,
                                 "vocab_multiple": 1})
        cmd = made.mpirun(1, *TRAIN, "--config", str(cfg), "parallel.threads_per_rank=1",
                          "parallel.sync=diloco", "parallel.diloco.inner_steps=5",
                          f"parallel.timeout_s={TIMEOUT_S}")
        proc = subprocess.Popen(cmd, env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline, seen = time.monotonic() + 120, ""
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            seen += line
            if re.match(r"step\s+4/100", line):
                break
        if proc.poll() is not None or time.monotonic() >= deadline:
            if proc.poll() is None:
                _fail_stuck(made, proc, "step 4 not reached")
            pytest.fail(f"the job ended before step 4: {proc.communicate()[1][-3000:]}")
        time.sleep(1.0)           # step 5's compute is milliseconds; its sync's 300 kB take seconds
        start = time.monotonic()
        made.set_link(1, up=False)
        try:
            out, err = proc.communicate(timeout=TIMEOUT_S + 30)
        except subprocess.TimeoutExpired:
            _fail_stuck(made, proc, f"the job still runs {TIMEOUT_S + 30} s after the link went down")
        elapsed = time.monotonic() - start
        print(f"link lost during the outer sync: the job ended after {elapsed:.1f} s, exit {proc.returncode}")
        assert proc.returncode != 0
        assert elapsed < TIMEOUT_S + 30
        assert "outer sync" in err, err[-3000:]
    finally:
        simhosts.destroy(made)
