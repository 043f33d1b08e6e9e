"""Training across simulated hosts (network namespaces joined by veth, tests/hosts.py): the same
numbers as one rank, checkpoints that move between 2 hosts and 1, and a far rank's death, a pulled
cable or a SIGTERM during the stall that follows all end the job quickly, non-zero. A job that does
not end fails its test with where each of its processes waits (hosts.Hosts.evidence)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import hosts as simhosts
import numpy as np
import pytest

from distgpt import dist
from distgpt.checkpoint import list_checkpoints, read_params, validate
from distgpt.config import ConfigError, load_config

from conftest import cli_env, read_metrics, run_cli, tiny_config

TRAIN = (sys.executable, "-m", "distgpt.train")


def _two_hosts():
    """Two simulated hosts for as long as the fixture lives; a skip, with the reason, where
    namespaces cannot be made."""
    why = simhosts.unavailable()
    if why:
        pytest.skip(f"simulated hosts: {why}")
    made = simhosts.create(2)
    try:
        yield made
    finally:
        simhosts.destroy(made)


@pytest.fixture(scope="module")
def hosts():
    yield from _two_hosts()


@pytest.fixture
def fresh_hosts():
    """Hosts of one test's own: a pulled cable and the processes it strands stay with that test."""
    yield from _two_hosts()


def _env(**extra: str) -> dict[str, str]:
    return cli_env(**simhosts.MPI_ENV, PYTHONFAULTHANDLER="1", **extra)


def _run(hosts, ranks_per_host: int, cfg: Path, *overrides: str, n_hosts: int = 2, timeout: float = 120,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The training command on ranks_per_host ranks on each of n_hosts hosts (n_hosts=1: plain
    single-process run on the root namespace's side: nothing crosses a network)."""
    args = ("--config", str(cfg), "parallel.threads_per_rank=1", *overrides)
    if n_hosts == 1:
        return run_cli("train", *args, ranks=ranks_per_host if ranks_per_host > 1 else 0, timeout=timeout,
                       env=env)
    cmd = hosts.mpirun(ranks_per_host, *TRAIN, *args, hosts=n_hosts)
    return _run_job(hosts, cmd, _env(**(env or {})), timeout)


def _run_job(hosts, cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run of a job in the hosts, started once: a job still running after `timeout`
    fails the test with what the hosts show (_fail_stuck). No retries: of 932 starts on this
    harness (benchmarks/start_hangs.py, and this file run 7 times) none hung, against the "1 in 15"
    the retries were written for, so a start that hangs is a finding to read, not noise to retry."""
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _fail_stuck(hosts, proc, f"the job still runs after {timeout:.0f} s")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _fail_stuck(hosts, proc: subprocess.Popen, what: str) -> None:
    """Fail the test with the evidence of a job that does not end, gathered before it is killed:
    the hosts' launcher log, sockets, processes and their native stacks (Hosts.evidence), then
    the Python stacks its ranks print on SIGABRT (PYTHONFAULTHANDLER) and the end of its output.
    Everything the job started in the hosts is killed, so that later tests start clean."""
    evidence = hosts.evidence(native=True)
    stacks = hosts.dump_python_stacks()
    proc.kill()
    hosts.kill_all()
    out, err = proc.communicate()
    pytest.fail(f"{what}\n{evidence}\nthe ranks' Python stacks:\n{stacks}\njob's stdout (end):\n"
                f"{out[-3000:]}\njob's stderr (end):\n{err[-4000:]}")


def _losses(out: Path) -> dict[int, float]:
    return {row["step"]: row["train_loss"] for row in read_metrics(out) if "train_loss" in row}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shakespeare_bytes):
    tmp = tmp_path_factory.mktemp("ref")
    cfg = tiny_config(tmp, shakespeare_bytes, train={"micro_batch_size": 12, "max_steps": 5})
    r = run_cli("train", "--config", str(cfg), timeout=120)
    assert r.returncode == 0, r.stderr
    return _losses(tmp / "out"), read_params(tmp / "out")[1]


# (ranks per host, micro-batch, zero): global batch 12 -> accumulation 12 / (micro x ranks)
LAYOUTS = [(1, 6, False), (1, 6, True), (1, 2, True), (2, 3, False), (2, 3, True), (2, 1, True),
           (2, 1, False)]


@pytest.mark.mpi
@pytest.mark.parametrize("per_host, micro, zero", LAYOUTS)
def test_two_hosts_train_like_one_rank(tmp_path, shakespeare_bytes, hosts, reference, per_host, micro, zero):
    ref_losses, ref_params = reference
    cfg = tiny_config(tmp_path, shakespeare_bytes, train={"micro_batch_size": micro, "max_steps": 5})
    sent = hosts.tx_bytes(1)
    r = _run(hosts, per_host, cfg, f"parallel.zero={zero}")
    assert r.returncode == 0, r.stderr
    assert f"ranks: {2 * per_host} on 2 node(s), {per_host} per node" in r.stdout
    hierarchical = per_host > 1                   # auto: shared memory on each host, then MPI
    assert ("gradient sum: hierarchical" if hierarchical else "gradient sum: MPI") in r.stdout
    losses = _losses(tmp_path / "out")
    np.testing.assert_allclose([losses[s] for s in sorted(losses)], [ref_losses[s] for s in sorted(losses)],
                               rtol=1e-5)
    params = read_params(tmp_path / "out")[1]
    assert np.linalg.norm(params - ref_params) <= 1e-5 * np.linalg.norm(ref_params)
    # the gradients really crossed the cable: 5 steps x at least half a gradient (fp32) each, or
    # with the hierarchical sum, half of each of the host's two slices
    assert hosts.tx_bytes(1) - sent > 5 * 2 * params.size / (2 if hierarchical else 1)


@pytest.mark.mpi
@pytest.mark.parametrize("zero", [False, True])
def test_bf16_on_the_wire_halves_the_traffic_and_trains_like_one_rank(tmp_path, shakespeare_bytes, hosts,
                                                                     reference, zero):
    ref_losses, ref_params = reference
    cfg = tiny_config(tmp_path, shakespeare_bytes, train={"micro_batch_size": 3, "max_steps": 5})
    sent = hosts.tx_bytes(1)
    r = _run(hosts, 1, cfg, f"parallel.zero={zero}", "parallel.grad_wire=bf16")
    assert r.returncode == 0, r.stderr
    assert "bf16 on the wire" in r.stdout
    losses = _losses(tmp_path / "out")
    np.testing.assert_allclose([losses[s] for s in sorted(losses)], [ref_losses[s] for s in sorted(losses)],
                               rtol=1e-3)
    params = read_params(tmp_path / "out")[1]
    assert np.linalg.norm(params - ref_params) <= 1e-2 * np.linalg.norm(ref_params)
    # host 1 sends half its gradient each step: 2 bytes each (fp32 would be 4), then replicated
    # its half of the sums (2 bytes each) or under ZeRO-1 its half of the parameters (fp32); and
    # its token rows, sparse in fp32 with their ids (3 x 32 tokens of 32 wide)
    per_step = params.size / 2 * (2 + (4 if zero else 2)) + 3 * 32 * (32 * 4 + 8)
    crossed = (hosts.tx_bytes(1) - sent) / 5
    assert per_step <= crossed <= per_step * 1.25, (crossed, per_step)


def _config(tmp_path: Path, data: Path, name: str, **train) -> tuple[Path, Path]:
    out = tmp_path / name
    out.mkdir()
    cfg = tiny_config(out, data, train={"max_steps": 10, "micro_batch_size": 2, **train},
                      checkpoint={"every": 5, "keep": 5})
    return cfg, out / "out"


@pytest.mark.mpi
@pytest.mark.parametrize("save_hosts, load_hosts, per_host", [(2, 1, 1), (1, 2, 1), (2, 1, 2)])
def test_checkpoint_moves_between_hosts(tmp_path, shakespeare_bytes, hosts, save_hosts, load_hosts, per_host):
    micro = 1 if per_host > 1 else 2             # batch 12 over 4 or 2 ranks
    cfg, out = _config(tmp_path, shakespeare_bytes, "straight", micro_batch_size=micro)
    r = _run(hosts, per_host, cfg, n_hosts=save_hosts)
    assert r.returncode == 0, r.stderr
    cfg2, out2 = _config(tmp_path, shakespeare_bytes, "resumed", micro_batch_size=micro)
    (out2 / "ckpt").mkdir(parents=True)
    shutil.copytree(out / "ckpt" / "step_0000005", out2 / "ckpt" / "step_0000005")
    r = _run(hosts, 1, cfg2, "resume=auto", n_hosts=load_hosts)
    assert r.returncode == 0, r.stderr
    assert "at step 5" in r.stdout
    straight, resumed = _losses(out), _losses(out2)
    assert sorted(resumed) == [6, 7, 8, 9, 10]
    np.testing.assert_allclose([resumed[s] for s in resumed], [straight[s] for s in resumed], rtol=1e-5)


HIERARCHICAL_WORKER = """
import sys
import numpy as np
from distgpt import dist
from distgpt.partition import Partition

comm = dist.init()
n = 101
data = lambda r: np.random.default_rng(r).standard_normal(n).astype(np.float32)
expected = sum(data(r).astype(np.float64) for r in range(comm.size))
for zero in (True, False):
    part = Partition(n, comm.size, comm.rank, zero=zero)
    red = dist.make_reducer(comm, part, [(40, 60), (60, 90)], data(comm.rank), 1, "auto")
    assert type(red).__name__ == "HierarchicalReducer", type(red).__name__
    s, e = part.updated
    for _ in range(2):                  # the buffers are reusable: a second step sums again
        red.grads[:] = data(comm.rank)
        red.finish()
        assert np.allclose(red.updated_grads, expected[s:e], rtol=1e-5, atol=1e-5), (zero, red.updated_grads)
    if not zero:                        # replicated: every rank holds the same sums, bit for bit
        assert len(set(comm.allgather_obj(red.grads.tobytes()))) == 1
    sq = np.array([red.norm_sq_contribution()])
    comm.allreduce_(sq)
    assert np.isclose(red.norm_sq(float(sq[0])), np.dot(expected, expected), rtol=1e-5)
    if zero:
        red.params[s:e] = np.arange(s, e)
        red.allgather_params()
        assert np.array_equal(red.params, np.arange(n, dtype=np.float32))
print(f"rank {comm.rank} ok", flush=True)
"""


@pytest.mark.mpi
def test_hierarchical_reducer_sums_every_slice(tmp_path, hosts):
    worker = tmp_path / "worker.py"
    worker.write_text(HIERARCHICAL_WORKER)
    r = _run_job(hosts, hosts.mpirun(2, sys.executable, str(worker)), _env(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(" ok") == 4


STALLED_WORKER = """
import os, time
if os.environ["PMI_RANK"] == "1":          # the far host's rank never reaches MPI_Init
    time.sleep(600)
from mpi4py import MPI
MPI.COMM_WORLD.Barrier()
"""


@pytest.mark.mpi
def test_a_start_that_hangs_fails_saying_where_each_process_waits(tmp_path, fresh_hosts):
    hosts = fresh_hosts
    worker = tmp_path / "stalled.py"
    worker.write_text(STALLED_WORKER)
    with pytest.raises(pytest.fail.Exception) as failed:
        _run_job(hosts, hosts.mpirun(1, sys.executable, str(worker)), _env(), timeout=5)
    report = str(failed.value)
    assert report.startswith("the job still runs after 5 s")
    assert re.search(r"launcher log:\n\S+ \d+ start 10\.77\.0\.2\n", report), report   # the far proxy started
    ranks = [line for line in report.splitlines() if re.match(r"\S+-h\d pid \d+.*python .*stalled\.py", line)]
    assert len(ranks) == 2, report
    if shutil.which("gdb"):                 # rank 0 waits in MPI_Init for rank 1, which never came
        assert ["(in MPI_Init)" in line for line in sorted(ranks)] == [True, False], ranks
    # each rank's Python stack (PYTHONFAULTHANDLER on SIGABRT), read from its own stderr: rank 1
    # sleeps on line 4; rank 0 waits in the import of mpi4py on line 5, whose MPI_Init needs rank 1
    stacks = report[report.index("the ranks' Python stacks:"):report.index("job's stdout (end):")]
    for line in (4, 5):
        assert stacks.count(f'File "{worker}", line {line} in <module>') == 1, report
    assert _until(lambda: hosts.processes() == [], 5)      # nothing of the job is left in the hosts


@pytest.mark.mpi
def test_three_hosts_through_a_switch_train_like_one_rank(tmp_path, shakespeare_bytes, reference):
    why = simhosts.unavailable()
    if why:
        pytest.skip(f"simulated hosts: {why}")
    three = simhosts.create(3)
    try:
        cfg = tiny_config(tmp_path, shakespeare_bytes, train={"micro_batch_size": 4, "max_steps": 5})
        r = _run(three, 1, cfg, n_hosts=3)
    finally:
        simhosts.destroy(three)
    assert r.returncode == 0, r.stderr
    assert "ranks: 3 on 3 node(s), 1 per node" in r.stdout
    losses = _losses(tmp_path / "out")
    np.testing.assert_allclose([losses[s] for s in sorted(losses)], [reference[0][s] for s in sorted(losses)],
                               rtol=1e-5)


@pytest.mark.mpi
@pytest.mark.parametrize("per_host, rank", [(1, 1), (2, 3)])
def test_rank_killed_on_the_far_host_ends_the_job(tmp_path, shakespeare_bytes, hosts, per_host, rank):
    cfg = tiny_config(tmp_path, shakespeare_bytes, train={"micro_batch_size": 6 // per_host, "max_steps": 50})
    start = time.monotonic()
    r = _run(hosts, per_host, cfg, timeout=60, env={"DISTGPT_FAIL_AT": f"{rank}:2:9"})
    elapsed = time.monotonic() - start
    print(f"far rank {rank} killed: the job ended after {elapsed:.1f} s, exit code {r.returncode}")
    assert r.returncode != 0
    assert elapsed < 30
    # and nothing of it stays behind on either host (an orphan would hold a core, and its socket)
    left = _until(lambda: not subprocess.run(["pgrep", "-f", str(cfg)], capture_output=True).stdout, 10)
    assert left, f"still running 10 s after the job ended:\n{_mpi_processes()}"


# ----------------------------------------------------------------------------- a pulled cable

TIMEOUT_S = 10


def _start_until_checkpoint(hosts, tmp_path: Path, data: Path, step: int, *overrides: str
                            ) -> tuple[subprocess.Popen, Path]:
    """A long 2-host run with a checkpoint every 2 steps, returned once checkpoint `step` exists
    (or, with checkpoint.every=0 among the overrides, once step `step` is logged)."""
    cfg = tiny_config(tmp_path, data, train={"micro_batch_size": 6, "max_steps": 100000},
                      checkpoint={"every": 2, "keep": 3})
    cmd = hosts.mpirun(1, *TRAIN, "--config", str(cfg), "parallel.threads_per_rank=1",
                       f"parallel.timeout_s={TIMEOUT_S}", *overrides)
    ckpt = tmp_path / "out" / "ckpt" / f"step_{step:07d}"
    metrics = tmp_path / "out" / "metrics.jsonl"
    reached = ((lambda: metrics.exists() and f'"step": {step},' in metrics.read_text())
               if "checkpoint.every=0" in overrides else ckpt.exists)
    proc = subprocess.Popen(cmd, env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90            # the checkpoint comes after a few seconds normally
    while not reached() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not reached():
        if proc.poll() is None:
            _fail_stuck(hosts, proc, f"step {step} not reached in 90 s")
        out, err = proc.communicate()
        pytest.fail(f"the job ended (exit {proc.returncode}) before step {step}:\n{err[-4000:]}")
    return proc, cfg


def _mpi_processes() -> str:
    """Every mpirun, hydra proxy and distgpt process on the machine, with its state and what it
    waits in (a start that hangs may be waiting on one that an earlier test left behind)."""
    ps = subprocess.run(["ps", "-eo", "pid,ppid,stat,etimes,wchan:24,args"], capture_output=True,
                        text=True).stdout.splitlines()
    return "\n".join(line[:200] for line in ps[1:] if re.search(r"mpirun|hydra|distgpt|netns", line)
                     and "ps -eo" not in line)


def _wait(proc: subprocess.Popen, seconds: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the job did not end within {seconds} s: {err[-2000:]}")


def _resume_on_one_host(tmp_path: Path, cfg: Path) -> None:
    """No half-written checkpoint counts, and resume=auto takes the newest complete one."""
    saved = list_checkpoints(tmp_path / "out")
    assert saved, "no checkpoint survived"
    validate(saved[0])                      # the newest one listed is complete
    step = int(saved[0].name.split("_")[1])
    r = run_cli("train", "--config", str(cfg), f"train.max_steps={step + 1}", "resume=auto", timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"resumed from {saved[0]} at step {step}" in r.stdout


@pytest.mark.mpi
@pytest.mark.slow
def test_pulled_cable_times_out_then_resumes_on_one_host(tmp_path, shakespeare_bytes, fresh_hosts):
    hosts = fresh_hosts
    proc, cfg = _start_until_checkpoint(hosts, tmp_path, shakespeare_bytes, 4)
    hosts.set_link(1, False)
    start = time.monotonic()
    try:
        _, err = _wait(proc, TIMEOUT_S + 30)
    finally:
        hosts.set_link(1, True)
    elapsed = time.monotonic() - start
    print(f"pulled cable: the job ended after {elapsed:.1f} s, exit {proc.returncode}")
    assert proc.returncode != 0
    assert elapsed < TIMEOUT_S + 30
    lines = [line for line in err.splitlines() if "timed out after" in line]
    assert len(lines) >= 1, err
    assert re.fullmatch(r"distgpt\.train: error: rank \d: step \d+: timed out after \d+ s in "
                        r"(gradient sum|step statistics|parameter gather|checkpoint save|parameter check) "
                        r"waiting for .+", lines[0]), lines[0]
    assert "warning: rank 0: step" in err                                # at timeout / 4
    _resume_on_one_host(tmp_path, cfg)


@pytest.mark.mpi
@pytest.mark.slow
def test_sigterm_during_a_stall_ends_the_job(tmp_path, shakespeare_bytes, fresh_hosts):
    hosts = fresh_hosts
    # a checkpoint first, then a run that saves none: the stall is never inside a save, where a
    # stop signal waits for the timeout (the save is what the signal asks for)
    cfg = tiny_config(tmp_path, shakespeare_bytes, train={"micro_batch_size": 6, "max_steps": 4})
    assert run_cli("train", "--config", str(cfg), timeout=120).returncode == 0
    proc, cfg = _start_until_checkpoint(hosts, tmp_path, shakespeare_bytes, 8, "checkpoint.every=0",
                                        "resume=auto")
    hosts.set_link(1, False)
    start = time.monotonic()
    try:
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)                                   # mpirun forwards it
        _, err = _wait(proc, TIMEOUT_S + 30)
    finally:
        hosts.set_link(1, True)
    elapsed = time.monotonic() - start
    print(f"SIGTERM in a stall: the job ended after {elapsed:.1f} s, exit {proc.returncode}")
    assert proc.returncode != 0
    assert "stop signal while stuck for" in err and "exiting without a checkpoint" in err, err
    assert elapsed < TIMEOUT_S                         # the grace period, well before the timeout
    _resume_on_one_host(tmp_path, cfg)


@pytest.mark.mpi
def test_sigterm_without_a_stall_still_checkpoints_and_exits_zero(tmp_path, shakespeare_bytes, fresh_hosts):
    hosts = fresh_hosts
    proc, cfg = _start_until_checkpoint(hosts, tmp_path, shakespeare_bytes, 2)
    proc.send_signal(signal.SIGTERM)
    out, err = _wait(proc, TIMEOUT_S + 30)
    assert proc.returncode == 0, err
    assert "signal received: checkpointing at step" in out
    assert "stop signal while stuck" not in err


# ----------------------------------------------------------------------------- the watchdog alone

def _watchdog(timeout_s: float, board: Path | None = None, rank: int = 0, size: int = 2, run_id: str = "run"):
    lines: list[str] = []
    codes: list[int] = []
    stream = type("S", (), {"write": lambda self, s: lines.append(s), "flush": lambda self: None})()
    dog = dist.Watchdog(rank, size, timeout_s, board, run_id, stream=stream, exit_fn=codes.append)
    return dog, lines, codes


def _until(cond, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def test_watchdog_warns_then_names_the_missing_rank(tmp_path):
    peer, _, _ = _watchdog(0.4, tmp_path, rank=1, size=3)      # rank 1 reaches the collective too
    dog, lines, codes = _watchdog(0.4, tmp_path, rank=0, size=3)
    try:
        with peer.watch("gradient sum", 7), dog.watch("gradient sum", 7):
            _until(lambda: codes)
    finally:
        dog.stop()
        peer.stop()
    text = "".join(lines)
    assert codes == [dist.TIMEOUT_EXIT]
    assert "distgpt.train: warning: rank 0: step 7: waiting for 0 s in gradient sum" in text
    assert ("distgpt.train: error: rank 0: step 7: timed out after 0 s in gradient sum waiting for ranks [2]"
            in text)


def test_watchdog_is_quiet_when_collectives_complete():
    dog, lines, codes = _watchdog(0.2)
    try:
        for step in range(30):
            with dog.watch("gradient sum", step):
                time.sleep(0.01)
            time.sleep(0.01)
    finally:
        dog.stop()
    assert not lines and not codes


def test_watchdog_exits_on_a_stop_signal_while_stuck():
    old = signal.signal(signal.SIGTERM, lambda *_: None)     # train.StopFlag's role
    dog, lines, codes = _watchdog(2.0)                       # grace: 0.5 s
    try:
        with dog.watch("step statistics", 3):
            signal.raise_signal(signal.SIGTERM)
            _until(lambda: codes, 1.9)
    finally:
        dog.stop()
        signal.signal(signal.SIGTERM, old)
    assert codes == [143]
    assert "rank 0: step 3: stop signal while stuck for" in "".join(lines)


def test_timeout_must_be_a_positive_number():
    assert load_config(None, []).parallel.timeout_s == 600
    assert load_config(None, ["parallel.timeout_s=5"]).parallel.timeout_s == 5
    with pytest.raises(ConfigError, match="parallel.timeout_s"):
        load_config(None, ["parallel.timeout_s=0"])


@pytest.mark.mpi
def test_simhosts_script_runs_a_config_and_cleans_up(tmp_path, shakespeare_bytes):
    why = simhosts.unavailable()
    if why:
        pytest.skip(f"simulated hosts: {why}")
    cfg = tiny_config(tmp_path, shakespeare_bytes, train={"micro_batch_size": 6, "max_steps": 2})
    script = Path(__file__).resolve().parents[1] / "launch" / "simhosts.sh"
    prefix = f"dgsh{os.getpid()}"
    env = cli_env(PREFIX=prefix, PYTHON=sys.executable)
    r = subprocess.run(["bash", str(script), "2", str(cfg)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ranks: 2 on 2 node(s)" in r.stdout
    assert prefix not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
