"""A tiny progress reporter: a live tqdm bar on a terminal, sparse log lines otherwise.

Logs and CI capture output to files, where a redrawn bar becomes thousands of carriage-return
fragments; there we print one plain line every `interval` seconds at most instead (or none, with
interval=None, for a caller that logs lines of its own: the training loop).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _human(x: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(x) < 1000:
            return f"{x:.0f}{unit}" if unit == "" else f"{x:.1f}{unit}"
        x /= 1000
    return f"{x:.1f}T"


class Progress:
    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "tokens",
        stream: TextIO | None = None,
        interval: float | None = 5.0,
        live: bool | None = None,
        initial: int = 0,
        scale_units: bool = True,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.n = initial
        self.postfix: dict[str, object] = {}
        self.start = time.monotonic()
        self._last_log = self.start
        self._closed = False
        if live is None:
            live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar = None
        if live:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=f" {unit}", unit_scale=scale_units, initial=initial,
                             file=self.stream, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if self.interval is not None and now - self._last_log >= self.interval:
            self._last_log = now
            print(self._line(now), file=self.stream, flush=True)

    def write(self, line: str) -> None:
        """A log line: above the live bar, or plainly on the stream."""
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def set_postfix(self, **kv: object) -> None:
        self.postfix.update(kv)
        if self._bar is not None:
            self._bar.set_postfix(kv, refresh=False)

    def _line(self, now: float, done: bool = False) -> str:
        elapsed = max(now - self.start, 1e-9)
        count = f"{self.n:,}" if done else _human(self.n)
        if self.total and not done:
            count += f"/{_human(self.total)} ({100 * self.n / self.total:.0f}%)"
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        prefix = f"{self.desc}: done, " if done else f"{self.desc}: "
        return (
            f"{prefix}{count} {self.unit} in {elapsed:.1f}s ({_human(self.n / elapsed)} {self.unit}/s){extra}"
        )

    def close(self, summary: bool = True) -> None:
        """Close the bar (if any) and print the summary line; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if summary:
            print(self._line(time.monotonic(), done=True), file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        # after a failure a "done" summary would be a lie; the error message speaks instead
        self.close(summary=exc_type is None)
