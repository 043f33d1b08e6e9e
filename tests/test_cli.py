"""The console scripts (pyproject.toml's [project.scripts]) beside `python -m`, their exit codes,
--version, and the shared command-line helpers of distgpt/cli.py."""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from distgpt.cli import add_version, file_problem, make_dirs, remove_new_dirs

from conftest import cli_env

BIN = Path(sys.executable).parent
TOOLS = ["train", "prepare", "sample", "export", "plot"]
VERSION = importlib.metadata.version("distgpt")


def script(tool: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    path = BIN / f"distgpt-{tool}"
    assert path.exists(), f"{path} missing: `pip install -e .` installs the console scripts"
    return subprocess.run([str(path), *args], env=cli_env(), cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("tool", TOOLS)
def test_console_script_help(tool):
    r = script(tool, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: ")


@pytest.mark.parametrize("tool", TOOLS)
def test_console_script_version(tool):
    r = script(tool, "--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == VERSION, r.stdout  # "distgpt 0.1.0"


@pytest.mark.parametrize("tool", ["prepare", "sample", "export"])
def test_usage_names_the_console_script(tool):
    r = script(tool, "--no-such-flag")
    assert r.returncode == 2
    assert r.stderr.startswith(f"{tool}: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert script(tool, "--help").stdout.startswith(f"usage: distgpt-{tool} ")


def test_console_scripts_pass_exit_codes_through(tmp_path):
    """A console script exits with what main() returns (train, prepare, plot) or exits with
    (sample, export): 2 for a user's mistake, as under python -m."""
    for tool, args in {
        "prepare": ["--source", str(tmp_path / "none.txt"), "--tokenizer", "bytes", "--out",
                    str(tmp_path / "o")],
        "sample": ["--ckpt", str(tmp_path / "none")],
        "export": ["--ckpt", str(tmp_path / "none"), "--format", "hf", "--out", str(tmp_path / "o")],
        "plot": [str(tmp_path / "none")],
        "train": ["--config", str(tmp_path / "none.yaml")],
    }.items():
        r = script(tool, *args)
        assert r.returncode == 2, (tool, r.stdout, r.stderr)
    assert list(tmp_path.iterdir()) == []


def test_add_version_prints_the_package_version(capsys):
    p = argparse.ArgumentParser(prog="x")
    add_version(p)
    add_version(p)  # a second call is a no-op, not an argparse conflict
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"distgpt {VERSION}\n"


def test_file_problem(tmp_path):
    (tmp_path / "c.yaml").write_text("a: 1\n")
    assert file_problem(tmp_path / "c.yaml") is None
    assert file_problem(tmp_path) == "is a folder, expected a file"
    assert file_problem(tmp_path / "missing.yaml") == "no such file"
    assert "does not exist" in file_problem(tmp_path / "no" / "c.yaml")


def test_make_dirs_and_remove_new_dirs(tmp_path):
    created = make_dirs(tmp_path / "a" / "b" / "c")
    assert created == [tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"]
    (tmp_path / "a" / "keep.txt").write_text("x")
    remove_new_dirs(created)
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["keep.txt"]  # a stays: not empty
    assert make_dirs(tmp_path / "a") == []
