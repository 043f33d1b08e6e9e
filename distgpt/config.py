"""Configuration: YAML files plus `key.sub=value` overrides -> frozen, validated dataclasses.

Every mistake stops the run before any work with one line that names the key, the bad value and
what was expected; a misspelt key gets the closest valid spelling suggested.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REDUCE_METHODS = ("auto", "shared_memory", "mpi")


class ConfigError(ValueError):
    """A bad config file, key or value. The message is one line, ready to print."""


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256
    vocab_size: int = 50257
    dropout: float = 0.0
    attention: str = "dense"  # dense | alternating_banded (GPT-3: odd layers see a local band)
    window: int = 128  # band width for alternating_banded
    vocab_multiple: int = 64  # wte rows are padded to a multiple of this; padded rows stay 0

    @property
    def padded_vocab(self) -> int:
        m = self.vocab_multiple
        return ((self.vocab_size + m - 1) // m) * m

    def layer_window(self, layer: int) -> int | None:
        if self.attention == "alternating_banded" and layer % 2 == 1:
            return self.window
        return None


@dataclass(frozen=True)
class DataConfig:
    train: str | None = None  # glob of token shards (required to train)
    val: str | None = None  # glob of token shards; None skips evaluation
    tokenizer: str | None = None  # expected tokenizer of the shards (gpt2 | bytes); None: take the manifest's


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 32  # global sequences per optimizer step
    micro_batch_size: int = 8  # sequences per rank per forward/backward
    seq_len: int = 256
    max_steps: int = 1000
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 1337
    eval_every: int = 100  # 0: only at the end
    eval_steps: int = 10  # the val set is eval_steps x batch_size windows, fixed
    log_every: int = 10
    sample_every: int = 0  # 0: never print samples while training
    sample_tokens: int = 64


@dataclass(frozen=True)
class ParallelConfig:
    zero: bool = True  # ZeRO-1: shard AdamW state and update across ranks
    threads_per_rank: int | str = "auto"
    reduce: str = "auto"  # gradient sum: shared_memory (ranks on one node), mpi, or auto
    overlap: bool = True  # mpi reduce: reduce gradient buckets during backward
    bucket_mb: float = 8.0  # mpi reduce: gradient bucket size for overlapped reduction
    check_every: int = 100  # steps between cross-rank parameter checks (0: start only)


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0  # steps between checkpoints (0: only at the end and on signals)
    keep: int = 3  # newest checkpoints kept on disk


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    init_from: str = "scratch"  # scratch | a Hugging Face folder or hub id | an llm.c .bin
    out_dir: str = "out"
    resume: str | None = None  # None | auto | path of a checkpoint folder

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- parsing


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return {
        int: "an integer",
        float: "a number",
        bool: "true/false",
        str: "a string",
        type(None): "null",
    }.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotated type; ints are accepted where floats are expected."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key} = {value!r}: expected {_describe(tp)}")
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key} = {value!r}: expected {_describe(tp)}")


def _unknown(key: str, valid: list[str]) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    prefix = key[: len(key) - len(leaf)]
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.6)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _build(cls, values: dict[str, Any], prefix: str = "") -> Any:
    fields = _fields(cls)
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise _unknown(key, list(fields))
        tp = fields[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} = {value!r}: expected a section of keys")
            kwargs[name] = _build(tp, value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, tp)
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=3e-4' -> ('train.lr', 0.0003). Values are read as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # YAML reads '3e-4' as a string (it wants '3.0e-4'); accept the usual float spellings too
    if isinstance(value, str):
        try:
            value = (
                float(value)
                if any(c in value.lower() for c in ".e") or value.lower() in ("inf", "nan")
                else value
            )
        except ValueError:
            pass
    return key, value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(
                f"config file {path}{where}: not valid YAML ({getattr(e, 'problem', e)})"
            ) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping of keys at the top level")
        tree = _floatify(loaded or {})
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


def _floatify(node: Any) -> Any:
    """YAML 1.1 reads 6e-4 as a string; numbers written that way are meant as floats."""
    if isinstance(node, dict):
        return {k: _floatify(v) for k, v in node.items()}
    if isinstance(node, str):
        try:
            if "e" in node.lower() and not node.lower().startswith("e"):
                return float(node)
        except ValueError:
            pass
    return node


# ----------------------------------------------------------------------------- validation


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}: expected {expected}")


def validate(cfg: Config) -> None:
    m, t, p, c = cfg.model, cfg.train, cfg.parallel, cfg.checkpoint
    for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "vocab_multiple"):
        _require(getattr(m, name) >= 1, f"model.{name}", getattr(m, name), "a positive integer")
    _require(m.n_embd % m.n_head == 0, "model.n_embd", m.n_embd, f"a multiple of model.n_head ({m.n_head})")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "a probability in [0, 1)")
    _require(
        m.attention in ("dense", "alternating_banded"),
        "model.attention",
        m.attention,
        "dense or alternating_banded",
    )
    _require(m.window >= 1, "model.window", m.window, "a positive integer")
    for name in ("batch_size", "micro_batch_size", "seq_len", "log_every", "eval_steps"):
        _require(getattr(t, name) >= 1, f"train.{name}", getattr(t, name), "a positive integer")
    for name in ("max_steps", "warmup_steps", "eval_every", "sample_every", "sample_tokens"):
        _require(getattr(t, name) >= 0, f"train.{name}", getattr(t, name), "a non-negative integer")
    _require(
        t.seq_len <= m.block_size, "train.seq_len", t.seq_len, f"at most model.block_size ({m.block_size})"
    )
    _require(
        t.micro_batch_size <= t.batch_size,
        "train.micro_batch_size",
        t.micro_batch_size,
        f"at most train.batch_size ({t.batch_size})",
    )
    _require(
        t.batch_size % t.micro_batch_size == 0,
        "train.batch_size",
        t.batch_size,
        f"a multiple of train.micro_batch_size ({t.micro_batch_size})",
    )
    for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
        v = getattr(t, name)
        _require(math.isfinite(v) and v >= 0.0, f"train.{name}", v, "a finite number >= 0")
    _require(t.lr > 0.0, "train.lr", t.lr, "a number > 0")
    _require(t.min_lr <= t.lr, "train.min_lr", t.min_lr, f"at most train.lr ({t.lr})")
    for name in ("beta1", "beta2"):
        _require(0.0 <= getattr(t, name) < 1.0, f"train.{name}", getattr(t, name), "a number in [0, 1)")
    _require(t.eps > 0.0, "train.eps", t.eps, "a number > 0")
    tpr = p.threads_per_rank
    _require(
        tpr == "auto" or (isinstance(tpr, int) and tpr >= 1),
        "parallel.threads_per_rank",
        tpr,
        "auto or a positive integer",
    )
    _require(p.reduce in REDUCE_METHODS, "parallel.reduce", p.reduce, " or ".join(REDUCE_METHODS))
    _require(p.bucket_mb > 0, "parallel.bucket_mb", p.bucket_mb, "a number > 0")
    _require(p.check_every >= 0, "parallel.check_every", p.check_every, "a non-negative integer")
    _require(c.every >= 0, "checkpoint.every", c.every, "a non-negative integer")
    _require(c.keep >= 1, "checkpoint.keep", c.keep, "a positive integer")
    _require(bool(cfg.out_dir), "out_dir", cfg.out_dir, "a directory path")


def check_batch_layout(cfg: Config, world: int) -> int:
    """Gradient-accumulation steps for `world` ranks; a batch that does not divide is an error."""
    t = cfg.train
    per_step = t.micro_batch_size * world
    if t.batch_size % per_step:
        raise ConfigError(
            f"train.batch_size = {t.batch_size}: expected a multiple of train.micro_batch_size x ranks "
            f"= {t.micro_batch_size} x {world} = {per_step}"
        )
    return t.batch_size // per_step
