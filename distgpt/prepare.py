"""Turn a text corpus into token shards: python -m distgpt.prepare --source SRC --tokenizer NAME --out DIR

Writes DIR/train_000000.bin, ..., DIR/val_000000.bin and, last, DIR/manifest.json. Every document is
preceded by the end-of-text token (GPT-2 / llm.c convention). The last documents go to val; a corpus of
a single document is split by tokens instead. The files are built in DIR/.prepare.tmp and moved in
once all of them are written: a run that fails (a full disk, a bad row) leaves an earlier output as it was.

Sources, in the order they are recognised:
  builtin            the standard library's .py files (no network, deterministic for a Python install)
  tinyshakespeare    downloaded once into $DISTGPT_CACHE (or ~/.cache/distgpt); $DISTGPT_TINYSHAKESPEARE
                     may name a local copy instead
  an existing path   a .txt/.jsonl/.parquet file, a directory of them (recursive), or a glob
  a path-like name   that does not exist: an error at once, never a download. Path-like: starts with
                     / . ~, has a glob character or a data-file suffix, has no '/' (a single word) or
                     more than one, or its first component exists here
  owner/name         anything else: a Hugging Face hub dataset, e.g. roneneldan/TinyStories. Hub
                     dataset ids have exactly one '/' (the Hub keeps every dataset under an owner,
                     its former top-level ones included, e.g. Salesforce/wikitext), which is what
                     tells a hub id from a local name such as a mistyped `mycorpus`
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
import sysconfig
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distgpt import switches
from distgpt.cli import Parser, check_switches, make_dirs, remove_new_dirs
from distgpt.data import MANIFEST_NAME, DataError, Tokenizer, get_tokenizer, write_shard
from distgpt.fileio import DiskFullError, atomic_write, fsync_dir, write_json_atomic
from distgpt.progress import Progress

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
BUILTIN_MAX_CHARS = 5_000_000  # ~5 MB of stdlib source keeps the quickstart to seconds
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
DATAFILE_SUFFIXES = {*LOCAL_SUFFIXES, ".json", ".csv", ".gz", ".zst", ".bin", ".arrow"}
CHUNK_CHARS = 1 << 20  # text per worker task: big enough to amortise pickling, small enough to balance
SHARD_NAME = re.compile(r"^(train|val)_\d{6}\.bin$")
STAGING = ".prepare.tmp"  # inside --out; a dot-name, so no train_*.bin glob looks into it


class PrepareError(Exception):
    pass


# ----------------------------------------------------------------------------------------------------
# corpora: `docs()` yields document texts and can be called again; `count(limit)` is a cheap document
# count (at most `limit` when given), needed up front to know where the val documents (the last ones) begin.


@dataclass
class Corpus:
    docs: Callable[[], Iterator[str]]
    count: Callable[[int | None], int]


def builtin_corpus(max_docs: int | None) -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip_dirs = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}

    def files() -> Iterator[Path]:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)  # sorted: deterministic order
            for name in sorted(filenames):
                if name.endswith(".py") and not name.startswith("test_"):
                    yield Path(dirpath) / name

    def docs() -> Iterator[str]:
        used = 0
        for path in files():
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue  # a few stdlib files are legacy-encoded; skipping them keeps the corpus clean
            if not text:
                continue
            yield text
            used += len(text)
            if max_docs is None and used >= BUILTIN_MAX_CHARS:
                return

    return Corpus(docs, lambda limit: sum(1 for _ in itertools.islice(docs(), limit)))


def tinyshakespeare_corpus() -> Corpus:
    path = _tinyshakespeare_path()
    return Corpus(lambda: iter([path.read_text(encoding="utf-8")]), lambda limit: 1)


def _tinyshakespeare_path() -> Path:
    local = switches.get("DISTGPT_TINYSHAKESPEARE")
    if local:
        # an explicit local copy that is missing is a mistake to report, not a reason to download
        if not Path(local).is_file():
            raise PrepareError(f"DISTGPT_TINYSHAKESPEARE={local} is not a file")
        return Path(local)
    cache = Path(switches.get("DISTGPT_CACHE") or Path.home() / ".cache" / "distgpt")
    path = cache / "tinyshakespeare" / "input.txt"
    if not path.exists():
        print(f"prepare: downloading {TINYSHAKESPEARE_URL} -> {path}", file=sys.stderr)
        try:
            with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=60) as response:
                data = response.read()
        except OSError as e:
            raise PrepareError(
                f"could not download tinyshakespeare from {TINYSHAKESPEARE_URL}: {e} "
                "(set DISTGPT_TINYSHAKESPEARE to a local copy)"
            ) from e
        created = make_dirs(path.parent)  # only once there is something to keep in it
        try:
            with atomic_write(path) as f:
                f.write(data)
        except BaseException:
            remove_new_dirs(created)
            raise
    return path


def local_corpus(source: str, doc_per: str | None, text_field: str) -> Corpus:
    files = _local_files(source)
    readers = [_local_reader(path, doc_per, text_field) for path in files]

    def docs() -> Iterator[str]:
        for read, _ in readers:
            yield from read()

    def count(limit: int | None) -> int:
        total = 0
        for _, count_file in readers:
            total += count_file()
            if limit is not None and total >= limit:
                break  # a --max-docs sample of a huge corpus should not scan all of it
        return total

    return Corpus(docs, count)


def _local_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if glob.has_magic(source):
        files = [Path(p) for p in sorted(glob.glob(os.path.expanduser(source), recursive=True))]
        files = [p for p in files if p.is_file()]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)
    else:
        files = [path]
    for p in files:
        if p.suffix.lower() not in LOCAL_SUFFIXES:
            raise PrepareError(f"{p}: unsupported file type {p.suffix!r}, expected one of {LOCAL_SUFFIXES}")
    if not files:
        raise PrepareError(f"empty corpus: no {'/'.join(LOCAL_SUFFIXES)} files in {source}")
    return files


def _local_reader(path: Path, doc_per: str | None, field: str) -> tuple[Callable, Callable]:
    """(docs, count) for one file; txt files are split by `doc_per`, jsonl/parquet are one doc per row."""
    kind = path.suffix.lower()
    if kind == ".txt":
        mode = {None: "file", "row": "line"}.get(doc_per, doc_per)

        def txt_docs() -> Iterator[str]:
            return _txt_docs(path, mode)

        return txt_docs, lambda: sum(1 for _ in _txt_docs(path, mode))
    if doc_per not in (None, "row", "line"):
        raise PrepareError(
            f"--doc-per {doc_per} does not apply to {path} ({kind} files have one doc per row)"
        )
    if kind == ".jsonl":
        return (lambda: _jsonl_docs(path, field)), (lambda: _count_nonblank_lines(path))
    return (lambda: _parquet_docs(path, field)), (lambda: _parquet_rows(path))


def _open_text(path: Path):
    # strict decoding: silently replaced bytes would be baked into the training data
    return open(path, encoding="utf-8", errors="strict", newline="")


def _txt_docs(path: Path, mode: str) -> Iterator[str]:
    try:
        with _open_text(path) as f:
            if mode == "file":
                text = f.read()
                if text:
                    yield text
            elif mode == "line":
                for line in f:
                    line = line.rstrip("\r\n")
                    if line.strip():
                        yield line
            else:  # blank: paragraphs separated by blank lines
                para: list[str] = []
                for line in itertools.chain(f, [""]):
                    if line.strip():
                        para.append(line)
                    elif para:
                        yield "".join(para).rstrip("\r\n")
                        para = []
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from e


def _count_nonblank_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _jsonl_docs(path: Path, field: str) -> Iterator[str]:
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise PrepareError(f"{path}:{lineno}: invalid JSON ({e})") from e
                yield _row_text(row, field, f"{path}:{lineno}")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from e


def _row_text(row: object, field: str, where: str) -> str:
    if not isinstance(row, dict) or field not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise PrepareError(f"{where}: text field {field!r} missing (row has: {keys}); set --text-field")
    text = row[field]
    if not isinstance(text, str):
        raise PrepareError(f"{where}: text field {field!r} is {type(text).__name__}, expected a string")
    return text


def _parquet_docs(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise PrepareError(
            f"{path}: text field {field!r} missing (columns: {pf.schema_arrow.names}); set --text-field"
        )
    row = 0
    # column batches keep memory bounded for large files
    for batch in pf.iter_batches(batch_size=1024, columns=[field]):
        for text in batch.column(0).to_pylist():
            yield _row_text({field: text}, field, f"{path} row {row}")
            row += 1


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def hub_corpus(name: str, config: str | None, split: str, streaming: bool, field: str) -> Corpus:
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:  # the hub raises many types; the user needs the name and the reason
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise PrepareError(
            f"hub dataset {name!r} (config {config}, split {split}): {type(e).__name__}: {reason}"
        ) from e

    def docs() -> Iterator[str]:
        for i, row in enumerate(ds):
            yield _row_text(row, field, f"{name} row {i}")

    def count(limit: int | None) -> int:
        if not streaming:
            return len(ds)
        splits = ds.info.splits or {}
        if split in splits and splits[split].num_examples:
            return splits[split].num_examples
        if limit is not None:
            return limit  # a streamed split of unknown length: trust the cap
        raise PrepareError(
            f"hub dataset {name!r}: streaming split {split!r} has unknown length; pass --max-docs"
        )

    return Corpus(docs, count)


def looks_like_path(source: str) -> bool:
    """Whether a source that does not exist is a local name (a mistake to report at once) rather than
    a hub dataset id, which is always owner/name: exactly one '/', neither part a path of its own."""
    return (
        source.startswith(("/", ".", "~"))
        or glob.has_magic(source)
        or Path(source).suffix.lower() in DATAFILE_SUFFIXES
        or source.count("/") != 1
        or Path(source.split("/")[0]).exists()
        or not all(source.split("/"))  # "owner/" or "/name"
    )


def open_corpus(args: argparse.Namespace) -> Corpus:
    source = args.source
    if source == "builtin":
        return builtin_corpus(args.max_docs)
    if source == "tinyshakespeare":
        return tinyshakespeare_corpus()
    expanded = os.path.expanduser(source)
    if os.path.exists(expanded) or (glob.has_magic(source) and glob.glob(expanded, recursive=True)):
        return local_corpus(source, args.doc_per, args.text_field)
    if looks_like_path(source):
        hint = "" if "/" in source else (
            "; hub datasets are named owner/name, e.g. roneneldan/TinyStories")
        raise PrepareError(f"source {source} does not exist (no such file, directory or glob match{hint})")
    return hub_corpus(source, args.hf_config, args.split, args.streaming, args.text_field)


# ----------------------------------------------------------------------------------------------------
# encoding, in worker processes


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_name: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = get_tokenizer(tokenizer_name)


def _encode_chunk(texts: list[str]) -> list[np.ndarray]:
    """Each text's ids, preceded by the end-of-text token, as uint16."""
    tok = _worker_tokenizer
    return [np.array([tok.eot, *tok.encode(text)], dtype=np.uint16) for text in texts]


def _chunks(docs: Iterable[str]) -> Iterator[list[str]]:
    chunk, size = [], 0
    for text in docs:
        chunk.append(text)
        size += len(text)
        if size >= CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def encode_docs(docs: Iterable[str], tokenizer_name: str, workers: int) -> Iterator[np.ndarray]:
    """Encoded documents in corpus order."""
    if workers == 1:
        _init_worker(tokenizer_name)
        for chunk in _chunks(docs):
            yield from _encode_chunk(chunk)
        return
    # apply_async with a bounded queue rather than Pool.imap: imap reads its input as fast as it can,
    # which would pull a whole large corpus into memory ahead of the workers
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(tokenizer_name,)) as pool:
        pending: deque = deque()
        for chunk in _chunks(docs):
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


# ----------------------------------------------------------------------------------------------------
# shard writing


class ShardWriter:
    """Cuts one split's token stream into shards of `shard_tokens` tokens (the last one shorter)."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int) -> None:
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.entries: list[dict] = []
        self.n_tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        self.n_tokens += len(tokens)
        while len(tokens):
            take = min(len(tokens), self.shard_tokens - self.buffered)
            self.buffer.append(tokens[:take])
            self.buffered += take
            tokens = tokens[take:]
            if self.buffered == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if not self.buffered:
            return
        name = f"{self.split}_{len(self.entries):06d}.bin"
        write_shard(self.out_dir / name, np.concatenate(self.buffer))
        self.entries.append({"file": name, "split": self.split, "n_tokens": self.buffered})
        self.buffer, self.buffered = [], 0


def split_counts(n_docs: int, val_fraction: float) -> int:
    """How many of the last documents go to val: at least one, and never all of them."""
    if val_fraction == 0 or n_docs < 2:
        return 0
    return min(max(1, round(n_docs * val_fraction)), n_docs - 1)


def check_out(out: Path) -> None:
    """Before any work: --out must be a folder (or not exist yet) without files prepare would replace
    or remove that it did not write."""
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out} exists and is not a directory")
    foreign = foreign_outputs(out)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise PrepareError(f"--out {out} holds {', '.join(foreign[:3])}{more}, which prepare did not write "
                           "(no manifest.json of its own lists them) and would replace or remove: move "
                           "them away or pick another --out")


def prepare(args: argparse.Namespace) -> dict:
    check_out(Path(args.out))
    tok = get_tokenizer(args.tokenizer)
    corpus = open_corpus(args)
    n_docs = corpus.count(args.max_docs)
    if args.max_docs is not None:
        n_docs = min(n_docs, args.max_docs)
    if n_docs == 0:
        raise PrepareError(f"empty corpus: source {args.source} has no documents")

    out = Path(args.out)
    created = make_dirs(out)
    # the new shards and manifest are built in a hidden folder inside `out` (same file system, so
    # they can be renamed in) and only published once all of them are on disk: a failure on the way,
    # a full disk included, leaves an earlier output in `out` untouched and valid. The price: room
    # for the old and the new output at once.
    staging = out / STAGING
    shutil.rmtree(staging, ignore_errors=True)  # what a killed earlier run left
    done = False
    try:
        staging.mkdir()
        manifest = _write_staged(args, tok, corpus, n_docs, staging)
        _publish(staging, out, manifest, _listed_shards(out) or set())
        done = True
    except DiskFullError as e:
        if e.path.parent != staging:
            raise
        raise DiskFullError(out / e.path.name, e.errno) from None  # the name the user knows
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not done:
            remove_new_dirs(created)  # a failed run leaves no empty --out folder behind
    return manifest


def _write_staged(args: argparse.Namespace, tok: Tokenizer, corpus: Corpus, n_docs: int,
                  staging: Path) -> dict:
    """Encode the corpus into shards in `staging` and write their manifest there, last."""
    n_val = split_counts(n_docs, args.val_fraction)
    split_single = n_docs == 1 and args.val_fraction > 0
    writers = {s: ShardWriter(staging, s, args.shard_tokens) for s in ("train", "val")}
    docs = itertools.islice(corpus.docs(), n_docs)
    max_token, text_tokens = tok.eot, 0
    with Progress(None, f"prepare {args.source}", unit="tokens") as progress:
        for i, ids in enumerate(encode_docs(docs, tok.name, args.workers)):
            if len(ids) > 1:
                max_token = max(max_token, int(ids[1:].max()))
            text_tokens += len(ids) - 1
            before = _tokens_written(writers)
            if split_single:
                _split_single_doc(ids, args.val_fraction, writers, tok.eot)
            else:
                writers["val" if i >= n_docs - n_val else "train"].add(ids)
            progress.update(_tokens_written(writers) - before)
            progress.set_postfix(docs=f"{i + 1}/{n_docs}", shards=_shards_written(writers))
        # checked before the final flush so an empty corpus writes nothing
        if text_tokens == 0:
            raise PrepareError(f"empty corpus: the {n_docs} document(s) of {args.source} hold 0 tokens")
        for w in writers.values():
            w.flush()
        progress.set_postfix(docs=n_docs, shards=_shards_written(writers))

    manifest = {
        "format": "distgpt-shards",
        "version": 1,
        "source": args.source,
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "eot": tok.eot,
        "max_token": max_token,
        "shards": writers["train"].entries + writers["val"].entries,
    }
    write_json_atomic(staging / MANIFEST_NAME, manifest)
    return manifest


def _publish(staging: Path, out: Path, manifest: dict, earlier: set[str]) -> None:
    """Move the staged shards, then the manifest, into `out`, then drop shards the manifest does not
    list. Renames and deletions only: they need no free space, so a full disk cannot stop this half
    way (only a crash within these few renames could leave the old manifest beside new shards, which
    open_shards reports as out of sync when the sizes differ)."""
    for entry in manifest["shards"]:
        os.replace(staging / entry["file"], out / entry["file"])
    os.replace(staging / MANIFEST_NAME, out / MANIFEST_NAME)
    fsync_dir(out)
    _remove_stale_shards(out, manifest, earlier)


def _tokens_written(writers: dict[str, ShardWriter]) -> int:
    return sum(w.n_tokens for w in writers.values())


def _shards_written(writers: dict[str, ShardWriter]) -> int:
    return sum(len(w.entries) for w in writers.values())


def _split_single_doc(ids: np.ndarray, val_fraction: float, writers: dict, eot: int) -> None:
    text = ids[1:]
    if len(text) < 2:
        raise PrepareError(
            f"the single document has {len(text)} token(s), too few to split into train and val"
        )
    n_val = min(max(1, round(len(text) * val_fraction)), len(text) - 1)
    cut = len(text) - n_val
    writers["train"].add(ids[: 1 + cut])
    # the val part gets its own eot so that both splits start like every other document does
    writers["val"].add(np.concatenate([np.array([eot], dtype=np.uint16), text[cut:]]))


def _listed_shards(out: Path) -> set[str] | None:
    """The shard files the manifest in `out` lists (an earlier prepare's output), or None when there
    is a manifest.json that prepare did not write."""
    path = out / MANIFEST_NAME
    if not path.exists():
        return set()
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != "distgpt-shards":
        return None
    entries = manifest.get("shards")
    if not isinstance(entries, list):
        return None
    # only names of shards in this folder: a manifest (edited, or not ours after all) that lists
    # "../x" or "notes.txt" must not make prepare delete them as stale shards
    return {e["file"] for e in entries if isinstance(e, dict) and isinstance(e.get("file"), str)
            and SHARD_NAME.match(e["file"])}


def foreign_outputs(out: Path) -> list[str]:
    """Files in `out` that prepare would replace or remove but did not write: manifest.json when it
    is not prepare's, and train_NNNNNN.bin / val_NNNNNN.bin shards its manifest does not list (llm.c's
    and other tools' shards share the format and the names). Other files (the raw corpus, notes)
    are never touched, so they do not count."""
    if not out.is_dir():
        return []
    listed = _listed_shards(out)
    ours = listed or set()
    found = sorted(p.name for p in out.iterdir() if SHARD_NAME.match(p.name) and p.name not in ours)
    return ([MANIFEST_NAME] if listed is None else []) + found


def _remove_stale_shards(out: Path, manifest: dict, earlier: set[str]) -> None:
    # shards of an earlier, longer run would otherwise be picked up by a train_*.bin glob; only those
    # the earlier manifest listed go: nothing prepare did not write is removed
    keep = {entry["file"] for entry in manifest["shards"]}
    for name in sorted(earlier - keep):
        (out / name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------
# command line


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        "prepare",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--source", required=True, help="builtin, tinyshakespeare, a local path/glob, or a hub name"
    )
    p.add_argument("--tokenizer", required=True, help="gpt2 or bytes")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="fraction of documents for val (default 0.1)"
    )
    p.add_argument(
        "--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default 100_000_000)"
    )
    p.add_argument(
        "--workers", type=int, default=default_workers(), help="encoding processes (default: all cores)"
    )
    p.add_argument(
        "--text-field", default="text", help="text column of jsonl/parquet/hub rows (default text)"
    )
    p.add_argument(
        "--doc-per",
        choices=["file", "line", "row", "blank"],
        help="how local files split into documents (default: file for .txt, row for .jsonl/.parquet)",
    )
    p.add_argument("--split", default="train", help="hub dataset split to read (default train)")
    p.add_argument("--hf-config", default=None, help="hub dataset config name")
    p.add_argument(
        "--streaming", action="store_true", help="stream the hub dataset instead of downloading it"
    )
    p.add_argument("--max-docs", type=int, default=None, help="stop after this many documents")
    return p


def check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.val_fraction < 1:
        raise PrepareError(f"--val-fraction {args.val_fraction} must be in [0, 1)")
    if args.shard_tokens < 1:
        raise PrepareError(f"--shard-tokens {args.shard_tokens} must be >= 1")
    if args.workers < 1:
        raise PrepareError(f"--workers {args.workers} must be >= 1")
    if args.max_docs is not None and args.max_docs < 1:
        raise PrepareError(f"--max-docs {args.max_docs} must be >= 1")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_switches("prepare")
    try:
        check_args(args)
        manifest = prepare(args)
    except (PrepareError, DataError, OSError) as e:  # OSError: DiskFullError, an unwritable --out
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    splits = {s: [e["n_tokens"] for e in manifest["shards"] if e["split"] == s] for s in ("train", "val")}
    summary = ", ".join(f"{s} {sum(n):,} tokens in {len(n)} shard(s)" for s, n in splits.items())
    print(f"prepare: wrote {Path(args.out) / MANIFEST_NAME}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
