"""Decoding: the KV cache against full forward passes, greedy and beam search against
transformers' generate, top-k / top-p filtering, seeded sampling and the command line."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it: never the network

import numpy as np
import pytest
import torch

from distgpt import checkpoint
from distgpt.config import Config
from distgpt.data import get_tokenizer
from distgpt.dist import Comm
from distgpt.model import GPT, ModelConfig, init_params
from distgpt.partition import Partition
from distgpt.sample import StreamDecoder, beam_search, filter_logits, generate
from distgpt.weights import load_init

from conftest import run_cli, tiny_hf_gpt2

PROMPT = [5, 17, 99, 200, 3, 42]
NEW = 30


# ----------------------------------------------------------------------------------------------------
# the KV cache


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("attention", ["dense", "alternating_banded"])
def test_kv_cache_matches_full_forward(attention, precision, request):
    cfg = ModelConfig(
        n_layer=3, n_head=2, n_embd=32, block_size=24, vocab_size=101, attention=attention, window=5
    )
    if precision == "bf16":
        request.getfixturevalue("bf16_here")
    model = GPT(cfg, precision=precision)
    init_params(model.layout, model.params, seed=0)
    model.params += np.random.default_rng(1).normal(0, 0.05, model.params.shape).astype(np.float32)
    idx = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 21))
    full = model.logits(idx)
    scale = np.abs(full).max()
    for chunks in ([7] + [1] * 14, [5, 3, 8, 4, 1]):  # prefill then one by one; uneven chunks
        cache = model.new_cache(2, 21)
        got, t = [], 0
        for n in chunks:
            got.append(model.logits(idx[:, t : t + n], cache))
            t += n
        assert t == 21 and cache.length == 21
        err = np.abs(np.concatenate(got, axis=1) - full).max() / scale
        # bf16: the cache keeps bf16 keys and values, the roundings the full pass's matmuls take;
        # only the float32 sums inside the gemms may differ with the number of query rows
        assert err < (1e-5 if precision == "fp32" else 1e-3), (chunks, err)
    if precision == "bf16":
        assert cache.k.dtype == np.uint16


# ----------------------------------------------------------------------------------------------------
# against transformers' generate on the same weights


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny GPT2LMHeadModel over the byte vocabulary (257), saved as a folder, and ours on its weights.
    A larger init range than GPT-2's makes the distributions peaked, so that the float32 rounding of
    two implementations cannot flip a near-tie."""
    hf = tiny_hf_gpt2(257, 64, 48, 2, 3, initializer_range=0.2)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("sample") / "tiny"
    hf.save_pretrained(folder)
    hf.generation_config.eos_token_id = None  # the config's eos 0 would otherwise stop HF's search
    ours_cfg, params = load_init(str(folder))
    return folder, hf, GPT(ours_cfg, params=params)


def hf_generate(hf, eos: int | None = None, **kw) -> list[int]:
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([PROMPT]),
            attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW,
            pad_token_id=0,
            eos_token_id=eos,
            **kw,
        )
    ids = out[0, len(PROMPT) :].tolist()
    return ids[:-1] if eos is not None and ids and ids[-1] == eos else ids  # we do not return eot


def test_greedy_matches_hf(tiny):
    _, hf, model = tiny
    ref = hf_generate(hf, num_beams=1)
    assert generate(model, PROMPT, NEW, greedy=True) == ref
    assert generate(model, PROMPT, NEW, greedy=True, use_cache=False) == ref
    assert generate(model, PROMPT, NEW, temperature=0.0) == ref
    # with an end-of-text id that greedy decoding reaches, both stop there
    eot = ref[4]
    assert eot not in ref[:4]
    assert (
        generate(model, PROMPT, NEW, greedy=True, eot=eot) == hf_generate(hf, eos=eot, num_beams=1) == ref[:4]
    )


@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_beam_search_matches_hf(tiny, length_penalty):
    _, hf, model = tiny
    greedy = hf_generate(hf, num_beams=1)
    # no eos; an eos that ends hypotheses early; the greedy path's most frequent token
    for eot in (None, greedy[3], max(set(greedy), key=greedy.count)):
        ref = hf_generate(hf, eos=eot, num_beams=3, length_penalty=length_penalty)
        got = beam_search(model, PROMPT, NEW, beams=3, length_penalty=length_penalty, eot=eot)
        assert got == ref, (eot, got, ref)


def nanogpt_greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """nanoGPT's generate, greedy: a full forward over the last block_size tokens for every token."""
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(np.argmax(model.logits(np.asarray([tokens[-model.cfg.block_size:]]))[0, -1])))
    return tokens[len(prompt):]


def test_generates_beyond_block_size_by_cropping_the_context(tiny):
    """200 new tokens with block_size 64 gives 200 tokens (before: 64 - len(prompt), silently), the
    context cropped to the last 64 tokens as nanoGPT does; the KV cache path re-prefills the cropped
    window once it is full and chooses the same tokens as the cache-free path and nanoGPT's loop."""
    _, _, model = tiny
    assert model.cfg.block_size == 64
    ref = nanogpt_greedy(model, PROMPT, 200)
    assert generate(model, PROMPT, 200, greedy=True) == ref
    assert generate(model, PROMPT, 200, greedy=True, use_cache=False) == ref
    assert generate(model, PROMPT, 200, temperature=0.0) == ref
    # a prompt longer than the window is cropped too (before: a ValueError)
    long_prompt = list(range(1, 101))
    assert generate(model, long_prompt, 20, greedy=True) == nanogpt_greedy(model, long_prompt, 20)
    # beam search: one beam is greedy decoding, also past the window; more beams fill the length asked
    assert beam_search(model, PROMPT, 120, beams=1) == ref[:120]
    assert len(beam_search(model, PROMPT, 120, beams=3)) == 120
    # sampling past the window: reproducible, and the cache does not change the draws
    draw = dict(rng=None, top_k=20, temperature=0.8)
    a = generate(model, PROMPT, 150, **{**draw, "rng": np.random.default_rng(7)})
    b = generate(model, PROMPT, 150, use_cache=False, **{**draw, "rng": np.random.default_rng(7)})
    assert a == b and len(a) == 150


def test_negative_temperature_is_an_error(tiny):
    _, _, model = tiny
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(model, PROMPT, 5, temperature=-1.0)


# ----------------------------------------------------------------------------------------------------
# filtering and sampling


def kept(logits: np.ndarray) -> list[int]:
    return np.flatnonzero(np.isfinite(logits)).tolist()


def test_top_k_and_top_p_keep_the_expected_tokens():
    logits = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15], np.float32))
    assert kept(filter_logits(logits, top_k=2)) == [1, 3]
    assert kept(filter_logits(logits, top_k=1)) == [1]
    assert kept(filter_logits(logits, top_k=10)) == [0, 1, 2, 3, 4]
    assert kept(filter_logits(logits, top_p=0.5)) == [1, 3]  # 0.4 < 0.5 <= 0.7
    assert kept(filter_logits(logits, top_p=0.75)) == [1, 3, 4]  # 0.7 < 0.75 <= 0.85
    assert kept(filter_logits(logits, top_p=0.3)) == [1]  # always at least the most probable
    assert kept(filter_logits(logits, top_p=0.9)) == [1, 2, 3, 4]
    assert kept(filter_logits(logits, top_p=1.0)) == [0, 1, 2, 3, 4]
    assert kept(filter_logits(logits, top_k=3, top_p=0.8)) == [1, 3]  # top-p on the renormalised top-3
    # kept logits are unchanged; batches are filtered row by row
    batch = np.stack([logits, logits[::-1]])
    out = filter_logits(batch, top_k=2)
    assert [kept(r) for r in out] == [[1, 3], [1, 3]]  # the reversed row has its top two at 3 and 1
    assert np.array_equal(out[0][[1, 3]], logits[[1, 3]])
    # ties with the k-th value are kept, as in transformers
    assert kept(filter_logits(np.array([1.0, 2.0, 2.0, 0.0]), top_k=1)) == [1, 2]


def test_filters_agree_with_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((64, 50)) * 3).astype(np.float32)
    logits[:8, :10] = 1.5  # ties
    for k in (1, 5, 20):
        ref = TopKLogitsWarper(k)(None, torch.tensor(logits)).numpy()
        assert np.array_equal(np.isfinite(filter_logits(logits, top_k=k)), np.isfinite(ref)), k
    for p in (0.1, 0.5, 0.9, 0.99):
        ref = np.isfinite(TopPLogitsWarper(p)(None, torch.tensor(logits)).numpy())
        got = np.isfinite(filter_logits(logits, top_p=p))
        assert np.array_equal(got[8:], ref[8:]), p
        # torch.sort orders ties arbitrarily, so with ties only the number kept is comparable
        assert np.array_equal(got.sum(1), ref.sum(1)), p
    # among tied logits top-p keeps the lower ids, as argmax would pick them
    assert kept(filter_logits(np.array([0.0, 1.0, 1.0, 1.0]), top_p=0.5)) == [1, 2]


def test_seeded_sampling_is_reproducible_and_respects_filters(tiny):
    _, _, model = tiny

    def draw(seed: int, **kw) -> list[int]:
        return generate(model, PROMPT, NEW, rng=np.random.default_rng(seed), **kw)

    assert draw(1, top_k=20) == draw(1, top_k=20)
    assert draw(1) != draw(2)
    # a temperature near zero is greedy; top_k=1 is greedy whatever the temperature
    greedy = generate(model, PROMPT, NEW, greedy=True)
    assert draw(3, top_k=1, temperature=5.0) == greedy
    assert draw(3, temperature=1e-6) == greedy
    # streaming sees every token, in order
    seen: list[int] = []
    assert draw(4, top_p=0.9, on_token=seen.append) == seen


def test_sampling_frequencies():
    """The inverse-CDF draw follows the filtered distribution (and never a filtered token)."""
    from distgpt.sample import _choose

    logits = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15]))
    rng = np.random.default_rng(0)
    draws = np.bincount([_choose(logits, 1.0, 3, None, False, rng) for _ in range(4000)], minlength=5)
    assert draws[0] == 0 and draws[2] == 0
    np.testing.assert_allclose(draws[[1, 3, 4]] / 4000, np.array([0.4, 0.3, 0.15]) / 0.85, atol=0.03)


def test_stream_decoder_holds_back_split_characters():
    tok = get_tokenizer("bytes")
    text = "héllo, wörld € 🙂!"
    stream = StreamDecoder(tok)
    pieces = [stream.push(b) for b in tok.encode(text)] + [stream.flush()]
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)


# ----------------------------------------------------------------------------------------------------
# command line


def run_sample(*args: str) -> subprocess.CompletedProcess:
    return run_cli("sample", *args, timeout=120)


@pytest.mark.slow
def test_cli_end_to_end(tiny):
    folder, _, model = tiny
    base = ["--ckpt", str(folder), "--tokenizer", "bytes", "--prompt", "Hi", "--max-new-tokens", "20"]
    r = run_sample(*base, "--greedy")
    assert r.returncode == 0, r.stderr
    expected = get_tokenizer("bytes").decode(generate(model, list(b"Hi"), 20, greedy=True, eot=256))
    assert r.stdout == "Hi" + expected + "\n"
    r = run_sample(*base, "--seed", "3", "--top-k", "40", "--top-p", "0.95", "--num-samples", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hi") and r.stdout.count("-" * 40) == 1
    assert (
        r.stdout
        == run_sample(*base, "--seed", "3", "--top-k", "40", "--top-p", "0.95", "--num-samples", "2").stdout
    )
    r = run_sample(*base, "--beams", "3")
    assert r.returncode == 0 and r.stdout.startswith("Hi"), r.stderr


@pytest.mark.slow
def test_cli_gives_all_the_tokens_asked_beyond_block_size(tiny):
    folder, _, model = tiny
    r = run_sample("--ckpt", str(folder), "--tokenizer", "bytes", "--prompt", "Hi", "--max-new-tokens", "200",
                   "--greedy")
    assert r.returncode == 0, r.stderr
    ids = nanogpt_greedy(model, list(b"Hi"), 200)
    assert 256 not in ids  # no end-of-text on this path, so all 200 are printed
    assert r.stdout == "Hi" + get_tokenizer("bytes").decode(ids) + "\n"
    assert r.stderr.startswith("[200 tokens in ")  # before: [62 tokens ...]


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    # a skipped corrupt checkpoint is reported on its own warning line before the error
    lines = [line for line in r.stderr.splitlines() if not line.startswith("distgpt: warning: ")]
    assert len(lines) == 1 and lines[0].startswith("sample: error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_cli_negative_temperature_is_refused_and_help_says_zero_is_greedy():
    one_line_error(run_sample("--ckpt", "x", "--temperature", "-1"), "--temperature must be >= 0", "greedy")
    one_line_error(run_sample("--ckpt", "x", "--temperature", "nan"), "--temperature")
    r = run_sample("--help")
    assert r.returncode == 0 and "0 means greedy" in " ".join(r.stdout.split())


def test_cli_invalid_utf8_prompt_names_the_problem(tiny):
    folder, _, _ = tiny
    prompt = b"ab\xffcd".decode("utf-8", "surrogateescape")  # how Python hands such argv bytes over
    r = run_sample("--ckpt", str(folder), "--tokenizer", "bytes", "--prompt", prompt)
    one_line_error(r, "--prompt is not valid UTF-8", "0xff", "character 2")  # before: "sample: error: utf-8"


def bad_sources(root: Path) -> dict[str, Path | str]:
    """Inputs for --ckpt that are not model weights, each made on disk."""
    made = {}
    for name, files in {
        "empty folder": {},
        "config.json not JSON": {"config.json": b"{"},
        "config.json a list": {"config.json": b"[1]"},
        "config.json without shape": {"config.json": b'{"model_type": "gpt2"}'},
        "config.json inconsistent": {"config.json": json.dumps(dict(
            model_type="gpt2", n_embd=33, n_head=2, n_layer=1, n_positions=8, vocab_size=10)).encode()},
        "safetensors garbage": {"config.json": json.dumps(dict(
            model_type="gpt2", n_embd=32, n_head=2, n_layer=1, n_positions=8, vocab_size=10)).encode(),
            "model.safetensors": b"garbage!" * 4},
        "corrupt checkpoint": {"ckpt/step_0000001/manifest.json": b"{"},
    }.items():
        folder = root / name.replace(" ", "_")
        folder.mkdir()
        for rel, data in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
        made[name] = folder
    (root / "text.txt").write_text("hello\n")
    made["a text file"] = root / "text.txt"
    made["empty string"] = ""
    return made


def test_cli_bad_ckpt_inputs_are_one_line(tmp_path):
    """Before: a MemoryError traceback (safetensors garbage), an AttributeError (a list), pydantic's
    three-line error (inconsistent), "sample: error: n_embd" (no shape keys)."""
    for name, source in bad_sources(tmp_path).items():
        line = one_line_error(run_sample("--ckpt", str(source), "--prompt", "x"))
        assert "Traceback" not in line and len(line) < 400, (name, line)
        if name == "config.json inconsistent":
            assert "n_embd = 33" in line and "n_head" in line


def test_cli_errors_are_one_line(tmp_path):
    r = run_sample("--ckpt", str(tmp_path / "nope"), "--prompt", "x")
    assert r.returncode == 2
    assert r.stderr.startswith("sample: error: ") and r.stderr.count("\n") == 1, r.stderr
    r = run_sample("--ckpt", "x", "--top-p", "1.5")
    assert r.returncode == 2 and r.stderr.startswith("sample: error: ") and r.stderr.count("\n") == 1


def test_cli_on_a_distgpt_checkpoint(tiny, tmp_path):
    """An out_dir from training: the model config and the tokenizer come from its manifest."""
    folder, _, model = tiny
    n = model.layout.size
    meta = {"config": Config(model=model.cfg).to_dict(), "tokenizer": "bytes"}
    zeros = np.zeros(n, np.float32)
    checkpoint.save_checkpoint(tmp_path, 5, Comm(), model.layout, Partition(n, 1, 0), model.params, zeros,
                               zeros, meta, 2)
    r = run_sample("--ckpt", str(tmp_path), "--prompt", "Hi", "--max-new-tokens", "20", "--greedy")
    assert r.returncode == 0, r.stderr
    hf_run = run_sample(
        "--ckpt", str(folder), "--tokenizer", "bytes", "--prompt", "Hi", "--max-new-tokens", "20", "--greedy"
    )
    assert r.stdout == hf_run.stdout
    export = run_cli("export", "--ckpt", str(tmp_path), "--format", "hf", "--out", str(tmp_path / "hf"),
                     timeout=120)
    assert export.returncode == 0, export.stderr
    cfg, params = load_init(str(tmp_path / "hf"))
    assert cfg == model.cfg and np.array_equal(params, model.params)
