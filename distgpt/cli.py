"""The command-line convention of prepare, sample and export: a failure is one line
`<tool>: error: <what and where>` on stderr and exit code 2, including argparse's own complaints.
(train prints the same line for the user's mistakes, but also has to end every MPI rank: its main
does that itself.)

Every tool runs as `python -m distgpt.<tool>` and as the console script `distgpt-<tool>`
(pyproject.toml), and answers `--version`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn


def check_switches(tool: str) -> None:
    """The DISTGPT_* environment switches are valid (distgpt/switches.py), else one line and exit 2:
    a typo is found before any work, not as a traceback from inside a gemm."""
    from distgpt import switches

    try:
        switches.check()
    except switches.SwitchError as e:
        fail(tool, str(e))


def fail(tool: str, message: str) -> NoReturn:
    # one line even when a library's message has several (pydantic, JSON decoders)
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    print(f"{tool}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def version() -> str:
    """The installed distribution's version (pyproject.toml's, through the package metadata)."""
    import importlib.metadata  # ~50 ms: only when asked

    try:
        return importlib.metadata.version("distgpt")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed: pip install -e .)"


def add_version(parser: argparse.ArgumentParser) -> None:
    """`--version`: prints `distgpt <version>` and exits 0, as argparse's version action does.
    Adding it twice is a no-op (Parser adds it already)."""
    if "--version" in parser._option_string_actions:
        return
    parser.add_argument("--version", action=_VersionAction)


class _VersionAction(argparse.Action):
    """argparse's "version" action, but the version is looked up only when --version is given."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str = "print distgpt's version and exit") -> None:
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"distgpt {version()}")
        parser.exit()


def prog_name(tool: str) -> str:
    """How the user started the tool, for usage lines: the console script `distgpt-<tool>` when that
    is what runs, else `python -m distgpt.<tool>`."""
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return script if script == f"distgpt-{tool}" else f"python -m distgpt.{tool}"


def file_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be read as a file ("no such file", "is a folder, expected a file", ...), or
    None when it can. For options that take a file, e.g. train's --config."""
    p = Path(path).expanduser()
    if p.is_dir():
        return "is a folder, expected a file"
    if not p.exists():
        return "no such file" if p.parent.is_dir() else f"no such file (folder {p.parent} does not exist)"
    if not p.is_file():
        return "is not a regular file"
    if not os.access(p, os.R_OK):
        return "is not readable (permission denied)"
    return None


def make_dirs(folder: str | os.PathLike) -> list[Path]:
    """mkdir -p that returns the folders it created, outermost first, for remove_new_dirs."""
    folder = Path(folder)
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def remove_new_dirs(created: list[Path]) -> None:
    """After a failed command: remove the folders make_dirs created, innermost first, as long as they
    are empty (a failed command leaves no empty folders behind, and never removes anything else)."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            return  # not empty, or already gone: leave it and its parents


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors and --version; `tool` is the short name errors start with."""

    def __init__(self, tool: str, **kwargs):
        super().__init__(prog=prog_name(tool), **kwargs)
        self.tool = tool
        add_version(self)

    def error(self, message: str) -> NoReturn:
        fail(self.tool, f"{message} (see --help)")
