"""Activation recompute (train.recompute: block): each block's backward re-runs its forward from the
block's saved input. The re-run is the same arithmetic on the same inputs, so everything must be
bit-identical to recompute=none: the activations it rebuilds, the losses, every gradient. Hence
no tolerances below: any difference at all is a bug (a stale buffer, a missing dropout mask, a
weight copy read at another time)."""

from __future__ import annotations

import numpy as np
import pytest

from distgpt import model as model_module
from distgpt import threads
from distgpt.checkpoint import read_params
from distgpt.config import ConfigError, load_config
from distgpt.model import GPT, ModelConfig, activation_bytes

from conftest import bf16_env, read_metrics, run_cli, tiny_config

# odd sizes (head size 12, vocab padded 203 -> 256), banded attention on odd layers, dropout everywhere
CFG = ModelConfig(n_layer=3, n_head=2, n_embd=24, block_size=16, vocab_size=203,
                  attention="alternating_banded", window=5, dropout=0.2)
B, T = 2, 11


@pytest.fixture
def two_threads():
    """The kernels split their rows over two threads, as a rank on two cores does."""
    previous = threads.n_threads()
    threads.set_threads(2)
    yield
    threads.set_threads(previous)


@pytest.fixture(params=["fp32", "bf16"])
def precision(request) -> str:
    if request.param == "bf16":
        request.getfixturevalue("bf16_here")     # bf16's gemm, emulated where the CPU has none
    return request.param


def build(precision: str, recompute: str, cfg: ModelConfig = CFG, keep: int = 0) -> GPT:
    """A model away from GPT-2's init (gains != 1, biases != 0), the same for every call."""
    m = GPT(cfg, precision=precision, recompute=recompute, recompute_keep=keep)
    rng = np.random.default_rng(7)
    m.params[:] = (0.1 * rng.standard_normal(m.layout.size)).astype(np.float32)
    for e in m.layout.entries:
        if e.name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            m.p[e.name] += 1.0
    m.p["wte"][cfg.vocab_size :] = 0.0
    m.weights_changed()
    return m


def micro_batches(step: int) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Two micro-batches (accumulation) of a step: (tokens, targets, first global row)."""
    rng = np.random.default_rng(100 + step)
    return [(rng.integers(0, CFG.vocab_size, (B, T)), rng.integers(0, CFG.vocab_size, (B, T)), row0)
            for row0 in (0, B)]


class Recorder:
    """The backward hooks a gradient reducer gets: what was reported, in order, with copies."""

    def __init__(self):
        self.events: list = []

    def head_done(self) -> None:
        self.events.append("head")

    def block_done(self, layer: int) -> None:
        self.events.append(layer)

    def token_rows(self, ids: np.ndarray, rows: np.ndarray) -> None:
        self.events.append((ids.copy(), rows.copy()))


def train(m: GPT, steps: int = 2) -> tuple[list[float], list[np.ndarray], list]:
    """`steps` optimizer steps of two micro-batches each (the last backward with hooks, as Trainer
    runs it), a plain SGD update between steps. Returns the losses, each step's gradients and what
    the hooks saw."""
    losses, grads, hooks = [], [], Recorder()
    for step in range(steps):
        m.zero_grad()
        batches = micro_batches(step)
        for i, (x, y, row0) in enumerate(batches):
            fwd = m.forward(x, y, grad_scale=1 / len(batches), dropout_seed=(5, step), row0=row0)
            m.backward(fwd, hooks=hooks if i == len(batches) - 1 else None)
            losses.append(fwd.loss)
        grads.append(m.grads.copy())
        m.params -= 0.05 * m.grads
        m.weights_changed()             # a bf16 model's copy follows: the next step re-runs with new weights
    return losses, grads, hooks.events


def test_block_recompute_gives_bit_identical_losses_and_gradients(precision, two_threads):
    losses, grads, events = train(build(precision, "none"))
    r_losses, r_grads, r_events = train(build(precision, "block"))
    assert r_losses == losses
    for step, (g, ref) in enumerate(zip(r_grads, grads, strict=True)):
        np.testing.assert_array_equal(g, ref, err_msg=f"step {step}")
    # the reducer hears the same things in the same order, and gets the same token rows
    def split(evs: list) -> tuple[list, list]:
        return [e for e in evs if not isinstance(e, tuple)], [e for e in evs if isinstance(e, tuple)]

    (order, tokens), (ref_order, ref_tokens) = split(r_events), split(events)
    assert order == ref_order
    assert len(tokens) == 2                 # one token_rows call per step (the hooked backward)
    for (ids, rows), (ref_ids, ref_rows) in zip(tokens, ref_tokens, strict=True):
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(rows, ref_rows)
    # and the steps really differ from one another (dropout masks, weights): nothing was stale
    assert losses[0] != losses[2] and not np.array_equal(grads[0], grads[1])


def test_block_recompute_is_bit_identical_on_either_fp32_gemm(blas_backend, two_threads):
    """NumPy's BLAS and MKL's (whose kernels may depend on alignment: every activation buffer is
    on a 64-byte boundary, so a re-run into other buffers takes the same path)."""
    losses, grads, _ = train(build("fp32", "none"))
    r_losses, r_grads, _ = train(build("fp32", "block"))
    assert r_losses == losses
    np.testing.assert_array_equal(r_grads, grads)
    m = build("fp32", "block")
    x, y, _ = micro_batches(0)[0]
    m.forward(x, y, grad_scale=1.0)
    a = m._activations(B, T, training=True)
    buffers = [a.x, *a.inputs, *(v for blk in a.blocks for v in vars(blk).values())]
    assert all(buf.ctypes.data % 64 == 0 for buf in buffers)


def test_recomputed_activations_are_the_saved_ones_bit_for_bit(precision, monkeypatch):
    """What each block_backward reads, with and without recompute: the same bits, block by block."""
    seen: dict[str, list[dict[str, np.ndarray]]] = {}
    calls: dict[str, list[str]] = {}
    real_forward, real_backward = model_module.block_forward, model_module.block_backward

    def run(recompute: str) -> None:
        log = calls[recompute] = []
        reads = seen[recompute] = []

        def counting_forward(*args, **kw):
            log.append("forward")
            return real_forward(*args, **kw)

        def recording_backward(dx, w, g, a, *args, **kw):
            log.append("backward")
            reads.append({name: value.copy() for name, value in vars(a).items()})
            return real_backward(dx, w, g, a, *args, **kw)

        monkeypatch.setattr(model_module, "block_forward", counting_forward)
        monkeypatch.setattr(model_module, "block_backward", recording_backward)
        m = build(precision, recompute)
        x, y, row0 = micro_batches(0)[0]
        m.zero_grad()
        m.backward(m.forward(x, y, grad_scale=1.0, dropout_seed=(5, 0), row0=row0))

    run("none")
    run("block")
    L = CFG.n_layer
    assert calls["none"] == ["forward"] * L + ["backward"] * L
    # the last block's activations are still in the shared set after the forward: no re-run
    assert calls["block"] == ["forward"] * L + ["backward"] + ["forward", "backward"] * (L - 1)
    for layer, (got, ref) in enumerate(zip(seen["block"], seen["none"], strict=True)):
        assert got.keys() == ref.keys()
        for name in ref:
            assert got[name].dtype == ref[name].dtype
            np.testing.assert_array_equal(got[name], ref[name], err_msg=f"block {L - 1 - layer} {name}")


def test_block_recompute_keeps_one_blocks_state_and_the_block_inputs():
    m = build("fp32", "block")
    x, y, _ = micro_batches(0)[0]
    m.forward(x, y, grad_scale=1.0)
    a = m._activations(B, T, training=True)
    assert len(a.blocks) == 1 and len(a.inputs) == CFG.n_layer - 1
    assert all(buf.shape == (B * T, CFG.n_embd) for buf in a.inputs)
    # GPT-2 small's shapes, T 1024, B 4: the saved state of 12 blocks becomes one block's and 11
    # inputs (12 and 1 of 12 C-wide floats per position; the scratch and the head's chunk stay)
    gpt2 = ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257)
    for precision in ("fp32", "bf16"):
        full, block = (activation_bytes(gpt2, 4, 1024, precision=precision, recompute=r)
                       for r in ("none", "block"))
        assert block < 0.45 * full, precision


def test_inference_and_eval_are_unchanged_by_recompute():
    """Recompute concerns a training pass only: eval losses and logits are the same passes."""
    none, block = build("fp32", "none"), build("fp32", "block")
    x, y, _ = micro_batches(1)[0]
    assert block.loss(x, y) == none.loss(x, y)
    np.testing.assert_array_equal(block.logits(x), none.logits(x))


def test_an_unknown_recompute_mode_is_one_line_naming_the_key():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.recompute=selective"])
    assert str(err.value) == "train.recompute = 'selective': expected none or block"
    assert load_config(None, []).train.recompute == "none"
    with pytest.raises(ValueError, match="recompute 'full': expected one of none, block"):
        GPT(CFG, recompute="full")


def test_train_refuses_a_bad_recompute_value_with_exit_2(tmp_path, shakespeare_bytes):
    cfg = tiny_config(tmp_path, shakespeare_bytes)
    r = run_cli("train", "--config", str(cfg), "train.recompute=blocks", timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].endswith("train.recompute = 'blocks': expected none or block")


def _cli_run(tmp_path, data_dir, recompute: str, precision: str, env: dict[str, str]):
    tmp_path.mkdir()
    cfg = tiny_config(tmp_path, data_dir,
                      model={"dropout": 0.1, "attention": "alternating_banded", "window": 8},
                      # 2 ranks x 2 sequences: 3 micro-batches accumulate per step
                      train={"micro_batch_size": 2, "max_steps": 4, "eval_every": 2, "precision": precision,
                             "recompute": recompute},
                      parallel={"check_every": 1})
    r = run_cli("train", "--config", str(cfg), ranks=2, timeout=180, env=env)
    assert r.returncode == 0, r.stderr
    rows = read_metrics(tmp_path / "out")
    _, params = read_params(tmp_path / "out")
    keep = ("step", "train_loss", "grad_norm", "lr", "val_loss")
    return [{k: row[k] for k in keep if k in row} for row in rows], params


@pytest.mark.mpi
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_two_ranks_with_block_recompute_train_bit_identically(tmp_path, shakespeare_bytes, precision):
    env = bf16_env() if precision == "bf16" else {}
    metrics, params = _cli_run(tmp_path / "none", shakespeare_bytes, "none", precision, env)
    r_metrics, r_params = _cli_run(tmp_path / "block", shakespeare_bytes, "block", precision, env)
    assert sum("train_loss" in row for row in metrics) == 4 and any("val_loss" in row for row in metrics)
    assert r_metrics == metrics
    np.testing.assert_array_equal(r_params, params)


def test_the_run_header_counts_recompute_activations():
    from distgpt.train import summary

    cfg = load_config(None, ["train.recompute=block"])
    line = summary(cfg, 1, 1)[-1]
    t = cfg.train
    mib = activation_bytes(cfg.model, t.micro_batch_size, t.seq_len, recompute="block") / 2**20
    assert f"activations {mib:,.0f} MiB (recompute block)" in line


def test_the_trainer_builds_its_model_with_the_configured_recompute(tmp_path):
    """The CLI comparison above would pass with both runs in `none` if the trainer dropped the key."""
    from distgpt import dist
    from distgpt.trainer import Trainer, initial_params

    for mode in ("none", "block"):
        cfg = load_config(None, ["model.n_layer=2", "model.n_embd=32", "model.n_head=2",
                                 "model.vocab_size=257", "model.block_size=32", "train.seq_len=32",
                                 "train.precision=fp32", f"train.recompute={mode}"])
        cfg, params = initial_params(cfg)
        assert Trainer(cfg, dist.Comm(), params).model.recompute == mode


@pytest.mark.parametrize("keep", [1, 2, 99])
def test_keeping_the_last_blocks_re_runs_only_the_others_bit_identically(precision, keep, monkeypatch,
                                                                         two_threads):
    """train.recompute_keep k: the last k blocks keep their activations, so only blocks 0 .. L-2-k
    are re-run (k >= L - 1 re-runs none), and losses and gradients stay those of recompute=none."""
    calls: list[str] = []
    real_forward = model_module.block_forward

    def counting_forward(*args, **kw):
        calls.append("rerun" if kw.get("state_only") else "forward")
        return real_forward(*args, **kw)

    L = CFG.n_layer
    k = min(keep, L - 1)
    m = build(precision, "block", keep=keep)
    monkeypatch.setattr(model_module, "block_forward", counting_forward)
    x, y, row0 = micro_batches(0)[0]
    m.zero_grad()
    m.backward(m.forward(x, y, grad_scale=1.0, dropout_seed=(5, 0), row0=row0))
    assert calls == ["forward"] * L + ["rerun"] * (L - 1 - k)
    a = m._activations(B, T, training=True)
    assert len(a.blocks) == 1 + k and len(a.inputs) == L - 1 - k
    assert activation_bytes(CFG, B, T, precision=precision, recompute="block", recompute_keep=keep) == (
        activation_bytes(CFG, B, T, precision=precision, recompute="block")
        + k * (activation_bytes(CFG, B, T, precision=precision, recompute="none")
               - activation_bytes(CFG, B, T, precision=precision, recompute="block")) // (L - 1))
    monkeypatch.undo()
    losses, grads, events = train(build(precision, "none"))
    k_losses, k_grads, k_events = train(build(precision, "block", keep=keep))
    assert k_losses == losses and k_events[:1] == events[:1]
    np.testing.assert_array_equal(k_grads, grads)
