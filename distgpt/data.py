"""Token shards, tokenizers and the world-size-invariant data loader.

Shard format (same as llm.c's .bin files): a header of 256 little-endian int32 (magic, version,
n_tokens, zeros), then n_tokens little-endian uint16 token ids.

The loader's central promise: the global batch served at step s depends only on (data, seed, seq_len,
batch_size, s). World size and gradient accumulation only decide which rank reads which rows of it, so
runs on 1, 2 or 3 ranks see exactly the same samples.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distgpt.fileio import atomic_write
from distgpt.partition import even_ranges

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MANIFEST_NAME = "manifest.json"


class DataError(ValueError):
    """Bad data or a data setting that cannot work; the message names the file/key and the expectation."""


# ----------------------------------------------------------------------------------------------------
# shard files


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write `tokens` as an llm.c-compatible .bin shard, atomically."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise DataError(f"{path}: tokens must be a 1-D array, got shape {tokens.shape}")
    if tokens.dtype != np.uint16:
        if not np.issubdtype(tokens.dtype, np.integer):
            raise DataError(f"{path}: tokens must be integers, got dtype {tokens.dtype}")
        if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
            raise DataError(
                f"{path}: token ids must fit uint16 (0..65535), got range {tokens.min()}..{tokens.max()}"
            )
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    with atomic_write(path) as f:
        f.write(header.tobytes())
        f.write(np.ascontiguousarray(tokens, dtype="<u2").data)  # a view: no second copy of a big shard


def read_shard(path: str | Path, mmap: bool = True) -> np.ndarray:
    """Return the uint16 tokens of a shard (an np.memmap when `mmap`), after validating the header."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(f"{path}: file is {size} bytes, too small for the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic {header[0]}, expected {SHARD_MAGIC} (not a token shard?)")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]}, expected {SHARD_VERSION}")
    n_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * n_tokens
    if n_tokens < 0 or size != expected:
        raise DataError(
            f"{path}: header says {n_tokens} tokens, so the file should be {expected} bytes, "
            f"but it is {size} bytes (truncated or corrupt)"
        )
    if n_tokens == 0:
        return np.zeros(0, dtype=np.uint16)  # np.memmap cannot map a zero-length region
    if mmap:
        return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n_tokens,))
    return np.fromfile(path, dtype="<u2", count=n_tokens, offset=HEADER_BYTES)


# ----------------------------------------------------------------------------------------------------
# tokenizers


class Tokenizer:
    """Text <-> token ids. `eot` separates documents; encode() never emits it."""

    name: str
    vocab_size: int
    eot: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError


class GPT2Tokenizer(Tokenizer):
    def __init__(self) -> None:
        import tiktoken  # imported lazily: the bytes tokenizer and the loader do not need it

        try:
            self._enc = tiktoken.get_encoding("gpt2")
        except Exception as e:
            # tiktoken downloads its BPE files on first use; offline that fails deep inside requests
            raise DataError(
                "gpt2 tokenizer: could not load tiktoken's GPT-2 BPE files (offline? point "
                f"TIKTOKEN_CACHE_DIR at a folder holding them): {type(e).__name__}"
            ) from e
        self.name = "gpt2"
        self.vocab_size = self._enc.n_vocab
        self.eot = self._enc.eot_token

    def encode(self, text: str) -> list[int]:
        # ordinary: text that happens to contain "<|endoftext|>" is data, not a document separator
        return self._enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 plus one end-of-text id; needs no vocabulary files."""

    def __init__(self) -> None:
        self.name = "bytes"
        self.vocab_size = 257
        self.eot = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids if int(i) != self.eot]
        bad = [i for i in ids if not 0 <= i < 256]
        if bad:
            raise DataError(f"bytes tokenizer: id {bad[0]} is out of range 0..256")
        return bytes(ids).decode("utf-8", errors="replace")


TOKENIZERS = {"gpt2": GPT2Tokenizer, "bytes": ByteTokenizer}


def get_tokenizer(name: str) -> Tokenizer:
    if name not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {name!r}, expected one of: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]()


# ----------------------------------------------------------------------------------------------------
# shard sets


@dataclass
class ShardSet:
    paths: list[Path]
    n_tokens: list[int]
    tokenizer: str | None  # from the manifest, None for shards without one
    vocab_size: int | None  # from the manifest
    max_token: int
    pattern: str = ""  # kept so later errors (e.g. "corpus too small") can name what was opened
    what: str = "data"

    @property
    def total_tokens(self) -> int:
        return sum(self.n_tokens)


def _read_manifest(directory: Path, what: str) -> dict | None:
    path = directory / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{what}: cannot read manifest {path}: {e}") from e
    if not isinstance(manifest, dict):
        raise DataError(f"{what}: manifest {path} should hold a JSON object")
    return manifest


def _check_manifest(manifest: dict, path: Path, vocab_size: int, tokenizer: str | None, what: str) -> None:
    m_tok = manifest.get("tokenizer")
    if tokenizer is not None and m_tok is not None and m_tok != tokenizer:
        raise DataError(
            f"{what}: shards in {path.parent} were made with tokenizer {m_tok!r} ({path.name}), "
            f"but the run uses tokenizer {tokenizer!r}"
        )
    m_vocab = manifest.get("vocab_size")
    if m_vocab is not None and m_vocab > vocab_size:
        raise DataError(
            f"{what}: shards in {path.parent} have vocab_size {m_vocab} ({path.name}), "
            f"larger than the model's vocab_size {vocab_size}"
        )


def open_shards(
    pattern: str, vocab_size: int, tokenizer: str | None = None, what: str = "data.train"
) -> ShardSet:
    """Open the shards matching a glob pattern (sorted) and check they fit the model's vocabulary."""
    paths = [Path(p) for p in sorted(glob.glob(os.path.expanduser(pattern))) if os.path.isfile(p)]
    if not paths:
        raise DataError(f"{what}: no files match {pattern!r}")

    manifests: dict[Path, dict | None] = {}
    n_tokens, max_token = [], -1
    m_tok, m_vocab = None, None
    for path in paths:
        directory = path.parent
        if directory not in manifests:
            manifests[directory] = _read_manifest(directory, what)
            if manifests[directory] is not None:
                _check_manifest(manifests[directory], directory / MANIFEST_NAME, vocab_size, tokenizer, what)
                m_tok = manifests[directory].get("tokenizer", m_tok)
                m_vocab = manifests[directory].get("vocab_size", m_vocab)
        tokens = read_shard(path)
        n_tokens.append(len(tokens))
        shard_max = _shard_max_from_manifest(manifests[directory], path, len(tokens), what)
        if shard_max is None and len(tokens):
            shard_max = int(np.max(tokens))  # streams through the memmap, no copy
        if shard_max is not None and shard_max >= vocab_size:
            raise DataError(
                f"{what}: {path} holds token id {shard_max} >= the model's vocab_size {vocab_size}"
            )
        max_token = max(max_token, -1 if shard_max is None else shard_max)

    if sum(n_tokens) == 0:
        raise DataError(f"{what}: the {len(paths)} file(s) matching {pattern!r} hold 0 tokens")
    return ShardSet(paths, n_tokens, m_tok, m_vocab, max_token, pattern, what)


def _shard_max_from_manifest(manifest: dict | None, path: Path, n_tokens: int, what: str) -> int | None:
    """The manifest's max token, when the manifest really describes this file; else None (scan it)."""
    if manifest is None:
        return None
    for entry in manifest.get("shards", []):
        if entry.get("file") == path.name:
            if entry.get("n_tokens") != n_tokens:
                # a stale manifest beside rewritten shards would otherwise vouch for data it never saw
                raise DataError(
                    f"{what}: {path} holds {n_tokens} tokens but {MANIFEST_NAME} lists "
                    f"{entry.get('n_tokens')} (manifest and shards out of sync)"
                )
            return None if manifest.get("max_token") is None else int(manifest["max_token"])
    return None


class _TokenStream:
    """All shards of a set as one virtual token sequence, read piecewise from the memmaps."""

    def __init__(self, shards: ShardSet) -> None:
        self.arrays = [read_shard(p) for p in shards.paths]
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])
        self.total = int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        assert 0 <= start and start + length <= self.total
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        filled = 0
        while filled < length:
            offset = start + filled - int(self.starts[i])
            take = min(len(self.arrays[i]) - offset, length - filled)
            out[filled : filled + take] = self.arrays[i][offset : offset + take]
            filled += take
            i += 1
        return out


# ----------------------------------------------------------------------------------------------------
# training loader


class TrainLoader:
    """Serves this rank's micro-batches of the global batch for a step.

    Window i of the stream is tokens [i*T, i*T + T + 1). Global row j of step s is sample
    g = s*B + j, which is window perm_e[g % n_windows] of epoch e = g // n_windows, where perm_e is a
    permutation drawn from (seed, e). Rank r owns the contiguous rows [r*B/world, (r+1)*B/world).

    batch_size must be a multiple of micro_batch_size * world (config.check_batch_layout, which the
    train command calls first, is the one place that rule is checked and reported); otherwise the
    rows past the last whole micro-batch of each rank would silently never be served.
    """

    def __init__(
        self,
        shards: ShardSet,
        seq_len: int,
        batch_size: int,
        micro_batch_size: int,
        rank: int,
        world: int,
        seed: int,
    ) -> None:
        if min(seq_len, batch_size, micro_batch_size, world) < 1:
            raise DataError(
                f"seq_len, batch_size, micro_batch_size and world must be >= 1, got "
                f"{seq_len}, {batch_size}, {micro_batch_size}, {world}"
            )
        if seed < 0:
            raise DataError(f"seed {seed} must be >= 0 (it seeds numpy's default_rng)")
        if not 0 <= rank < world:
            raise DataError(f"rank {rank} is outside 0..{world - 1}")
        self.stream = _TokenStream(shards)
        self.seq_len, self.batch_size, self.micro_batch_size = seq_len, batch_size, micro_batch_size
        self.rank, self.world, self.seed = rank, world, seed
        self.accum = batch_size // (micro_batch_size * world)
        self.total_tokens = self.stream.total
        self.n_windows = (self.total_tokens - 1) // seq_len
        if self.n_windows < batch_size:
            raise DataError(
                f"{shards.what} {shards.pattern!r}: corpus too small: {self.stream.total} tokens gives "
                f"{self.n_windows} windows of seq_len {seq_len}, fewer than one batch of {batch_size}"
            )
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            # keep two: a batch that straddles an epoch boundary needs both, without recomputing
            if len(self._perms) >= 2:
                del self._perms[min(self._perms)]
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        return self._perms[epoch]

    def _window(self, sample: int) -> int:
        epoch, index = divmod(sample, self.n_windows)
        return int(self._permutation(epoch)[index])

    def _rows(self, step: int, first_row: int, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        T = self.seq_len
        x = np.empty((n_rows, T), dtype=np.int64)
        y = np.empty((n_rows, T), dtype=np.int64)
        for k in range(n_rows):
            window = self._window(step * self.batch_size + first_row + k)
            tokens = self.stream.read(window * T, T + 1)
            x[k], y[k] = tokens[:-1], tokens[1:]
        return x, y

    def micro_batches(self, step: int) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """This rank's rows of global batch `step` as `accum` (x, y, first_global_row) micro-batches."""
        per_rank = self.batch_size // self.world
        out = []
        for i in range(self.accum):
            first = self.rank * per_rank + i * self.micro_batch_size
            x, y = self._rows(step, first, self.micro_batch_size)
            out.append((x, y, first))
        return out

    def state_dict(self) -> dict:
        """What a resumed run must match for step s to mean the same samples (the position itself is
        the run's step: trainer.TrainingState)."""
        return {
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "n_windows": self.n_windows,
            "total_tokens": self.total_tokens,
        }

    def check_resumable(self, state: dict) -> None:
        """A DataError unless a checkpoint's loader state (state_dict) describes this data order: the
        same seed, sequence length, batch size and corpus size."""
        names = {"seed": "train.seed", "seq_len": "train.seq_len", "batch_size": "train.batch_size"}
        for key in ("seed", "seq_len", "batch_size", "n_windows", "total_tokens"):
            if key not in state:
                raise DataError(f"loader state is missing key {key!r}")
            current = getattr(self, key)
            if state[key] != current:
                why = ("a resumed run keeps its seed (drop the override, or start a new run)" if key == "seed"
                       else "the saved step would not mean the same samples")
                raise DataError(
                    f"the checkpoint's data order has {names.get(key, key)}={state[key]}, this run has "
                    f"{current}: {why}"
                )


# ----------------------------------------------------------------------------------------------------
# validation set


class ValSet:
    """A fixed validation set: the first min(max_windows, n_windows) windows, in stream order."""

    def __init__(self, shards: ShardSet, seq_len: int, max_windows: int) -> None:
        self.stream = _TokenStream(shards)
        self.seq_len = seq_len
        self.n_windows = min(max_windows, (self.stream.total - 1) // seq_len)
        if self.n_windows < 1:
            raise DataError(
                f"{shards.what} {shards.pattern!r}: {self.stream.total} tokens give no window of "
                f"seq_len {seq_len} (need at least {seq_len + 1} tokens)"
            )

    def rank_windows(
        self, rank: int, world: int, micro_batch_size: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """This rank's windows as (x, y) micro-batches of at most micro_batch_size rows. The windows
        are split over the ranks like the parameters (partition.even_ranges): contiguous parts whose
        sizes differ by at most one, so every window is evaluated exactly once."""
        T = self.seq_len
        lo, hi = even_ranges(self.n_windows, world)[rank]
        for start in range(lo, hi, micro_batch_size):
            k = min(micro_batch_size, hi - start)
            # consecutive windows overlap by one token, so one contiguous read serves the whole micro batch
            tokens = self.stream.read(start * T, k * T + 1)
            yield tokens[:-1].reshape(k, T), tokens[1:].reshape(k, T)
