"""launch/slurm.sbatch's logic, run by bash with stand-ins for `srun` and `scontrol` on PATH.

The stand-in srun records its arguments and acts like a distgpt job step: it runs until it receives
SIGUSR1 (then "writes a checkpoint" and exits with $FAKE_EXIT_AFTER_SIGNAL, 0 as distgpt does), or,
in "finish" mode, ends at once with $FAKE_EXIT. The stand-in scontrol records its arguments. SLURM's
`--signal=B:USR1@300` is played by the test, which sends SIGUSR1 to the batch shell."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "slurm.sbatch"

FAKE_SRUN = r"""#!/usr/bin/env bash
echo "srun $*" >> "$FAKE_LOG"
if [[ $FAKE_MODE == finish ]]; then exit "$FAKE_EXIT"; fi
trap 'echo "srun got USR1: checkpoint" >> "$FAKE_LOG"; exit "$FAKE_EXIT_AFTER_SIGNAL"' USR1
echo "srun running" >> "$FAKE_LOG"
for _ in $(seq 600); do sleep 0.05; done
echo "srun timed out" >> "$FAKE_LOG"
exit 99
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_LOG"
"""


def run_batch(tmp_path: Path, mode: str, exit_code: int = 0,
              signal_it: bool = False) -> tuple[int, list[str]]:
    """The batch script's exit code and the stand-ins' record of calls, in order."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    log.touch()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log), "FAKE_MODE": mode,
           "FAKE_EXIT": str(exit_code), "FAKE_EXIT_AFTER_SIGNAL": str(exit_code),
           "SLURM_JOB_ID": "4242", "SLURM_CPUS_PER_TASK": "16", "SLURM_JOB_NODELIST": "n[1-4]"}
    proc = subprocess.Popen(["bash", str(SCRIPT), "configs/x.yaml", "train.max_steps=9"], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if signal_it:
        deadline = time.monotonic() + 20
        while "srun running" not in log.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, "the stand-in srun never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 does
    proc.communicate(timeout=60)
    return proc.returncode, log.read_text().splitlines()


def srun_line(calls: list[str]) -> str:
    return next(c for c in calls if c.startswith("srun --"))


@pytest.mark.parametrize("exit_code", [0, 3])
def test_a_run_that_ends_on_its_own_is_not_requeued(tmp_path, exit_code):
    code, calls = run_batch(tmp_path, "finish", exit_code)
    assert code == exit_code  # srun's exit code is the job's
    assert not any(c.startswith("scontrol") for c in calls)
    assert srun_line(calls).endswith("python -m distgpt.train --config configs/x.yaml "
                                     "parallel.threads_per_rank=16 resume=auto train.max_steps=9")


def test_a_signalled_stop_is_forwarded_and_the_job_requeued(tmp_path):
    code, calls = run_batch(tmp_path, "run", 0, signal_it=True)
    assert code == 0
    assert "srun got USR1: checkpoint" in calls  # forwarded to the job step
    assert calls[-1] == "scontrol requeue 4242"  # after the step has ended
    assert calls.index("srun got USR1: checkpoint") < calls.index("scontrol requeue 4242")


def test_a_signalled_stop_that_fails_is_not_requeued(tmp_path):
    """A checkpoint that failed (distgpt exits 2) must not loop the job from an older one."""
    code, calls = run_batch(tmp_path, "run", 2, signal_it=True)
    assert code == 2
    assert "srun got USR1: checkpoint" in calls
    assert not any(c.startswith("scontrol") for c in calls)


def test_sbatch_options():
    """SLURM reads #SBATCH lines only before the first command."""
    header = []
    for line in SCRIPT.read_text().splitlines()[1:]:
        if line.startswith("#SBATCH"):
            header.append(line.split(None, 1)[1])
        elif line and not line.startswith("#"):
            break
    opts = dict(re.match(r"--([\w-]+)(?:=(.*))?$", h).groups() for h in header)
    assert opts["signal"].startswith("B:USR1@")  # to the batch shell, whose trap forwards it
    assert "requeue" in opts and opts["open-mode"] == "append"  # requeued runs append to one log
    assert "/" not in opts["output"]  # SLURM does not create a log folder, and opens it before the script
