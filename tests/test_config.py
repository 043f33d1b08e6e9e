"""Configuration: every mistake is one line naming the key, the value and what was expected; the
defaults are the README's; a loaded config is frozen and knows which model keys the user set."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pydantic
import pytest
from threadpoolctl import threadpool_limits

from distgpt import train
from distgpt.config import (
    Config,
    ConfigError,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
    check_batch_layout,
    load_config,
    parse_override,
    user_model_keys,
)

from conftest import run_cli, tiny_config

README = Path(__file__).resolve().parents[1] / "README.md"


def run_train(capsys, *argv: str) -> tuple[int, list[str]]:
    """`python -m distgpt.train argv` in this process: (exit code, stderr lines). Whatever the
    command sets up for itself (BLAS thread limits, OMP_NUM_THREADS) is undone afterwards; configs
    that get as far as setting up run with parallel.threads_per_rank = 1, so no thread pool."""
    omp = os.environ.get("OMP_NUM_THREADS")
    try:
        with threadpool_limits(limits=None):
            code = train.main(list(argv))
    finally:
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp
    return code, capsys.readouterr().err.strip().splitlines()


def load(*overrides: str, text: str | None = None, tmp_path: Path | None = None) -> Config:
    path = None
    if text is not None:
        path = tmp_path / "c.yaml"
        path.write_text(text)
    return load_config(path, list(overrides))


def error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(None, list(overrides))
    return str(e.value)


# ----------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("override, message", [
    ("train.lrr=0.1", "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
    ("modle.n_layer=2", "unknown config key 'modle'; did you mean 'model'?"),
    ("train.max_steps=ten", "train.max_steps = 'ten': expected an integer"),
    ("train.lr=-1", "train.lr = -1.0: expected a number > 0"),
    ("model.n_head=5", "model.n_embd = 32: expected a multiple of model.n_head (5)"),
    ("model.dropout=1.5", "model.dropout = 1.5: expected a probability in [0, 1)"),
    ("train.seq_len=64", "train.seq_len = 64: expected at most model.block_size (32)"),
    ("train.micro_batch_size=5",
     "train.batch_size = 12: expected a multiple of train.micro_batch_size x ranks = 5 x 1 = 5"),
    ("parallel.threads_per_rank=many",
     "parallel.threads_per_rank = 'many': expected auto or a positive integer"),
    ("data.train=/nonexistent/*.bin", "/nonexistent/*.bin"),
])
def test_bad_config_stops_the_command_with_one_line(tmp_path, capsys, override, message):
    cfg = tiny_config(tmp_path, tmp_path / "no_data", parallel={"threads_per_rank": 1})
    code, lines = run_train(capsys, "--config", str(cfg), override)
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("distgpt.train: error: ") and message in lines[0]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_missing_config_file_and_missing_data_key(tmp_path, capsys):
    code, lines = run_train(capsys, "--config", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert lines == [f"distgpt.train: error: config file {tmp_path / 'nope.yaml'}: no such file"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {n_layer: 1, n_embd: 32, vocab_size: 257}\nparallel: {threads_per_rank: 1}\n")
    code, lines = run_train(capsys, "--config", str(cfg))
    assert code == 2 and len(lines) == 1 and "data.train is not set" in lines[0]


def test_a_folder_given_as_the_config_says_so(tmp_path, capsys):
    code, lines = run_train(capsys, "--config", str(tmp_path))
    assert code == 2
    assert lines == [f"distgpt.train: error: config file {tmp_path}: is a folder, expected a file"]


def test_overrides_may_follow_options(tmp_path):
    """`--dry-run train.max_steps=5` and `train.max_steps=5 --dry-run` mean the same (intermixed)."""
    cfg = tiny_config(tmp_path, tmp_path / "no_data", train={"max_steps": 9},
                      data={"train": None, "val": None})
    for argv in (["--config", str(cfg), "--dry-run", "train.max_steps=5"],
                 ["train.max_steps=5", "--config", str(cfg), "--dry-run"]):
        r = run_cli("train", *argv)
        assert r.returncode == 0, r.stderr
        assert '"max_steps": 5' in r.stdout


def test_help_config_lists_every_key_with_its_default(capsys):
    assert train.main(["--help-config"]) == 0
    out = capsys.readouterr().out.splitlines()
    listed = {line.split(" = ")[0]: line.split(" = ")[1].split()[0] for line in out}
    assert set(listed) == set(_flat(Config().to_dict()))
    assert listed["train.lr"] == "0.0006" and listed["overwrite_out_dir"] == "False"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--version"])
    assert e.value.code == 0
    assert re.fullmatch(r"distgpt \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)


def test_bad_yaml_names_file_and_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  n_layer: [1\n")
    code, lines = run_train(capsys, "--config", str(cfg))
    assert code == 2 and len(lines) == 1
    assert str(cfg) in lines[0] and "line 3" in lines[0] and "not valid YAML" in lines[0]


def test_misspelt_key_in_the_file_gets_a_suggestion(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {n_layers: 2}\n")
    code, lines = run_train(capsys, "--config", str(cfg))
    assert (code, lines) == (2, ["distgpt.train: error: unknown config key 'model.n_layers'; "
                                 "did you mean 'model.n_layer'?"])


# ----------------------------------------------------------------------------- each kind of check


@pytest.mark.parametrize("override, message", [
    # ranges of integers
    ("model.n_layer=0", "model.n_layer = 0: expected a positive integer"),
    ("train.warmup_steps=-1", "train.warmup_steps = -1: expected a non-negative integer"),
    ("checkpoint.keep=0", "checkpoint.keep = 0: expected a positive integer"),
    # ranges of numbers (ints are shown as the floats they would be)
    ("train.eps=0", "train.eps = 0.0: expected a number > 0"),
    ("train.lr=inf", "train.lr = inf: expected a finite number"),
    ("train.weight_decay=-0.1", "train.weight_decay = -0.1: expected a finite number >= 0"),
    ("train.grad_clip=nan", "train.grad_clip = nan: expected a finite number >= 0"),
    ("train.beta2=1", "train.beta2 = 1.0: expected a number in [0, 1)"),
    ("parallel.bucket_mb=0", "parallel.bucket_mb = 0.0: expected a number > 0"),
    # choices
    ("model.attention=sparse", "model.attention = 'sparse': expected dense or alternating_banded"),
    ("parallel.reduce=nccl", "parallel.reduce = 'nccl': expected auto, shared_memory or mpi"),
    ("parallel.grad_wire=fp16", "parallel.grad_wire = 'fp16': expected fp32 or bf16"),
    ("parallel.threads_per_rank=0", "parallel.threads_per_rank = 0: expected auto or a positive integer"),
    ("out_dir=''", "out_dir = '': expected a directory path"),
    # types
    ("train.lr=fast", "train.lr = 'fast': expected a number"),
    ("parallel.zero=yes please", "parallel.zero = 'yes please': expected true, false or auto"),
    ("data.train=3", "data.train = 3: expected a string or null"),
    ("train=3", "train = 3: expected a section of keys"),
    # across fields and sections
    ("model.n_embd=30", "model.n_embd = 30: expected a multiple of model.n_head (4)"),
    ("train.min_lr=0.01", "train.min_lr = 0.01: expected at most train.lr (0.0006)"),
    ("train.seq_len=512", "train.seq_len = 512: expected at most model.block_size (256)"),
    # keys
    ("train.lrr=0.1", "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
    ("init_fro=gpt2", "unknown config key 'init_fro'; did you mean 'init_from'?"),
    ("checkpoint.xyz=1", "unknown config key 'checkpoint.xyz'; valid keys: every, keep"),
])
def test_each_kind_of_check_names_key_value_and_expectation(override, message):
    assert error(override) == message


def test_bool_is_not_an_integer_nor_is_a_string_or_a_float():
    assert error("model.n_layer=true") == "model.n_layer = True: expected an integer"
    assert error("model.n_layer='3'") == "model.n_layer = '3': expected an integer"
    assert error("model.n_layer=3.0") == "model.n_layer = 3.0: expected an integer"
    assert error("train.lr=true") == "train.lr = True: expected a number"


def test_integer_is_accepted_as_a_float():
    cfg = load_config(None, ["train.lr=1", "train.grad_clip=0"])
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float and type(cfg.train.grad_clip) is float


def test_first_error_is_reported(tmp_path):
    with pytest.raises(ConfigError, match=r"^model.n_layer = 0: expected a positive integer$"):
        load(text="model: {n_layer: 0}\ntrain: {lr: -1}\n", tmp_path=tmp_path)


def test_file_and_override_problems(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping of keys at the top level"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="override model.n_layer.x: 'n_layer' is not a section"):
        load("model.n_layer.x=3", text="model: {n_layer: 2}\n", tmp_path=tmp_path)
    with pytest.raises(ConfigError, match=r"override 'train\.lr': expected key=value"):
        load_config(None, ["train.lr"])


def test_yaml_exponent_floats_are_numbers(tmp_path):
    cfg = load("train.min_lr=1e-5", text="train: {lr: 6e-4, eps: 1E-8}\n", tmp_path=tmp_path)
    assert (cfg.train.lr, cfg.train.eps, cfg.train.min_lr) == (6e-4, 1e-8, 1e-5)


def test_batch_layout_is_checked_once_at_run_time():
    # a layout is only wrong for some world size, so loading does not judge it
    cfg = load_config(None, ["train.batch_size=12", "train.micro_batch_size=5"])
    with pytest.raises(ConfigError) as e:
        check_batch_layout(cfg, 1)
    assert str(e.value) == ("train.batch_size = 12: expected a multiple of train.micro_batch_size x ranks "
                            "= 5 x 1 = 5")
    cfg = load_config(None, ["train.batch_size=4", "train.micro_batch_size=8"])
    with pytest.raises(ConfigError, match="= 8 x 1 = 8"):
        check_batch_layout(cfg, 1)
    assert check_batch_layout(load_config(None, ["train.batch_size=24", "train.micro_batch_size=4"]), 3) == 2


def test_every_shipped_config_loads():
    for path in sorted((README.parent / "configs").glob("*.yaml")):
        cfg = load_config(path)
        check_batch_layout(cfg, 1)


# ----------------------------------------------------------------------------- the objects


def test_user_model_keys_are_the_ones_set_in_the_file_or_on_the_command_line(tmp_path):
    cfg = load("model.n_embd=64", text="model: {n_layer: 2, n_head: 2}\n", tmp_path=tmp_path)
    assert user_model_keys(cfg) == {"n_layer": 2, "n_head": 2, "n_embd": 64}
    assert user_model_keys(load_config(None, ["model.dropout=0.1"])) == {}
    assert user_model_keys(load_config(None)) == {}
    # set to the default value is still set
    assert user_model_keys(load_config(None, ["model.vocab_size=50257"])) == {"vocab_size": 50257}


def test_configs_are_frozen_and_hashable():
    cfg = load_config(None, ["model.n_layer=2"])
    with pytest.raises(pydantic.ValidationError):
        cfg.model.n_layer = 3
    with pytest.raises(pydantic.ValidationError):
        cfg.train = TrainConfig()
    again = load_config(None, ["model.n_layer=2"])
    assert cfg == again and hash(cfg) == hash(again)
    assert {cfg.model: 1}[ModelConfig(n_layer=2)] == 1


def test_keyword_construction_and_the_model_helpers():
    m = ModelConfig(n_layer=2, n_head=2, n_embd=8, block_size=8, vocab_size=11,
                    attention="alternating_banded", window=4)
    assert m.padded_vocab == 64 and [m.layer_window(i) for i in range(2)] == [None, 4]
    cfg = Config(model=m, train=TrainConfig(batch_size=4, micro_batch_size=2, seq_len=8),
                 parallel=ParallelConfig(zero=False, threads_per_rank=2))
    assert check_batch_layout(cfg, 1) == 2
    assert Config.model_validate(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="expected a multiple of model.n_head"):
        ModelConfig(n_head=3)


def _readme_defaults() -> dict[str, object]:
    """`key` -> default from the README's configuration table, read as an override value would be
    ('(none)' and the like: None)."""
    text = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]   # that section only
    defaults = {}
    for keys, default in re.findall(r"^\| (`[^|]+) \| ([^|]+) \|", text, re.M):
        names = re.findall(r"`([\w.]+)`", keys)
        # a list default ([a, b]) is one YAML value, not a value per key
        listed = default.lstrip().startswith("[")
        values = [default.strip()] if listed else [v.strip() for v in default.split(",")]
        section = names[0].rpartition(".")[0]
        for name, value in zip(names, values * len(names) if len(values) == 1 else values, strict=True):
            key = name if "." in name or not section else f"{section}.{name}"
            defaults[key] = None if value.startswith("(") else parse_override(f"{key}={value}")[1]
    return defaults


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def test_defaults_are_the_readme_table():
    assert _readme_defaults() == _flat(Config().to_dict())
