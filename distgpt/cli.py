"""The command-line convention of prepare, sample and export: a failure is one line
`<tool>: error: <what and where>` on stderr and exit code 2, including argparse's own complaints.
(train prints the same line for the user's mistakes, but also has to end every MPI rank: its main
does that itself.)"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


def fail(tool: str, message: str) -> NoReturn:
    print(f"{tool}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors; `tool` is the short name errors start with."""

    def __init__(self, tool: str, **kwargs):
        super().__init__(prog=f"python -m distgpt.{tool}", **kwargs)
        self.tool = tool

    def error(self, message: str) -> NoReturn:
        fail(self.tool, f"{message} (see --help)")
