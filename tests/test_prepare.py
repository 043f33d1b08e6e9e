"""python -m distgpt.prepare end to end, run as a subprocess like a user would."""

import io
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distgpt.data import get_tokenizer, open_shards, read_shard
from distgpt.progress import Progress

from conftest import SHARED, TINYSHAKESPEARE, run_cli
from snapshot import tree_digest

# Tiny Shakespeare with the GPT-2 tokenizer: tiktoken's encode_ordinary gives 338,025 ids for the whole
# file; it is one document, so it is split by tokens and each split gets its own leading eot: +2.
TINYSHAKESPEARE_TOKENS = 338_027
TINYSHAKESPEARE_TEXT_TOKENS = 338_025


def run_prepare(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return run_cli("prepare", *args, cwd=cwd, timeout=120,
                   env={"DISTGPT_CACHE": str(cwd / "cache"), **env})  # never the user's real cache


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr
    return result


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def split_tokens(out: Path, split: str) -> np.ndarray:
    files = [e["file"] for e in manifest_of(out)["shards"] if e["split"] == split]
    return np.concatenate([read_shard(out / f) for f in files])


def decode_docs(tokens: np.ndarray, tokenizer_name: str) -> list[str]:
    """Documents of a split: every one must start with eot."""
    tok = get_tokenizer(tokenizer_name)
    assert len(tokens) and tokens[0] == tok.eot
    starts = list(np.flatnonzero(tokens == tok.eot)) + [len(tokens)]
    return [tok.decode(tokens[a + 1 : b]) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def assert_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(autouse=True)
def _tiktoken_cache(monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))


# ----------------------------------------------------------------------------------------------------
# local files

DOCS = ["First document.\nIt has two lines.", "Zweites Dokument: Grüße 🎉", "third\n\nwith a blank line"]


def test_txt_directory_one_doc_per_file(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    for i, doc in enumerate(DOCS):
        (src / f"{i}.txt").write_text(doc, encoding="utf-8")
    out = tmp_path / "out"
    ok(
        run_prepare(
            "--source",
            str(src),
            "--tokenizer",
            "bytes",
            "--out",
            str(out),
            "--val-fraction",
            "0.3",
            cwd=tmp_path,
        )
    )

    manifest = manifest_of(out)
    assert manifest["format"] == "distgpt-shards" and manifest["version"] == 1
    assert (manifest["tokenizer"], manifest["vocab_size"], manifest["eot"]) == ("bytes", 257, 256)
    assert manifest["source"] == str(src)
    assert [(e["file"], e["split"]) for e in manifest["shards"]] == [
        ("train_000000.bin", "train"),
        ("val_000000.bin", "val"),
    ]
    assert decode_docs(split_tokens(out, "train"), "bytes") == DOCS[:2]
    assert decode_docs(split_tokens(out, "val"), "bytes") == DOCS[2:]
    train = split_tokens(out, "train")
    assert manifest["max_token"] == 256 and manifest["shards"][0]["n_tokens"] == len(train)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train_000000.bin", "val_000000.bin"]
    # the output opens cleanly with the loader-side checks
    shards = open_shards(str(out / "train_*.bin"), 257, tokenizer="bytes")
    assert shards.n_tokens == [len(train)]


@pytest.mark.parametrize(
    "doc_per, expected",
    [("line", ["a b", "c", "d e f", "g"]), ("blank", ["a b\nc", "d e f\ng"])],
)
def test_txt_doc_per_line_and_blank(tmp_path, doc_per, expected):
    (tmp_path / "in.txt").write_text("a b\nc\n\n\nd e f\ng\n")
    out = tmp_path / "out"
    ok(
        run_prepare(
            "--source", "in.txt", "--tokenizer", "bytes", "--out", "out", "--doc-per", doc_per,
            "--val-fraction", "0", cwd=tmp_path,
        )
    )  # fmt: skip
    assert decode_docs(split_tokens(out, "train"), "bytes") == expected
    assert all(e["split"] == "train" for e in manifest_of(out)["shards"])


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


JSON_DOCS = [f"Row {i}: the quick brown fox jumps over the lazy dog. Ünïcødé {i} 日本" for i in range(10)]


def test_jsonl_gpt2_several_shards(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", [{"id": i, "body": t} for i, t in enumerate(JSON_DOCS)])
    out = tmp_path / "out"
    ok(
        run_prepare(
            "--source", "data.jsonl", "--tokenizer", "gpt2", "--out", "out", "--text-field", "body",
            "--shard-tokens", "100", "--val-fraction", "0.2", "--workers", "2", cwd=tmp_path,
        )
    )  # fmt: skip
    manifest = manifest_of(out)
    assert (manifest["tokenizer"], manifest["vocab_size"], manifest["eot"]) == ("gpt2", 50257, 50256)
    train_files = [e for e in manifest["shards"] if e["split"] == "train"]
    assert len(train_files) > 1 and all(e["n_tokens"] == 100 for e in train_files[:-1])
    assert decode_docs(split_tokens(out, "train"), "gpt2") == JSON_DOCS[:8]
    assert decode_docs(split_tokens(out, "val"), "gpt2") == JSON_DOCS[8:]
    tok = get_tokenizer("gpt2")
    assert manifest["max_token"] == max(tok.eot, *(max(tok.encode(t)) for t in JSON_DOCS))


def test_parquet_bytes(tmp_path):
    pq.write_table(pa.table({"text": JSON_DOCS, "n": list(range(10))}), tmp_path / "d.parquet")
    out = tmp_path / "out"
    ok(
        run_prepare(
            "--source", "d.parquet", "--tokenizer", "bytes", "--out", "out", "--workers", "1", cwd=tmp_path
        )
    )
    assert decode_docs(split_tokens(out, "train"), "bytes") == JSON_DOCS[:9]
    assert decode_docs(split_tokens(out, "val"), "bytes") == JSON_DOCS[9:]


def test_missing_text_field(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, {"content": "no text here"}])
    result = run_prepare("--source", "d.jsonl", "--tokenizer", "bytes", "--out", "out", cwd=tmp_path)
    assert_error(result, "d.jsonl:2", "'text'", "content")
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").glob("*.bin"))  # nothing half-done left behind

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    result = run_prepare("--source", "d.parquet", "--tokenizer", "bytes", "--out", "out", cwd=tmp_path)
    assert_error(result, "d.parquet", "'text'", "body")


def test_failed_rerun_leaves_the_earlier_output_as_it_was(tmp_path):
    # the new run fails after its first shards are written (its first 1.3 MB are more than one encoding
    # chunk; row 31 lacks the text field): the earlier output, whose shards have the same names, must
    # still be there and match its manifest
    write_jsonl(tmp_path / "good.jsonl", [{"text": t} for t in JSON_DOCS])
    rows = [{"text": "other text " * 4000}] * 30 + [{"body": "no text"}]
    write_jsonl(tmp_path / "bad.jsonl", rows)
    args = ("--tokenizer", "bytes", "--out", "out", "--shard-tokens", "100000", "--workers", "1")
    ok(run_prepare("--source", "good.jsonl", *args, cwd=tmp_path))
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert_error(run_prepare("--source", "bad.jsonl", *args, cwd=tmp_path), "bad.jsonl:31")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert decode_docs(split_tokens(out, "train"), "bytes") == JSON_DOCS[:9]
    open_shards(str(out / "*.bin"), 257, tokenizer="bytes")  # sizes agree with the manifest


def test_rerun_replaces_output_and_removes_stale_shards(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 1000)
    args = ("--source", "a.txt", "--tokenizer", "bytes", "--out", "out")
    ok(run_prepare(*args, "--shard-tokens", "100", cwd=tmp_path))
    assert len(list((tmp_path / "out").glob("train_*.bin"))) == 10
    ok(run_prepare(*args, cwd=tmp_path))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "manifest.json",
        "train_000000.bin",
        "val_000000.bin",
    ]


# ----------------------------------------------------------------------------------------------------
# named sources


def test_files_prepare_did_not_write_are_refused_and_kept(tmp_path):
    """Shards with prepare's names that no manifest of its own lists (llm.c's tools write the same
    names and format), or a manifest.json of something else: before, the shards were overwritten or
    deleted as stale; now prepare refuses before any work and everything stays byte-identical."""
    (tmp_path / "a.txt").write_text("x" * 1000)
    args = ("--source", "a.txt", "--tokenizer", "bytes", "--out", "out")
    out = tmp_path / "out"
    out.mkdir()
    (out / "input.txt").write_text("the raw corpus may live here")  # names prepare never writes: fine
    (out / "train_000007.bin").write_bytes(b"someone else's shard")
    (out / "val_000000.bin").write_bytes(b"someone else's val shard")
    before = tree_digest(tmp_path)
    assert_error(run_prepare(*args, cwd=tmp_path), "train_000007.bin", "val_000000.bin", "did not write")
    assert tree_digest(tmp_path) == before
    (out / "train_000007.bin").unlink()
    (out / "val_000000.bin").unlink()
    (out / "manifest.json").write_text('{"format": "something else"}')
    before = tree_digest(tmp_path)
    assert_error(run_prepare(*args, cwd=tmp_path), "manifest.json")
    assert tree_digest(tmp_path) == before
    (out / "manifest.json").unlink()
    ok(run_prepare(*args, cwd=tmp_path))  # the corpus file beside the output is no obstacle
    assert (out / "input.txt").read_text() == "the raw corpus may live here"


def test_tinyshakespeare_gpt2(tmp_path):
    out = tmp_path / "ts"
    result = ok(
        run_prepare("--source", "tinyshakespeare", "--tokenizer", "gpt2", "--out", str(out), cwd=tmp_path)
    )
    assert "338,027 tokens" in result.stderr  # the summary line
    manifest = manifest_of(out)
    assert sum(e["n_tokens"] for e in manifest["shards"]) == TINYSHAKESPEARE_TOKENS
    train, val = split_tokens(out, "train"), split_tokens(out, "val")
    assert (len(train), len(val)) == (304_224, 33_803)  # one document: its tokens split 90/10
    assert train[0] == val[0] == 50256
    text_ids = np.concatenate([train[1:], val[1:]])
    assert len(text_ids) == TINYSHAKESPEARE_TEXT_TOKENS
    assert get_tokenizer("gpt2").decode(text_ids) == TINYSHAKESPEARE.read_text(encoding="utf-8")
    assert not (tmp_path / "cache").exists()  # used the local copy, downloaded nothing


def test_builtin_bytes(tmp_path):
    ok(
        run_prepare(
            "--source", "builtin", "--tokenizer", "bytes", "--out", "b", "--max-docs", "5", cwd=tmp_path
        )
    )
    docs = decode_docs(split_tokens(tmp_path / "b", "train"), "bytes")
    docs += decode_docs(split_tokens(tmp_path / "b", "val"), "bytes")
    assert len(docs) == 5
    compile(docs[0], "<stdlib>", "exec")  # really Python source
    # deterministic for a given Python install
    ok(
        run_prepare(
            "--source", "builtin", "--tokenizer", "bytes", "--out", "b2", "--max-docs", "5", cwd=tmp_path
        )
    )
    assert (tmp_path / "b" / "train_000000.bin").read_bytes() == (
        tmp_path / "b2" / "train_000000.bin"
    ).read_bytes()


# ----------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("source", ["missing.txt", "./missing_dir", "no/such/dir", "data/*.jsonl", "mycorpus",
                                    "my-corpus_v2", "owner/"])
def test_nonexistent_source(tmp_path, source):
    """A name that cannot be a hub dataset id (owner/name) and does not exist fails at once, without
    asking the hub (before: `mycorpus` waited 24 s on hub retries, then failed)."""
    (tmp_path / "notes.txt").write_text("mine\n")
    t0 = time.perf_counter()
    result = run_prepare("--source", source, "--tokenizer", "bytes", "--out", "a/out", cwd=tmp_path,
                         HF_HUB_OFFLINE="0")  # a hub lookup would retry for 24 s here (no network)
    assert time.perf_counter() - t0 < 15  # the tool's start-up alone; the retries would take 24 s more
    assert_error(result, source, "does not exist")
    if "/" not in source and "." not in source:
        assert "owner/name" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_hub_ids_are_owner_slash_name(tmp_path, monkeypatch):
    from distgpt.prepare import looks_like_path

    monkeypatch.chdir(tmp_path)
    assert not looks_like_path("roneneldan/TinyStories")
    assert not looks_like_path("HuggingFaceFW/fineweb-edu")
    for local in ("mycorpus", "wikitext", "a/b/c", "./x", "x.txt", "owner/", "/name"):
        assert looks_like_path(local), local
    (tmp_path / "roneneldan").mkdir()  # a local folder of that name makes it a path
    assert looks_like_path("roneneldan/TinyStories")


def test_failed_prepare_leaves_no_new_folders(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": ""}])
    before = sorted(p.name for p in tmp_path.iterdir())
    for source in ("empty.txt", "blank.jsonl"):  # fails before, and after, --out is made
        result = run_prepare("--source", source, "--tokenizer", "bytes", "--out", "a/b/out", cwd=tmp_path)
        assert_error(result, "empty corpus")
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # before: a/b/out stayed, empty
    # an existing --out stays, with what is in it
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "x.txt").write_text("x")
    result = run_prepare("--source", "blank.jsonl", "--tokenizer", "bytes", "--out", "keep", cwd=tmp_path)
    assert_error(result, "empty corpus")
    assert [p.name for p in (tmp_path / "keep").iterdir()] == ["x.txt"]


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    result = run_prepare("--source", "empty.txt", "--tokenizer", "bytes", "--out", "out", cwd=tmp_path)
    assert_error(result, "empty corpus", "empty.txt")
    write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": ""}])
    result = run_prepare("--source", "blank.jsonl", "--tokenizer", "bytes", "--out", "out", cwd=tmp_path)
    assert_error(result, "empty corpus", "0 tokens")
    assert not (tmp_path / "out").exists()


def test_unknown_tokenizer(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    result = run_prepare("--source", "a.txt", "--tokenizer", "llama", "--out", "out", cwd=tmp_path)
    assert_error(result, "'llama'", "gpt2, bytes")


# ----------------------------------------------------------------------------------------------------
# progress reporter


def test_progress_plain_lines_and_summary():
    stream = io.StringIO()  # not a TTY: plain lines
    with Progress(None, "enc", unit="tokens", stream=stream, interval=0.0) as p:
        p.update(1500)
        p.set_postfix(shards=3)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("enc: 1.5k tokens")
    assert lines[-1].startswith("enc: done, 1,500 tokens in ") and "tokens/s" in lines[-1]
    assert lines[-1].endswith("shards=3")

    quiet = io.StringIO()
    with Progress(10, "x", stream=quiet, interval=3600) as p:
        p.update(5)
    assert len(quiet.getvalue().splitlines()) == 1  # only the summary within the interval


def test_a_manifest_listing_other_files_does_not_make_prepare_delete_them(tmp_path):
    """Only shard names in the output folder count as an earlier prepare's shards: a manifest that
    lists "../victim.txt" or "notes.txt" (edited, or copied from elsewhere) deletes neither."""
    (tmp_path / "a.txt").write_text("x" * 1000)
    args = ("--source", "a.txt", "--tokenizer", "bytes", "--out", "out")
    ok(run_prepare(*args, cwd=tmp_path))
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"] += [{"file": "../victim.txt"}, {"file": "notes.txt"}]
    (out / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "victim.txt").write_text("keep me")
    (out / "notes.txt").write_text("keep me too")
    ok(run_prepare(*args, cwd=tmp_path))
    assert (tmp_path / "victim.txt").read_text() == "keep me"
    assert (out / "notes.txt").read_text() == "keep me too"
