"""Starting from Hugging Face GPT-2 weights through the real training command."""

from __future__ import annotations

import pytest
import yaml

from conftest import read_metrics, run_cli, tiny_config, tiny_hf_gpt2


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny random GPT-2 over the byte vocabulary, saved the way save_pretrained saves it."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    tiny_hf_gpt2(257, 64, 32, 2, 2, bos_token_id=256, eos_token_id=256).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_finetuning_from_hf_weights_lowers_the_loss(tmp_path, shakespeare_bytes, hf_folder):
    cfg = tiny_config(tmp_path, shakespeare_bytes, model={}, init_from=str(hf_folder),
                      train={"max_steps": 30, "lr": 3e-3, "warmup_steps": 3, "log_every": 5,
                             "eval_every": 15, "sample_every": 15, "sample_tokens": 20})
    # the model section of tiny_config names n_layer etc.; drop them: the shape comes from the weights
    doc = yaml.safe_load(cfg.read_text())
    doc["model"] = {"block_size": 32}
    cfg.write_text(yaml.safe_dump(doc))
    r = run_cli("train", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "model: 2 layers, 2 heads, 32 wide, block 32, vocab 257" in r.stdout
    assert "sample at step 15:" in r.stdout
    rows = read_metrics(tmp_path / "out")
    train = [row for row in rows if "train_loss" in row]
    assert train[-1]["train_loss"] < train[0]["train_loss"] - 1.0
    vals = [row["val_loss"] for row in rows if "val_loss" in row]
    assert vals[-1] < vals[0]


def test_config_shape_that_contradicts_the_weights_is_refused(tmp_path, shakespeare_bytes, hf_folder):
    cfg = tiny_config(tmp_path, shakespeare_bytes, init_from=str(hf_folder))   # model.n_embd: 32, n_layer: 2
    r = run_cli("train", "--config", str(cfg), "model.n_layer=3")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"distgpt.train: error: model.n_layer is 3 in the config but 2 in {hf_folder}"]


def test_missing_weights_folder_is_one_line(tmp_path, shakespeare_bytes):
    cfg = tiny_config(tmp_path, shakespeare_bytes, init_from=str(tmp_path / "no_such_model"))
    r = run_cli("train", "--config", str(cfg))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no_such_model" in lines[0]
