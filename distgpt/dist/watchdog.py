"""The watchdog: a rank stuck in a collective ends the job instead of hanging it, and the names it
reports (the phases of a step, the stop signals, the exit code) defined once for dist and train."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

TIMEOUT_EXIT = 3        # the exit code of a rank that timed out in a collective
# "checkpoint and exit": train's StopFlag handles these, the watchdog ends a rank they find stuck
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)
INTERRUPT_EXIT = 130    # 128 + SIGINT: how a shell reports a Ctrl-C'd command


class Phase:
    """The blocking collectives of a run, as `comm.watch(phase, step)` names them (and the
    watchdog reports them): one spelling for the caller and for the watchdog's exemptions."""

    GRADIENT_SUM = "gradient sum"
    STEP_STATISTICS = "step statistics"
    PARAMETER_GATHER = "parameter gather"
    PARAMETER_BROADCAST = "parameter broadcast"
    PARAMETER_CHECK = "parameter check"
    OUTER_SYNC = "outer sync"
    EVALUATION = "evaluation"
    CHECKPOINT_LOAD = "checkpoint load"
    CHECKPOINT_SAVE = "checkpoint save"
    ABORT = "abort"


NOT_WATCHED = contextlib.nullcontext()


class Watchdog:
    """Ends this rank when a blocking collective does not complete in timeout_s seconds.

    A dead peer normally ends the job through the launcher, but a host that vanishes from the
    network (a pulled cable, a hung kernel) leaves the others blocked in MPI forever: TCP only
    retransmits. The training loop marks each blocking collective with `watch(phase, step)`; that
    costs a few attribute writes (about a microsecond) and no communication per collective. A
    thread checks a few times a second: at timeout/4 it prints one warning, at timeout one error
    line naming the step, the phase and, when it can tell, the ranks that never arrived, then calls
    MPI_Abort (without it, mpirun would wait for the unreachable host's launcher forever) and
    hard-exits if that has not ended the process within 5 s: MPI_Abort can hang with the network down.

    A stop signal (STOP_SIGNALS) is normally acted on at the next step boundary, which a rank
    stuck in a collective never reaches (Python runs signal handlers only between bytecodes, not
    inside MPI_Wait). The thread hears the signal through signal.set_wakeup_fd, and if the rank is
    (still) in a collective `grace` seconds later it exits at once, without a checkpoint (one
    cannot be written collectively): the newest complete checkpoint is then the one to resume.
    The checkpoint save itself is exempt (SIGNAL_EXEMPT): it is what the signal asks for. Ctrl-C
    (SIGINT) counts as a stop signal here too, and a second Ctrl-C ends a rank inside any collective
    at once (exit code 130), since the main thread's handler cannot run until MPI returns.

    Which ranks are missing: a rank that has waited timeout/4 writes `rank_R.json` (run id, index
    of the collective) into `board`, the output directory shared by all nodes; at timeout it reads
    the others'. File I/O runs in helper threads with a deadline, as a shared file system can hang
    with the network that took the job down.

    Its lines start with `prefix` (the program's name), as the program's own messages do.
    """

    SIGNAL_EXEMPT = frozenset({Phase.CHECKPOINT_SAVE})

    def __init__(self, rank: int, size: int, timeout_s: float, board: Path | None = None,
                 run_id: str = "", abort_fn: Callable[[int], object] | None = None,
                 stream: TextIO | None = None, exit_fn: Callable[[int], object] = os._exit,
                 prefix: str = "distgpt.train"):
        self.rank, self.size, self.timeout, self.board, self.run_id = rank, size, timeout_s, board, run_id
        self.abort_fn, self.stream, self.exit_fn, self.prefix = abort_fn, stream, exit_fn, prefix
        self.grace = min(10.0, timeout_s / 4)
        self.tick = min(0.5, timeout_s / 20)
        # the state the hot path writes: which collective (phase; None outside), since when, at
        # which step, and how many collectives were entered so far (the same count on every rank)
        self.phase: str | None = None
        self.step: int | None = None
        self.since = 0.0
        self.entered = 0
        self._stopped = False
        self._wake_r, wake_w = socket.socketpair()
        self._wake_w = wake_w
        wake_w.setblocking(False)
        if threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._run, name="distgpt-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def watch(self, phase: str, step: int | None) -> Iterator[None]:
        """Inside: this rank is blocked in collective `phase` of step `step` (None: no step yet)."""
        self.step, self.since = step, time.monotonic()
        self.entered += 1
        self.phase = phase              # last: the thread reads phase first
        try:
            yield
        finally:
            self.phase = None

    def stop(self) -> None:
        self._stopped = True
        if threading.current_thread() is threading.main_thread():
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(-1)

    # the thread's side

    def _run(self) -> None:
        warned = -1                         # the collective (its `entered`) already warned about
        signalled: float | None = None      # when a stop signal (or the first Ctrl-C) arrived
        code = 143                          # the exit code if it ends the rank: 128 + the signal
        interrupts = 0                      # Ctrl-Cs so far
        while not self._stopped:
            ready, _, _ = select.select([self._wake_r], [], [], self.tick)
            for b in self._wake_r.recv(64) if ready else b"":
                if b == signal.SIGINT:
                    interrupts += 1
                    code = INTERRUPT_EXIT
                if (b in STOP_SIGNALS or b == signal.SIGINT) and signalled is None:
                    signalled = time.monotonic()
            phase, entered, since, step = self.phase, self.entered, self.since, self.step
            if phase is None:
                continue
            now = time.monotonic()
            waited = now - since
            if waited >= self.timeout:
                self._give_up(step, entered, f"timed out after {waited:.0f} s in {phase}")
                return
            # a second Ctrl-C means now, even inside a collective (where the main thread's handler
            # cannot run until MPI returns)
            stuck = signalled is not None and (now - max(since, signalled) >= self.grace or interrupts > 1)
            if stuck and (phase not in self.SIGNAL_EXEMPT or interrupts > 1):
                self._give_up(step, entered, f"stop signal while stuck for {waited:.0f} s in {phase}",
                              code=code, then="exiting without a checkpoint (resume takes the newest one)")
                return
            if waited >= self.timeout / 4 and warned != entered:
                warned = entered
                self._say(f"{self.prefix}: warning: {self._where(step)}waiting for {waited:.0f} s in {phase} "
                          f"(parallel.timeout_s = {self.timeout:g})")
                self._with_deadline(self._publish, entered)

    def _where(self, step: int | None) -> str:
        return f"rank {self.rank}: " + ("" if step is None else f"step {step}: ")

    def _give_up(self, step: int | None, entered: int, what: str, code: int = TIMEOUT_EXIT,
                 then: str = "") -> None:
        who = self._with_deadline(self._missing, entered) or "the other ranks"
        self._say(f"{self.prefix}: error: {self._where(step)}{what} waiting for {who}"
                  + (f": {then}" if then else ""))
        self._stopped = True
        if self.abort_fn is not None:
            sys.stdout.flush()
            time.sleep(0.5)     # the launcher relays our output; an abort can outrun the line above
            self._with_deadline(self.abort_fn, code, seconds=5.0)
        self.exit_fn(code)

    def _say(self, line: str) -> None:
        stream = self.stream or sys.stderr
        print(line, file=stream, flush=True)

    @staticmethod
    def _with_deadline(fn: Callable, *args, seconds: float = 2.0):
        """fn(*args) in a helper thread: its result, or None if it has not returned in time."""
        box: list = []
        helper = threading.Thread(target=lambda: box.append(fn(*args)), daemon=True)
        helper.start()
        helper.join(seconds)
        return box[0] if box else None

    def _publish(self, entered: int) -> None:
        if self.board is None:
            return
        with contextlib.suppress(OSError):
            self.board.mkdir(parents=True, exist_ok=True)
            tmp = self.board / f".rank_{self.rank:05d}.tmp"
            tmp.write_text(json.dumps({"run": self.run_id, "entered": entered}))
            os.replace(tmp, self.board / f"rank_{self.rank:05d}.json")

    def _missing(self, entered: int) -> str | None:
        """`ranks [..]`: the ranks that have not published reaching collective `entered` (None:
        cannot tell). A rank past it (a broadcast's root) has reached it."""
        if self.board is None:
            return None
        self._publish(entered)
        arrived = {self.rank}
        for r in range(self.size):
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                rec = json.loads((self.board / f"rank_{r:05d}.json").read_text())
                if rec["run"] == self.run_id and rec["entered"] >= entered:
                    arrived.add(r)
        missing = [r for r in range(self.size) if r not in arrived]
        return (f"ranks {missing}" if missing
                else "the other ranks, which have all reached it (the network or MPI is stuck)")
