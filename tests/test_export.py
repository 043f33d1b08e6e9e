"""export never deletes or overwrites what it did not write, refuses a training run's own folders,
and writes a GPT-2-tokenizer model's tokenizer so that transformers loads the folder offline.

Every refusal test takes a checksum of every file under the folders involved before and after:
what was on disk must be byte-identical, nothing added, nothing removed."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it: never the network

import numpy as np
import pytest

from distgpt import checkpoint
from distgpt.config import Config
from distgpt.dist import Comm
from distgpt.model import Layout, ModelConfig, init_params
from distgpt.partition import Partition
from distgpt.weights import HF_EXPORT_MARKER, load_init

from conftest import SHARED, cli_env, run_cli


def make_run(out_dir: Path, cfg: ModelConfig, tokenizer: str, seed: int = 0) -> np.ndarray:
    """A training run's out_dir as train leaves it: a checkpoint (with `latest`) and metrics.jsonl."""
    layout = Layout(cfg)
    params = np.zeros(layout.size, np.float32)
    init_params(layout, params, seed=seed)
    params += np.random.default_rng(seed).normal(0, 0.01, params.shape).astype(np.float32)
    meta = {"config": Config(model=cfg).to_dict(), "tokenizer": tokenizer}
    zeros = np.zeros_like(params)
    checkpoint.save_checkpoint(out_dir, 5, Comm(), layout, Partition(layout.size, 1, 0), params, zeros,
                               zeros, meta, 2)
    (out_dir / "metrics.jsonl").write_text('{"step": 5, "train_loss": 1.0}\n')
    return params


BYTES_MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=257, vocab_multiple=1)


def weights(path: Path) -> np.ndarray:
    """The exported weights, in the run's layout (no vocabulary padding)."""
    return load_init(str(path), BYTES_MODEL)[1]


@pytest.fixture(scope="module")
def bytes_run(tmp_path_factory) -> tuple[Path, np.ndarray]:
    out = tmp_path_factory.mktemp("runs") / "bytes"
    return out, make_run(out, BYTES_MODEL, "bytes")


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "gpt2"
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=50257)
    make_run(out, cfg, "gpt2", seed=1)
    return out


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file (hidden ones included) under each root, and every folder's name, by path."""
    found = {}
    for root in roots:
        if root.is_file():
            found[str(root)] = hashlib.sha256(root.read_bytes()).hexdigest()
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames:
                found[os.path.join(dirpath, name)] = "dir"
            for name in filenames:
                path = os.path.join(dirpath, name)
                found[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return found


def export(*args: str, cwd: Path | None = None, **kw) -> subprocess.CompletedProcess:
    return run_cli("export", *args, cwd=cwd, timeout=120, **kw)


def refused(r: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2 and exactly one line `export: error: ...` holding each needle."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("export: error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ----------------------------------------------------------------------------------------------------
# hf: folders export did not write


def test_hf_into_a_users_folder_is_refused_and_nothing_changes(bytes_run, tmp_path):
    run, _ = bytes_run
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "config.json").write_text('{"mine": true}\n')
    before = snapshot(tmp_path, run)
    r = export("--ckpt", str(run), "--format", "hf", "--out", str(folder))
    refused(r, str(folder), "config.json", "notes.txt", "--force")
    assert snapshot(tmp_path, run) == before  # before: the folder and the notes were deleted, exit 0


def test_hf_force_replaces_only_the_files_export_writes(bytes_run, tmp_path):
    run, params = bytes_run
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "sub" / "data.bin").write_bytes(b"\x00\x01")
    (folder / "config.json").write_text('{"mine": true}\n')
    before = snapshot(folder)
    r = export("--ckpt", str(run), "--format", "hf", "--out", str(folder), "--force")
    assert r.returncode == 0, r.stderr
    after = snapshot(folder)
    for path in (folder / "notes.txt", folder / "sub", folder / "sub" / "data.bin"):
        assert after[str(path)] == before[str(path)]
    assert after[str(folder / "config.json")] != before[str(folder / "config.json")]
    assert np.array_equal(weights(folder), params)


def test_hf_reexport_into_an_earlier_export_needs_no_force(bytes_run, tmp_path):
    run, params = bytes_run
    folder = tmp_path / "exported"
    for _ in range(2):  # the second run finds its own earlier output and replaces it
        r = export("--ckpt", str(run), "--format", "hf", "--out", str(folder))
        assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in folder.iterdir()) == [HF_EXPORT_MARKER, "config.json", "model.safetensors"]
    assert np.array_equal(weights(folder), params)
    # an exported file the user has edited since is theirs now: refused
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "note": "tuned by hand"}))
    before = snapshot(folder)
    refused(export("--ckpt", str(run), "--format", "hf", "--out", str(folder)), "config.json")
    assert snapshot(folder) == before


def test_hf_export_replaces_its_own_stale_tokenizer_files(bytes_run, gpt2_run, tmp_path):
    """A bytes model exported over an earlier gpt2 export: the old vocab.json / merges.txt would describe
    the wrong vocabulary, and they are export's own (unchanged), so they go."""
    folder = tmp_path / "exported"
    assert export("--ckpt", str(gpt2_run), "--format", "hf", "--out", str(folder)).returncode == 0
    assert (folder / "vocab.json").exists()
    r = export("--ckpt", str(bytes_run[0]), "--format", "hf", "--out", str(folder))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in folder.iterdir()) == [HF_EXPORT_MARKER, "config.json", "model.safetensors"]


@pytest.mark.parametrize("where", ["out_dir", "ckpt", "checkpoint", "inside_checkpoint"])
@pytest.mark.parametrize("force", [False, True])
def test_a_runs_own_folders_are_refused(bytes_run, where, force):
    run, _ = bytes_run
    step = checkpoint.list_checkpoints(run)[0]
    out = {"out_dir": run, "ckpt": run / "ckpt", "checkpoint": step, "inside_checkpoint": step / "hf"}[where]
    before = snapshot(run)
    r = export("--ckpt", str(step), "--format", "hf", "--out", str(out), *(["--force"] if force else []))
    refused(r, str(out))
    assert snapshot(run) == before  # before: out_dir's checkpoints and metrics.jsonl were deleted


def test_a_run_out_dir_is_refused_even_when_reading_other_weights(bytes_run, tmp_path):
    run, _ = bytes_run
    other = tmp_path / "other"
    make_run(other, ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=257), "bytes")
    before = snapshot(run)
    refused(export("--ckpt", str(other), "--format", "hf", "--out", str(run), "--force"), "out_dir")
    assert snapshot(run) == before


def test_hf_onto_a_file_is_refused(bytes_run, tmp_path):
    target = tmp_path / "model"
    target.write_text("not a folder\n")
    before = snapshot(tmp_path)
    for force in ([], ["--force"]):
        r = export("--ckpt", str(bytes_run[0]), "--format", "hf", "--out", str(target), *force)
        refused(r, str(target), "is a file")
    assert snapshot(tmp_path) == before  # before: replaced, the original hidden as .model.old-PID


def test_hf_out_dot(bytes_run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = export("--ckpt", str(bytes_run[0]), "--format", "hf", "--out", ".", cwd=empty)
    assert r.returncode == 0, r.stderr  # before: "PosixPath('.') has an empty name"
    assert (empty / "model.safetensors").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("x")
    before = snapshot(busy)
    refused(export("--ckpt", str(bytes_run[0]), "--format", "hf", "--out", ".", cwd=busy), "notes.txt")
    assert snapshot(busy) == before


def test_source_folder_as_out_is_refused(bytes_run, tmp_path):
    folder = tmp_path / "hf"
    assert export("--ckpt", str(bytes_run[0]), "--format", "hf", "--out", str(folder)).returncode == 0
    before = snapshot(folder)
    r = export("--ckpt", str(folder), "--format", "hf", "--out", str(folder), "--force")
    refused(r, "--ckpt source")
    assert snapshot(folder) == before


def limit_file_size(n_bytes: int):
    """preexec_fn: writes beyond n_bytes fail with EFBIG (Python ignores SIGXFSZ), like a full disk."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))


@pytest.mark.parametrize("fmt", ["hf", "llmc"])
def test_a_failed_export_leaves_no_folder_behind(bytes_run, tmp_path, fmt):
    target = tmp_path / "a" / "b" / ("hf" if fmt == "hf" else "model.bin")
    r = export("--ckpt", str(tmp_path / "missing"), "--format", fmt, "--out", str(target))
    refused(r, "missing")
    assert list(tmp_path.iterdir()) == []
    # a write that fails half way (the weights do not fit): the folders it made are gone again
    r = subprocess.run(
        [sys.executable, "-m", "distgpt.export", "--ckpt", str(bytes_run[0]), "--format", fmt,
         "--out", str(target)], env=cli_env(), capture_output=True, text=True, timeout=120,
        preexec_fn=limit_file_size(20_000))
    refused(r, "File too large")
    assert list(tmp_path.iterdir()) == []  # before: a/ and a/b/ stayed
    if fmt == "hf":  # an empty folder the user made stays, and stays empty
        target.mkdir(parents=True)
        r = subprocess.run(
            [sys.executable, "-m", "distgpt.export", "--ckpt", str(bytes_run[0]), "--format", fmt,
             "--out", str(target)], env=cli_env(), capture_output=True, text=True, timeout=120,
            preexec_fn=limit_file_size(20_000))
        refused(r, "File too large")
        assert list(target.iterdir()) == []


# ----------------------------------------------------------------------------------------------------
# llmc: files export did not write


def test_llmc_over_a_foreign_file_is_refused_unless_forced(bytes_run, tmp_path):
    run, params = bytes_run
    target = tmp_path / "model.bin"
    target.write_bytes(b"an llm.c checkpoint trained elsewhere")
    before = snapshot(tmp_path)
    refused(export("--ckpt", str(run), "--format", "llmc", "--out", str(target)), str(target), "--force")
    assert snapshot(tmp_path) == before
    assert export("--ckpt", str(run), "--format", "llmc", "--out", str(target), "--force").returncode == 0
    assert np.array_equal(weights(target), params)
    # export's own earlier file is replaced without --force
    r = export("--ckpt", str(run), "--format", "llmc", "--out", str(target))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_llmc_file_from_llmc_itself_is_not_ours(bytes_run, tmp_path):
    """A valid llm.c checkpoint that export did not write (no tag in the header) is the user's."""
    run, _ = bytes_run
    target = tmp_path / "gpt2_124M.bin"
    assert export("--ckpt", str(run), "--format", "llmc", "--out", str(target)).returncode == 0
    data = bytearray(target.read_bytes())
    data[1020:1024] = b"\0\0\0\0"  # the header as llm.c's writer leaves it: ints 8..255 are zero
    target.write_bytes(bytes(data))
    assert load_init(str(target))[0].n_layer == 2  # still a readable llm.c checkpoint
    before = snapshot(tmp_path)
    refused(export("--ckpt", str(run), "--format", "llmc", "--out", str(target)), "--force")
    assert snapshot(tmp_path) == before


def test_llmc_onto_a_folder_or_dot_is_one_line(bytes_run, tmp_path):
    before = snapshot(tmp_path)
    run = str(bytes_run[0])
    refused(export("--ckpt", run, "--format", "llmc", "--out", str(tmp_path)), "is a folder")
    refused(export("--ckpt", run, "--format", "llmc", "--out", ".", cwd=tmp_path), "is a folder")
    assert snapshot(tmp_path) == before


def test_llmc_into_a_checkpoint_folder_is_refused(bytes_run):
    run, _ = bytes_run
    step = checkpoint.list_checkpoints(run)[0]
    before = snapshot(run)
    refused(export("--ckpt", str(run), "--format", "llmc", "--out", str(step / "m.bin")), "checkpoint folder")
    assert snapshot(run) == before


# ----------------------------------------------------------------------------------------------------
# the tokenizer of an hf export


TEXTS = ["Hello world", "  leading spaces\n\n\ttabs and\r\nCRLF", "héllo wörld € 🙂!",
         "It's we'll 123 4567 ...!!", "def f(x):\n    return x ** 2  # comment"]


def test_hf_export_of_a_gpt2_model_loads_its_tokenizer_offline(gpt2_run, tmp_path):
    import tiktoken
    import transformers

    folder = tmp_path / "exported"
    r = export("--ckpt", str(gpt2_run), "--format", "hf", "--out", str(folder))
    assert r.returncode == 0, r.stderr
    assert "tokenizer: gpt2" in r.stdout
    # the same bytes tiktoken reads (its cache, which the tests fill from the shared fixture)
    cache = SHARED / "tiktoken_cache"  # file names: sha1 of the URLs (see its README)
    encoder_json = cache / "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6"
    vocab_bpe = cache / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee"
    assert (folder / "vocab.json").read_bytes() == encoder_json.read_bytes()
    assert (folder / "merges.txt").read_bytes() == vocab_bpe.read_bytes()
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)  # conftest's cli_env does this for the tools
    enc = tiktoken.get_encoding("gpt2")
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert tok.model_max_length == 64 and tok.eos_token == "<|endoftext|>"
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == enc.encode_ordinary(text), text
        assert tok.decode(ids) == text
    # and the model itself loads beside it
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    assert model.config.vocab_size == 50257


def test_hf_export_of_a_bytes_model_writes_no_tokenizer_and_says_so(bytes_run, tmp_path):
    folder = tmp_path / "exported"
    r = export("--ckpt", str(bytes_run[0]), "--format", "hf", "--out", str(folder))
    assert r.returncode == 0, r.stderr
    assert "no tokenizer files" in r.stdout and "bytes" in r.stdout
    assert not (folder / "vocab.json").exists() and not (folder / "tokenizer_config.json").exists()


def test_gpt2_tokenizer_without_its_files_is_one_line(gpt2_run, tmp_path):
    empty_cache = tmp_path / "cache"
    empty_cache.mkdir()
    # an unreachable proxy keeps tiktoken's download attempt from touching the network
    env = {"TIKTOKEN_CACHE_DIR": str(empty_cache), "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    r = export("--ckpt", str(gpt2_run), "--format", "hf", "--out", str(tmp_path / "x"), env=env)
    refused(r, "TIKTOKEN_CACHE_DIR")
    assert not (tmp_path / "x").exists()
