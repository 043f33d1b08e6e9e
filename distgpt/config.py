"""Configuration: YAML files plus `key.sub=value` overrides -> frozen, validated pydantic models.

Every mistake stops the run before any work with one line that names the key, the bad value and
what was expected; a misspelt key gets the closest valid spelling suggested. Pydantic checks types
and ranges; `_config_error` turns its first complaint into that line.

Types are strict, as in the YAML a user writes: an int is accepted where a float is expected, but a
bool is not an int and "3" is not a number. A field's `description`, when it has one, is the
expectation its errors print.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from distgpt.cli import file_problem

ReduceMethod = Literal["auto", "shared_memory", "mpi"]
REDUCE_METHODS: tuple[str, ...] = typing.get_args(ReduceMethod)
Recompute = Literal["none", "block"]
RECOMPUTE_MODES: tuple[str, ...] = typing.get_args(Recompute)
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size")  # fix the parameters' shape: weights must agree

Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
Rate = Annotated[float, Field(ge=0, allow_inf_nan=False, description="a finite number >= 0")]
Beta = Annotated[float, Field(ge=0, lt=1, description="a number in [0, 1)")]


class ConfigError(ValueError):
    """A bad config file, key or value. The message is one line, ready to print."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _bad(key: str, value: Any, expected: str) -> PydanticCustomError:
    """A cross-field rule broken: raised inside a validator, printed as `key = value: expected ...`."""
    return PydanticCustomError(
        "config", "{key} = {value}: expected {expected}", {"key": key, "value": value, "expected": expected}
    )


class ModelConfig(_Section):
    n_layer: Positive = 4
    n_head: Positive = 4
    n_embd: Positive = 128
    block_size: Positive = 256
    vocab_size: Positive = 50257
    dropout: float = Field(0.0, ge=0, lt=1, description="a probability in [0, 1)")
    attention: Literal["dense", "alternating_banded"] = "dense"  # GPT-3: odd layers see a local band
    window: Positive = 128  # band width for alternating_banded
    vocab_multiple: Positive = 64  # wte rows are padded to a multiple of this; padded rows stay 0

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise _bad("model.n_embd", self.n_embd, f"a multiple of model.n_head ({self.n_head})")
        return self

    @property
    def padded_vocab(self) -> int:
        m = self.vocab_multiple
        return ((self.vocab_size + m - 1) // m) * m

    def layer_window(self, layer: int) -> int | None:
        if self.attention == "alternating_banded" and layer % 2 == 1:
            return self.window
        return None


class DataConfig(_Section):
    train: str | None = None  # glob of token shards (required to train)
    val: str | None = None  # glob of token shards; None skips evaluation
    tokenizer: str | None = None  # expected tokenizer of the shards (gpt2 | bytes); None: take the manifest's


class TrainConfig(_Section):
    # batch_size must be a multiple of micro_batch_size x ranks: check_batch_layout, at run time
    batch_size: Positive = 32  # global sequences per optimizer step
    micro_batch_size: Positive = 8  # sequences per rank per forward/backward
    seq_len: Positive = 256
    max_steps: NonNegative = 1000
    lr: float = Field(6e-4, gt=0, allow_inf_nan=False)
    min_lr: Rate = 6e-5
    warmup_steps: NonNegative = 100
    weight_decay: Rate = 0.1
    beta1: Beta = 0.9
    beta2: Beta = 0.95
    eps: float = Field(1e-8, gt=0)
    grad_clip: Rate = 1.0  # 0 disables clipping
    seed: int = 1337
    eval_every: NonNegative = 100  # 0: only at the end
    eval_steps: Positive = 10  # the val set is eval_steps x batch_size windows, fixed
    log_every: Positive = 10
    sample_every: NonNegative = 0  # 0: never print samples while training
    sample_tokens: NonNegative = 64
    # matmul precision: bf16 (float32 master weights and accumulation), fp32, or auto (bf16 where
    # the CPU has AVX512-BF16/AMX-BF16 and a bf16 gemm that uses them loads: oneDNN's or MKL's, see
    # distgpt/gemm16.py)
    precision: Literal["fp32", "bf16", "auto"] = "auto"
    # what a block keeps for its backward: everything (none), or its input alone, its forward re-run
    # in backward (block: ~1.2x the step time, a fraction of the activation memory, the same gradients)
    recompute: Recompute = "none"
    # recompute block: the last N blocks keep their activations and are not re-run (each costs one
    # block's activations and saves 2/3 of a block's forward); more than n_layer - 1 is as none
    recompute_keep: NonNegative = 0

    @model_validator(mode="after")
    def _min_lr_below_lr(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise _bad("train.min_lr", self.min_lr, f"at most train.lr ({self.lr})")
        return self


class DilocoConfig(_Section):
    """DiLoCo (Douillard et al. 2023): each worker (a host) takes inner_steps AdamW steps alone, then
    the workers average their pseudo-gradients (global - local parameters) and take one outer step of
    SGD with Nesterov momentum. The paper's outer lr 0.7 and momentum 0.9 are the defaults."""

    inner_steps: Positive = 50  # steps each host takes alone between outer syncs
    outer_lr: float = Field(0.7, gt=0, allow_inf_nan=False, description="a number > 0")
    outer_momentum: Beta = 0.9
    nesterov: bool = True
    # the pseudo-gradients cross hosts as fp32, or rounded to bf16 (half the bytes; summed in fp32)
    wire: Literal["fp32", "bf16"] = "fp32"


class ParallelConfig(_Section):
    # ZeRO-1: shard AdamW state and update across ranks. auto: ZeRO-1 where the ranks share a node's
    # memory (one node, or the hosts of a diloco run), replicated when every step's sum crosses hosts
    # (the fp32 parameter gather after the update cannot overlap anything there: 1.62x vs 1.26x the
    # one-host step at 1 Gbit/s, benchmarks/README.md)
    zero: bool | Literal["auto"] = Field("auto", description="true, false or auto")
    threads_per_rank: Literal["auto"] | Positive = Field("auto", description="auto or a positive integer")
    reduce: ReduceMethod = "auto"  # gradient sum: shared_memory (ranks on one node), mpi, or auto
    overlap: bool = True  # mpi reduce: reduce gradient buckets during backward
    bucket_mb: float = Field(8.0, gt=0)  # mpi reduce: gradient bucket size for overlapped reduction
    # mpi reduce: gradients cross the network as fp32, or rounded to bf16 (half the bytes; summed in fp32)
    grad_wire: Literal["fp32", "bf16"] = "fp32"
    comm_thread: bool = True  # mpi reduce: a thread moves the sums along while backward computes
    check_every: NonNegative = 100  # steps between cross-rank parameter checks (0: start only)
    # seconds a rank may wait in one collective before it reports the ranks it waits for and exits
    timeout_s: float = Field(600.0, gt=0, allow_inf_nan=False, description="a number of seconds > 0")
    # how the hosts agree: every step (synchronous data parallelism), or every
    # parallel.diloco.inner_steps steps (DiLoCo: the ranks of a host stay synchronous)
    sync: Literal["step", "diloco"] = "step"
    diloco: DilocoConfig = Field(default_factory=DilocoConfig)

    def zero_for(self, n_nodes: int) -> bool:
        """Whether ZeRO-1 runs (for more than one rank) on n_nodes nodes: see `zero`."""
        if self.zero != "auto":
            return self.zero
        return n_nodes == 1 or self.sync == "diloco"


# LoRA's targets, Hugging Face's module names (lora.TARGETS, which is built from the model's table and
# checks names: config.py cannot import it at load time, as lora.py builds on model.py, which imports this)
LORA_TARGETS: tuple[str, ...] = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class LoraConfig(_Section):
    """LoRA (distgpt/lora.py): train low-rank adapters on the frozen weights of init_from."""

    rank: NonNegative = 0  # 0: LoRA off (every parameter trains)
    alpha: float = Field(16.0, gt=0, allow_inf_nan=False, description="a number > 0")  # scale alpha / rank
    dropout: float = Field(0.0, ge=0, lt=1, description="a probability in [0, 1)")  # on the adapters' input
    # the adapted matmuls of every block
    targets: tuple[str, ...] = Field(LORA_TARGETS, description=f"a list of some of {', '.join(LORA_TARGETS)}")

    @field_validator("targets", mode="before")
    @classmethod
    def _known_targets(cls, value: Any) -> tuple[str, ...]:
        """A YAML list (or one name) -> the targets in canonical order; lora.py's check names an
        unknown one and the closest valid one."""
        from distgpt.lora import check_targets

        if not isinstance(value, (list, tuple, str)) or not all(isinstance(t, str) for t in value):
            raise _bad("lora.targets", value, f"a list of some of {', '.join(LORA_TARGETS)}")
        try:
            return check_targets(value)
        except ValueError as e:
            raise PydanticCustomError("config_line", "{line}", {"line": str(e)}) from None


class CheckpointConfig(_Section):
    every: NonNegative = 0  # steps between checkpoints (0: only at the end and on signals)
    keep: Positive = 3  # newest checkpoints kept on disk


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    # scratch | a Hugging Face folder or hub id | an llm.c .bin | a distgpt checkpoint (or out_dir)
    init_from: str = "scratch"
    out_dir: str = Field("out", min_length=1, description="a directory path")
    resume: str | None = None  # None | auto | path of a checkpoint folder
    # a fresh run into an out_dir that holds another run is refused unless this is set: then that
    # run's checkpoints and metrics (only the files distgpt wrote) are removed first
    overwrite_out_dir: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as YAML and JSON hold it (lora.targets as a list)."""
        tree = self.model_dump()
        tree["lora"]["targets"] = list(tree["lora"]["targets"])
        return tree


def describe_keys() -> list[str]:
    """`section.key = default   what it takes` for every config key: train --help-config (the README's
    configuration table says what each one means)."""
    lines = []

    def takes(f) -> str:
        if f.description:
            return f.description
        kind = f.annotation
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if typing.get_origin(kind) is Literal:
            return "one of " + ", ".join(map(str, args))
        if args:                                    # X | None
            return f"{args[0].__name__}, or unset"
        bound = next((f"{m.ge}" for m in f.metadata if hasattr(m, "ge")), None)
        return kind.__name__ + (f" >= {bound}" if bound is not None else "")

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
                walk(f.annotation, f"{prefix}{name}.")
            else:
                default = f.get_default(call_default_factory=True)
                default = list(default) if isinstance(default, tuple) else default   # as YAML writes it
                lines.append(f"{prefix + name + ' = ' + repr(default):40s} {takes(f)}")
    walk(Config, "")
    return lines


def user_model_keys(cfg: Config) -> dict[str, int]:
    """The model-shape keys the config file or the command line set, with their values (pretrained
    weights must agree with these; the others are taken from the weights)."""
    return {k: getattr(cfg.model, k) for k in SHAPE_KEYS if k in cfg.model.model_fields_set}


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """The run's config: the YAML file (or the defaults), then the overrides, validated. The batch
    layout depends on the world size, so it is checked at run time (check_batch_layout)."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        problem = file_problem(path)
        if problem:
            raise ConfigError(f"config file {path}: {problem}")
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
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as e:
        raise _config_error(e) from None
    # across sections, and only for a run: code may build a Config around a model alone
    m, t = cfg.model, cfg.train
    if t.seq_len > m.block_size:
        raise ConfigError(f"train.seq_len = {t.seq_len}: expected at most model.block_size ({m.block_size})")
    if cfg.lora.rank and cfg.init_from == "scratch":
        raise ConfigError(f"lora.rank = {cfg.lora.rank} with init_from = scratch: expected pretrained "
                          "weights to adapt in init_from (a Hugging Face folder or hub id, an llm.c .bin, "
                          "or a distgpt checkpoint), or lora.rank = 0 to train every parameter")
    return cfg


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


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


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


# ----------------------------------------------------------------------------- one-line errors

_TYPE_WORDS = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true/false",
    "string_type": "a string",
    "model_type": "a section of keys",
}
_INT_FLOORS = {0: "a non-negative integer", 1: "a positive integer"}
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than": "<", "less_than_equal": "<="}


def _config_error(exc: ValidationError) -> ConfigError:
    """Pydantic's first error as `key = value: expected ...`, or an unknown key with a suggestion."""
    err = exc.errors(include_url=False)[0]
    kind, ctx, value = err["type"], err.get("ctx") or {}, err["input"]
    if kind == "config_line":  # a check that words its whole line itself (lora.targets)
        return ConfigError(ctx["line"])
    if kind == "config":  # a cross-field rule (_bad) names its key itself
        return ConfigError(f"{ctx['key']} = {ctx['value']!r}: expected {ctx['expected']}")
    # the loc is field names, then (inside a union) the name of the member that failed: drop those
    section, names, field = Config, [], None
    for part in err["loc"]:
        if section is None or part not in section.model_fields:
            if kind in ("extra_forbidden", "invalid_key"):  # a misspelt key, or a YAML key like 1
                return _unknown(".".join([*names, str(part)]), list(section.model_fields))
            break
        names.append(part)
        field = section.model_fields[part]
        section = field.annotation if isinstance(field.annotation, type) and issubclass(
            field.annotation, BaseModel) else None
    if field is not None and field.annotation is float and type(value) is int:
        value = float(value)  # what the field would have held
    if field is not None and field.description:
        expected = field.description
    elif kind in _TYPE_WORDS:
        expected = _TYPE_WORDS[kind] + (" or null" if field is not None and field.default is None else "")
    elif kind == "greater_than_equal" and type(value) is int:
        expected = _INT_FLOORS.get(ctx["ge"], f"an integer >= {ctx['ge']}")
    elif kind in _BOUNDS:
        expected = f"a number {_BOUNDS[kind]} {next(iter(ctx.values())):g}"
    elif kind == "finite_number":
        expected = "a finite number"
    elif kind == "literal_error":
        expected = ctx["expected"].replace("'", "")
    else:
        expected = err["msg"][0].lower() + err["msg"][1:]  # pydantic's own words
    return ConfigError(f"{'.'.join(names)} = {value!r}: expected {expected}")


def _unknown(key: str, valid: list[str]) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    prefix = key[: len(key) - len(leaf)]
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.6)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{key}'{hint}")
