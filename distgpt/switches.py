"""The environment switches: every `DISTGPT_*` variable distgpt reads, in one table.

Most choices live in the validated YAML config. These few are environment variables because they
are read before a config exists (which library a matmul takes, whether to start MPI), by tools that
have no config (prepare), or only by the tests (fault injection). Each is read through `get`, which
checks the value against the table, so a typo is one line naming the variable and what it accepts;
`check()` validates every set variable at once (train calls it before any work, --dry-run too), and
`active()` lists the set ones for the run header.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass


class SwitchError(ValueError):
    """A DISTGPT_* variable with a value it does not accept, or an unknown DISTGPT_* name."""


@dataclass(frozen=True)
class Switch:
    name: str
    default: str
    choices: tuple[str, ...] | None     # None: any text (a path, a spec)
    kind: str                           # "user" (a tuning or site choice) or "test hook"
    meaning: str


TABLE: tuple[Switch, ...] = (
    Switch("DISTGPT_BLAS", "auto", ("auto", "numpy", "mkl"), "user",
           "library of the fp32 matmuls: auto takes MKL on Intel CPUs where it is installed"),
    Switch("DISTGPT_BF16_GEMM", "auto", ("auto", "onednn", "mkl"), "user",
           "library of the bf16 matmuls: auto takes MKL where the CPU has AMX, oneDNN elsewhere"),
    Switch("DISTGPT_BF16_EMULATED", "0", ("0", "1"), "user",
           "1 accepts MKL's emulated bf16 gemm on CPUs without bf16 instructions (slow; the tests use it)"),
    Switch("DISTGPT_JIT", "1", ("0", "1"), "user",
           "0 runs AdamW and GELU as NumPy ufuncs instead of numba-compiled loops (same bits, slower)"),
    Switch("DISTGPT_NO_MPI", "0", ("0", "1"), "user",
           "1 runs a single process even when started by an MPI launcher"),
    Switch("DISTGPT_CACHE", "", None, "user",
           "prepare's download cache (default ~/.cache/distgpt)"),
    Switch("DISTGPT_TINYSHAKESPEARE", "", None, "user",
           "a local copy of tinyshakespeare's input.txt for prepare --source tinyshakespeare"),
    Switch("DISTGPT_FAIL_AT", "", None, "test hook",
           "RANK:STEP makes that rank raise at that step, RANK:STEP:9 SIGKILLs it"),
    Switch("DISTGPT_CKPT_CRASH_AT", "", None, "test hook",
           "kills a checkpoint save at a named point (tests/ckpt_worker.py)"),
    Switch("DISTGPT_SKIP_INSTALL", "0", ("0", "1"), "test hook",
           "1 makes launch/quickstart.sh use the current environment instead of installing .venv"),
)
BY_NAME = {s.name: s for s in TABLE}


def get(name: str) -> str:
    """The variable's value, or its default when unset or empty; a value outside its choices is a
    SwitchError naming the variable and the accepted values."""
    switch = BY_NAME[name]              # a KeyError here is a bug: every switch is in the table
    value = os.environ.get(name, "")
    if value == "":
        return switch.default
    if switch.choices is not None and value not in switch.choices:
        raise SwitchError(f"environment variable {name}={value!r}: expected one of "
                          f"{', '.join(switch.choices)} ({switch.meaning})")
    return value


def check() -> None:
    """Every set DISTGPT_* variable is known and has a value it accepts (else SwitchError)."""
    for name in sorted(os.environ):
        if not name.startswith("DISTGPT_"):
            continue
        if name not in BY_NAME:
            close = difflib.get_close_matches(name, BY_NAME, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise SwitchError(f"environment variable {name} is not one of distgpt's switches{hint}; "
                              f"known: {', '.join(BY_NAME)}")
        get(name)


def active() -> list[str]:
    """`NAME=value` of every switch set to something other than its default (the run header)."""
    return [f"{s.name}={os.environ[s.name]}" for s in TABLE
            if os.environ.get(s.name, "") not in ("", s.default)]
