"""The environment switches: one table, every value checked, the README lists exactly that table,
and no module reads a DISTGPT_* variable behind the table's back."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from distgpt import switches
from distgpt.switches import SwitchError

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_unset_or_empty_means_the_default(monkeypatch):
    monkeypatch.delenv("DISTGPT_BLAS", raising=False)
    assert switches.get("DISTGPT_BLAS") == "auto"
    monkeypatch.setenv("DISTGPT_BLAS", "")
    assert switches.get("DISTGPT_BLAS") == "auto"
    monkeypatch.setenv("DISTGPT_BLAS", "mkl")
    assert switches.get("DISTGPT_BLAS") == "mkl"


def test_a_value_outside_the_choices_names_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv("DISTGPT_JIT", "yes")
    with pytest.raises(SwitchError, match=r"DISTGPT_JIT='yes': expected one of 0, 1 \("):
        switches.get("DISTGPT_JIT")
    with pytest.raises(SwitchError, match="DISTGPT_JIT"):
        switches.check()


def test_an_unknown_distgpt_variable_gets_the_closest_name(monkeypatch):
    monkeypatch.setenv("DISTGPT_BF16_GEM", "onednn")
    with pytest.raises(SwitchError, match=r"DISTGPT_BF16_GEM is not one of distgpt's switches \(did you mean "
                                          r"DISTGPT_BF16_GEMM\?\)"):
        switches.check()


def test_active_lists_the_switches_set_away_from_their_defaults(monkeypatch):
    for s in switches.TABLE:
        monkeypatch.delenv(s.name, raising=False)
    monkeypatch.setenv("DISTGPT_BLAS", "auto")          # the default: not worth a header line
    monkeypatch.setenv("DISTGPT_JIT", "0")
    assert switches.active() == ["DISTGPT_JIT=0"]


def test_the_readme_table_is_the_switch_table():
    text = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `(DISTGPT_\w+)` \| ([^|]+) \| ([^|]+) \|", text, re.M)
    readme = {name: (default.strip(), kind.strip()) for name, default, kind in rows}
    table = {s.name: (s.default, s.kind) for s in switches.TABLE}
    assert readme.keys() == table.keys()
    for name, (default, kind) in table.items():
        assert readme[name][1] == kind, name
        assert readme[name][0] == default or (default == "" and readme[name][0].startswith(("(", "~"))), name


def test_no_module_reads_a_distgpt_variable_outside_the_table():
    """Every DISTGPT_* name in the package is in the table, and only switches.py touches os.environ
    for them (the others go through switches.get)."""
    for path in (ROOT / "distgpt").rglob("*.py"):
        text = path.read_text()
        for name in set(re.findall(r"DISTGPT_[A-Z0-9_]+", text)):
            assert name in switches.BY_NAME, f"{path.name}: {name}"
        if path.name != "switches.py":
            assert not re.search(r"environ(\.get)?[\[(]\s*[\"']DISTGPT_", text), path.name


@pytest.mark.parametrize("tool, args", [
    ("train", ["--dry-run"]), ("sample", ["--ckpt", "x"]),
    ("export", ["--ckpt", "x", "--format", "hf", "--out", "y"]),
    ("prepare", ["--source", "builtin", "--tokenizer", "bytes", "--out", "y"])])
@pytest.mark.parametrize("variable", ["DISTGPT_NO_MPI", "DISTGPT_BLAS", "DISTGPT_BF16_GEMM"])
def test_every_tool_refuses_a_bad_switch_with_one_line(tmp_path, tool, args, variable):
    """Checked first, before MPI starts (DISTGPT_NO_MPI decides whether it does) and before any work."""
    r = run_cli(tool, *args, cwd=tmp_path, env={variable: "bogus"})
    assert r.returncode == 2, r.stderr
    switch = switches.BY_NAME[variable]
    assert r.stderr.strip().splitlines() == [
        f"{'distgpt.train' if tool == 'train' else tool}: error: environment variable {variable}='bogus': "
        f"expected one of {', '.join(switch.choices)} ({switch.meaning})"]
    assert list(tmp_path.iterdir()) == []
