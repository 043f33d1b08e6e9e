"""Shard format, tokenizers and the world-size-invariant loader (distgpt/data.py)."""

import json
from pathlib import Path

import numpy as np
import pytest

from distgpt.config import ConfigError, check_batch_layout, load_config
from distgpt.data import (
    HEADER_INTS,
    SHARD_MAGIC,
    DataError,
    TrainLoader,
    ValSet,
    get_tokenizer,
    open_shards,
    read_shard,
    write_shard,
)

TIKTOKEN_CACHE = Path(__file__).resolve().parents[2] / "shared" / "tiktoken_cache"
VOCAB = 1000
SEQ_LEN = 16
SHARD_SIZES = (500, 333, 700)  # uneven, so windows straddle shard boundaries at different offsets


@pytest.fixture
def shard_dir(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """Three small shards of random tokens; returns the directory and their concatenation."""
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, VOCAB, size=n, dtype=np.uint16) for n in SHARD_SIZES]
    for i, part in enumerate(parts):
        write_shard(tmp_path / f"train_{i:06d}.bin", part)
    return tmp_path, np.concatenate(parts).astype(np.int64)


def reference_batch(
    stream: np.ndarray, step: int, batch_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The global batch straight from the definition, independent of the loader's code paths."""
    n_windows = (len(stream) - 1) // SEQ_LEN
    xs, ys = [], []
    for j in range(batch_size):
        epoch, index = divmod(step * batch_size + j, n_windows)
        w = np.random.default_rng([seed, epoch]).permutation(n_windows)[index]
        window = stream[w * SEQ_LEN : w * SEQ_LEN + SEQ_LEN + 1]
        xs.append(window[:-1])
        ys.append(window[1:])
    return np.stack(xs), np.stack(ys)


def union_of_ranks(shards, step: int, batch_size: int, micro: int, world: int, seed: int):
    xs, ys, rows = [], [], []
    for rank in range(world):
        loader = TrainLoader(shards, SEQ_LEN, batch_size, micro, rank, world, seed)
        for x, y, first in loader.micro_batches(step):
            assert x.dtype == np.int64 and y.dtype == np.int64 and x.shape == (micro, SEQ_LEN)
            xs.append(x)
            ys.append(y)
            rows.append(first)
    return np.concatenate(xs), np.concatenate(ys), rows


# ----------------------------------------------------------------------------------------------------
# shard files


def test_shard_round_trip_is_bit_exact(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 7, 42], dtype=np.uint16)
    path = tmp_path / "s.bin"
    write_shard(path, tokens)
    assert path.stat().st_size == HEADER_INTS * 4 + 2 * len(tokens)
    header = np.fromfile(path, dtype="<i4", count=3)
    assert header.tolist() == [SHARD_MAGIC, 1, len(tokens)]
    for mmap in (True, False):
        back = read_shard(path, mmap=mmap)
        assert back.dtype == np.uint16 and np.array_equal(back, tokens)
    assert isinstance(read_shard(path), np.memmap)
    assert [p.name for p in tmp_path.iterdir()] == ["s.bin"]  # no temp file left behind


def test_write_shard_accepts_int_arrays_and_rejects_out_of_range(tmp_path):
    write_shard(tmp_path / "ok.bin", np.array([1, 2, 3], dtype=np.int64))
    assert read_shard(tmp_path / "ok.bin").tolist() == [1, 2, 3]
    with pytest.raises(DataError, match="uint16"):
        write_shard(tmp_path / "bad.bin", np.array([1, 65536]))
    with pytest.raises(DataError, match="uint16"):
        write_shard(tmp_path / "neg.bin", np.array([-1, 2]))
    assert not (tmp_path / "bad.bin").exists()


def test_empty_shard_round_trip(tmp_path):
    write_shard(tmp_path / "e.bin", np.zeros(0, dtype=np.uint16))
    assert len(read_shard(tmp_path / "e.bin")) == 0


@pytest.mark.parametrize(
    "index, value, message",
    [(0, 12345, "bad magic 12345, expected 20240520"), (1, 7, "unsupported shard version 7, expected 1")],
)
def test_header_rejects_wrong_magic_and_version(tmp_path, index, value, message):
    path = tmp_path / "bad.bin"
    write_shard(path, np.arange(10, dtype=np.uint16))
    data = bytearray(path.read_bytes())
    data[4 * index : 4 * index + 4] = np.array([value], dtype="<i4").tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=message) as e:
        read_shard(path)
    assert str(path) in str(e.value)


def test_header_rejects_truncated_file(tmp_path):
    path = tmp_path / "cut.bin"
    write_shard(path, np.arange(100, dtype=np.uint16))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError) as e:
        read_shard(path)
    msg = str(e.value)
    assert str(path) in msg and "100 tokens" in msg and "1224 bytes" in msg and "1214 bytes" in msg
    path.write_bytes(b"\0" * 100)
    with pytest.raises(DataError, match="too small"):
        read_shard(path)


# ----------------------------------------------------------------------------------------------------
# tokenizers

TEXT = "Hello world! Ünïcødé: 日本語, emoji 🎉 and\ttabs\nnew lines <|endoftext|> as plain text."


def test_bytes_tokenizer_round_trip():
    tok = get_tokenizer("bytes")
    assert (tok.name, tok.vocab_size, tok.eot) == ("bytes", 257, 256)
    ids = tok.encode(TEXT)
    assert max(ids) < 256 and ids == list(TEXT.encode())
    assert tok.decode(ids) == TEXT
    assert tok.decode([tok.eot, *ids, tok.eot]) == TEXT  # eot is skipped
    assert tok.decode([0xFF]) == "\ufffd"  # invalid UTF-8 is replaced, not raised


def test_gpt2_tokenizer_round_trip(monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
    tok = get_tokenizer("gpt2")
    assert (tok.name, tok.vocab_size, tok.eot) == ("gpt2", 50257, 50256)
    assert tok.encode("Hello world") == [15496, 995]
    ids = tok.encode(TEXT)
    assert tok.eot not in ids  # special-token text is encoded as ordinary text
    assert tok.decode(ids) == TEXT
    assert tok.decode(np.array(ids, dtype=np.uint16)) == TEXT


def test_unknown_tokenizer_lists_valid_names():
    with pytest.raises(DataError, match="'gpt3'.*gpt2, bytes"):
        get_tokenizer("gpt3")


# ----------------------------------------------------------------------------------------------------
# open_shards


def test_open_shards_without_manifest(shard_dir):
    directory, stream = shard_dir
    shards = open_shards(str(directory / "train_*.bin"), VOCAB)
    assert [p.name for p in shards.paths] == [f"train_{i:06d}.bin" for i in range(3)]
    assert shards.n_tokens == list(SHARD_SIZES)
    assert shards.max_token == int(stream.max())
    assert shards.tokenizer is None and shards.vocab_size is None


def test_open_shards_no_match(tmp_path):
    with pytest.raises(DataError, match=r"data.val: no files match .*nothing_\*\.bin"):
        open_shards(str(tmp_path / "nothing_*.bin"), VOCAB, what="data.val")


def test_open_shards_rejects_token_ids_beyond_vocab(tmp_path):
    write_shard(tmp_path / "a.bin", np.array([1, 2, 999], dtype=np.uint16))
    write_shard(tmp_path / "b.bin", np.array([1, 1000, 3], dtype=np.uint16))
    with pytest.raises(
        DataError, match=r"data.train: .*b\.bin holds token id 1000 >= the model's vocab_size 1000"
    ):
        open_shards(str(tmp_path / "*.bin"), VOCAB)
    assert open_shards(str(tmp_path / "*.bin"), 1001).max_token == 1000


def write_manifest(directory: Path, **fields) -> None:
    manifest = {"format": "distgpt-shards", "version": 1, "tokenizer": "bytes", "vocab_size": 257}
    manifest.update(fields)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_open_shards_manifest_checks(tmp_path):
    write_shard(tmp_path / "train_000000.bin", np.array([256, 104, 105], dtype=np.uint16))
    shards_entry = [{"file": "train_000000.bin", "split": "train", "n_tokens": 3}]
    write_manifest(tmp_path, max_token=256, shards=shards_entry)
    pattern = str(tmp_path / "train_*.bin")

    shards = open_shards(pattern, 257, tokenizer="bytes")
    assert (shards.tokenizer, shards.vocab_size, shards.max_token) == ("bytes", 257, 256)
    with pytest.raises(DataError, match="tokenizer 'bytes'.*tokenizer 'gpt2'"):
        open_shards(pattern, 50257, tokenizer="gpt2")
    with pytest.raises(DataError, match="vocab_size 257.*model's vocab_size 256"):
        open_shards(pattern, 256, tokenizer="bytes")
    # a manifest that disagrees with the shard it lists is stale, not trusted
    write_manifest(tmp_path, max_token=256, shards=[{**shards_entry[0], "n_tokens": 4}])
    with pytest.raises(DataError, match="out of sync"):
        open_shards(pattern, 257)


def test_empty_shard_set_is_an_error(tmp_path):
    write_shard(tmp_path / "e.bin", np.zeros(0, dtype=np.uint16))
    with pytest.raises(DataError, match="0 tokens"):
        open_shards(str(tmp_path / "*.bin"), VOCAB)


# ----------------------------------------------------------------------------------------------------
# TrainLoader

BATCH = 12
# (world, micro_batch_size): accumulation 1 and > 1 for 1, 2 and 3 ranks
LAYOUTS = [(1, 12), (1, 3), (2, 6), (2, 2), (3, 4), (3, 2), (3, 1)]


@pytest.mark.parametrize("world, micro", LAYOUTS)
def test_ranks_together_read_the_global_batch(shard_dir, world, micro):
    directory, stream = shard_dir
    shards = open_shards(str(directory / "*.bin"), VOCAB)
    n_windows = (len(stream) - 1) // SEQ_LEN  # 95: epoch boundaries fall inside steps 7, 15, ...
    steps = [0, 1, 7, 8, 15, 16, 40]
    assert any((s * BATCH) // n_windows != ((s + 1) * BATCH - 1) // n_windows for s in steps)
    for step in steps:
        x, y, rows = union_of_ranks(shards, step, BATCH, micro, world, seed=1234)
        rx, ry = reference_batch(stream, step, BATCH, seed=1234)
        assert np.array_equal(x, rx) and np.array_equal(y, ry)
        assert rows == list(range(0, BATCH, micro))
        assert np.array_equal(x[:, 1:], y[:, :-1])  # y is x shifted by one token


def test_windows_cross_shard_boundaries(shard_dir):
    directory, stream = shard_dir
    shards = open_shards(str(directory / "*.bin"), VOCAB)
    loader = TrainLoader(shards, SEQ_LEN, BATCH, BATCH, 0, 1, seed=0)
    # window 31 covers tokens [496, 513): the first shard ends at 500
    boundary_window = stream[31 * SEQ_LEN : 31 * SEQ_LEN + SEQ_LEN]
    n_windows = loader.n_windows
    seen = np.concatenate([loader.micro_batches(step)[0][0] for step in range(-(-n_windows // BATCH))])
    assert any(np.array_equal(row, boundary_window) for row in seen)


def test_each_epoch_is_a_permutation(shard_dir):
    directory, stream = shard_dir
    shards = open_shards(str(directory / "*.bin"), VOCAB)
    loader = TrainLoader(shards, SEQ_LEN, BATCH, 4, 0, 1, seed=7)
    n = loader.n_windows
    rows = []
    step = 0
    while len(rows) < 3 * n:
        for x, _, _ in loader.micro_batches(step):
            rows.extend(tuple(r) for r in x)
        step += 1
    every_window = sorted(tuple(stream[w * SEQ_LEN : (w + 1) * SEQ_LEN]) for w in range(n))
    epochs = [rows[e * n : (e + 1) * n] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == every_window
    assert epochs[0] != epochs[1]  # reshuffled every epoch


def test_different_seeds_give_different_orders(shard_dir):
    directory, _ = shard_dir
    shards = open_shards(str(directory / "*.bin"), VOCAB)
    a = TrainLoader(shards, SEQ_LEN, BATCH, BATCH, 0, 1, seed=1).micro_batches(0)[0][0]
    b = TrainLoader(shards, SEQ_LEN, BATCH, BATCH, 0, 1, seed=2).micro_batches(0)[0][0]
    assert not np.array_equal(a, b)


def test_loader_identity_survives_json_and_a_new_loader_serves_the_same_rows(shard_dir):
    """The loader keeps no position: step s's rows are a function of (seed, step, rank layout), so a
    resumed run that passes the checkpoint's step gets exactly the rows the first run would have."""
    directory, _ = shard_dir
    shards = open_shards(str(directory / "*.bin"), VOCAB)
    first = TrainLoader(shards, SEQ_LEN, BATCH, 2, 1, 3, seed=5)
    state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    assert state == {"seed": 5, "seq_len": SEQ_LEN, "batch_size": BATCH, "n_windows": 95,
                     "total_tokens": sum(SHARD_SIZES)}
    resumed = TrainLoader(shards, SEQ_LEN, BATCH, 2, 1, 3, seed=5)
    resumed.check_resumable(state)
    for step in range(9, 19):
        for (x1, y1, r1), (x2, y2, r2) in zip(first.micro_batches(step), resumed.micro_batches(step),
                                              strict=True):
            assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and r1 == r2


def test_resuming_another_data_order_is_an_error(shard_dir):
    directory, _ = shard_dir
    shards = open_shards(str(directory / "*.bin"), VOCAB)
    state = TrainLoader(shards, SEQ_LEN, BATCH, BATCH, 0, 1, seed=5).state_dict()
    with pytest.raises(DataError, match="train.batch_size=12, this run has 24"):
        TrainLoader(shards, SEQ_LEN, 24, 24, 0, 1, seed=5).check_resumable(state)
    with pytest.raises(DataError, match="train.seq_len"):
        TrainLoader(shards, 8, BATCH, BATCH, 0, 1, seed=5).check_resumable(state)
    with pytest.raises(DataError, match="train.seed=5, this run has 6"):
        TrainLoader(shards, SEQ_LEN, BATCH, BATCH, 0, 1, seed=6).check_resumable(state)
    with pytest.raises(DataError, match="n_windows"):
        TrainLoader(shards, SEQ_LEN, BATCH, BATCH, 0, 1, seed=5).check_resumable({**state, "n_windows": 3})


def test_batch_size_must_divide_by_micro_times_world():
    # the loader relies on this rule; config.check_batch_layout is where it is checked (train calls it
    # before building the loader), so that is what is tested here
    cfg = load_config(None, ["train.batch_size=12", "train.micro_batch_size=2"])
    assert check_batch_layout(cfg, 3) == 2
    with pytest.raises(ConfigError, match="batch_size = 12: expected a multiple of .* = 2 x 4 = 8"):
        check_batch_layout(cfg, 4)


def test_corpus_too_small(tmp_path):
    write_shard(tmp_path / "tiny.bin", np.arange(100, dtype=np.uint16))
    shards = open_shards(str(tmp_path / "tiny*.bin"), VOCAB)
    with pytest.raises(DataError) as e:
        TrainLoader(shards, SEQ_LEN, 8, 8, 0, 1, seed=0)
    msg = str(e.value)
    assert "corpus too small: 100 tokens gives 6 windows of seq_len 16, fewer than one batch of 8" in msg
    assert "tiny*.bin" in msg


# ----------------------------------------------------------------------------------------------------
# ValSet


@pytest.mark.parametrize("max_windows", [10, 1000])
def test_val_shares_cover_the_fixed_windows_once(shard_dir, max_windows):
    directory, stream = shard_dir
    shards = open_shards(str(directory / "*.bin"), VOCAB, what="data.val")
    val = ValSet(shards, SEQ_LEN, max_windows)
    assert val.n_windows == min(max_windows, 95)
    expected_x = np.stack([stream[w * SEQ_LEN : (w + 1) * SEQ_LEN] for w in range(val.n_windows)])
    expected_y = np.stack([stream[w * SEQ_LEN + 1 : (w + 1) * SEQ_LEN + 1] for w in range(val.n_windows)])
    for world in (1, 2, 3):
        for micro in (1, 4, 64):
            xs, ys, sizes = [], [], []
            for rank in range(world):
                parts = list(val.rank_windows(rank, world, micro))
                assert all(x.shape[0] <= micro and x.dtype == np.int64 for x, _ in parts)
                sizes.append(sum(len(x) for x, _ in parts))
                xs += [x for x, _ in parts]
                ys += [y for _, y in parts]
            assert max(sizes) - min(sizes) <= 1
            assert np.array_equal(np.concatenate(xs), expected_x)
            assert np.array_equal(np.concatenate(ys), expected_y)
