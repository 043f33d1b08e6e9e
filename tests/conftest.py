"""Shared helpers: the fixtures' paths, one runner for the real command-line tools (with and
without mpirun), a tiny config, the Hugging Face reference model, relative error.

Markers (pyproject.toml): `mpi` for tests that start mpirun, `slow` for the ones that take more
than a few seconds; `pytest -m "not slow and not mpi"` is the fast loop."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
TINYSHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
MPIRUN = Path(sys.executable).parent / "mpirun"


def cli_env(**extra: str) -> dict[str, str]:
    """The environment the tools run in: offline, with the shared fixtures (BPE files, corpus)."""
    return {**os.environ, "TIKTOKEN_CACHE_DIR": str(SHARED / "tiktoken_cache"),
            "DISTGPT_TINYSHAKESPEARE": str(TINYSHAKESPEARE), "HF_HUB_OFFLINE": "1", **extra}


def cli_command(module: str, *args: str, ranks: int = 0) -> list[str]:
    """`python -m distgpt.<module> args`, under `mpirun -n ranks` when ranks > 0."""
    cmd = [sys.executable, "-m", f"distgpt.{module}", *args]
    return [str(MPIRUN), "-n", str(ranks), *cmd] if ranks else cmd


def run_cli(module: str, *args: str, ranks: int = 0, cwd: Path | None = None, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m distgpt.<module> args` (under mpirun when ranks > 0) to completion."""
    return subprocess.run(cli_command(module, *args, ranks=ranks), cwd=cwd, env=cli_env(**(env or {})),
                          capture_output=True, text=True, timeout=timeout)


def rel(a, b) -> float:
    """Relative error |a - b| / |b| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line]


@pytest.fixture(scope="session")
def shakespeare_bytes(tmp_path_factory) -> Path:
    """Tiny Shakespeare as byte-level shards (from the shared fixture, no network)."""
    out = tmp_path_factory.mktemp("data") / "shakespeare_bytes"
    r = run_cli("prepare", "--source", "tinyshakespeare", "--tokenizer", "bytes", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def tiny_config(tmp_path: Path, data_dir: Path, **sections) -> Path:
    """A small byte-level model config file; `sections` update its sections (model=..., train=...)."""
    import yaml

    cfg = {
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 257,
                  "vocab_multiple": 1},
        "data": {"train": str(data_dir / "train_*.bin"), "val": str(data_dir / "val_*.bin")},
        # fp32 unless a test asks for bf16: the same arithmetic on every CPU (auto picks bf16 on some)
        "train": {"batch_size": 12, "micro_batch_size": 4, "seq_len": 32, "max_steps": 5, "lr": 1e-3,
                  "min_lr": 1e-4, "warmup_steps": 2, "log_every": 1, "eval_every": 0, "eval_steps": 2,
                  "precision": "fp32"},
        "out_dir": str(tmp_path / "out"),
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(name, {}).update(values)
        else:
            cfg[name] = values
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def tiny_hf_gpt2(vocab: int, n_positions: int, n_embd: int, n_layer: int, n_head: int, seed: int = 0,
                 **config):
    """The tests' independent reference: a small random transformers.GPT2LMHeadModel with dropout off,
    eager attention, in eval mode. `config` adds or overrides GPT2Config fields."""
    import torch
    import transformers

    torch.manual_seed(seed)
    fields = dict(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                  resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=0, eos_token_id=0)
    cfg = transformers.GPT2Config(**{**fields, **config})
    cfg._attn_implementation = "eager"   # transformers 5 takes it on the config, not the constructor
    return transformers.GPT2LMHeadModel(cfg).eval()


def bf16_env() -> dict[str, str]:
    """The environment under which train.precision=bf16 runs here: none needed where a bf16 gemm
    is fast (a CPU with bf16 instructions and oneDNN or, on Intel, MKL); elsewhere MKL's
    emulation, forced (the same numerics, only slower), so that the bf16 tests run on every CPU.
    Skips where MKL is not installed (as require_mkl)."""
    from distgpt import gemm16, switches

    require_mkl()
    if gemm16.load("auto").fast and switches.get("DISTGPT_BF16_EMULATED") != "1":
        return {}
    return {"DISTGPT_BF16_GEMM": "mkl", "DISTGPT_BF16_EMULATED": "1"}


@pytest.fixture
def bf16_here(monkeypatch) -> dict[str, str]:
    """bf16_env() for this process too: set in the environment, and the process's bf16 gemm chosen
    from it for the test (the one before put back after)."""
    from distgpt import gemm16

    env = bf16_env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    previous = gemm16.use(gemm16.load())
    yield env
    gemm16.use(previous)


def require_mkl() -> None:
    """Fail when MKL is missing where the test extra installs it (x86-64 Linux); skip elsewhere."""
    from distgpt import native

    if native.mkl_library_path() is None:
        if sys.platform != "linux" or platform.machine() != "x86_64":
            pytest.skip("the test extra installs MKL on x86-64 Linux only")
        pytest.fail("the mkl package is not installed: `pip install -e '.[test]'` installs it")


@pytest.fixture(params=["numpy", "mkl"])
def blas_backend(request):
    """Run the test once with NumPy's BLAS and once with MKL (the process's choice before put back after)."""
    from distgpt import blas

    if request.param == "mkl":
        require_mkl()
    previous = blas.use(request.param)
    yield request.param
    blas.use(previous)
