"""LoRA (Hu et al. 2021): low-rank adapters on a frozen GPT-2, laid out as peft lays them out.

A target is one of a block's four matmuls, named as Hugging Face names the module and as peft's
`target_modules` takes it (TARGETS). For a target with weight W (in, out) (distgpt's and Conv1D's
orientation) the adapter is a pair
    A (r, in)   peft's lora_A.weight (an nn.Linear(in, r): (out_features, in_features))
    B (out, r)  peft's lora_B.weight (an nn.Linear(r, out))
and the layer computes  x @ W + b + scale * (x @ A.T) @ B.T,  scale = alpha / r. peft wraps GPT-2's
Conv1D with fan_in_fan_out=True, which only transposes the merged delta: B @ A is (out, in), so the
(in, out) weight becomes W + scale * (B @ A).T (LoraLayout.merged). A and B are stored in peft's own
orientation, so an export to peft and an import from it are copies.

Every adapter of every layer lives in ONE flat vector, as the model's parameters do (model.Layout):
it is what a LoRA run trains, sums, shards (ZeRO-1), clips, steps with AdamW and checkpoints. Its
order is [block 0 ... block L-1], in each block the targets in TARGETS order, A before B, so a
block's adapters are one contiguous range (layer_ranges: the reducer can send a block's gradient
as soon as its backward is done, as it does for the full model).

Initialisation as peft 0.21.2's LoraLayer.reset_lora_parameters with init_lora_weights=True:
A ~ kaiming_uniform(a=sqrt(5)) on a (r, in) weight, that is U(-1/sqrt(in), 1/sqrt(in)); B = 0, so
a fresh adapter leaves the model's function unchanged.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from distgpt.model import BLOCK_FIELDS, MATMUL_WEIGHTS, Entry, Layout, ModelConfig

__all__ = ["TARGETS", "DEFAULT_TARGETS", "LoraLayout", "BlockAdapters", "peft_key"]

# Hugging Face module name -> the BlockParams field of its weight (shape (in, out) from C)
TARGETS: dict[str, str] = {f.metadata["name"].removesuffix(".weight"): f.name
                           for f in BLOCK_FIELDS if f.name in MATMUL_WEIGHTS}
DEFAULT_TARGETS: tuple[str, ...] = tuple(TARGETS)
_SHAPES = {f.name: f.metadata["shape"] for f in BLOCK_FIELDS}
PEFT_PREFIX = "base_model.model.transformer."


def peft_key(name: str) -> str:
    """A LoraLayout entry name -> its key in peft's adapter_model.safetensors for GPT2LMHeadModel
    (get_peft_model_state_dict drops the adapter's name, 'default', from the module's key)."""
    return PEFT_PREFIX + name


def check_targets(targets: Sequence[str]) -> tuple[str, ...]:
    """The targets in canonical (TARGETS) order, each once; an unknown name is a ValueError of
    one line naming it and the closest valid one."""
    if isinstance(targets, str):        # a bare string would be taken for its characters
        targets = [targets]
    if not targets:
        raise ValueError(f"lora.targets is empty: expected some of {', '.join(TARGETS)}")
    for t in targets:
        if t not in TARGETS:
            close = difflib.get_close_matches(str(t), list(TARGETS), n=1, cutoff=0.0)
            raise ValueError(f"lora.targets: unknown target {t!r} (did you mean {close[0]!r}?); "
                             f"expected some of {', '.join(TARGETS)}")
    return tuple(t for t in TARGETS if t in targets)


@dataclass
class BlockAdapters:
    """One block's adapters as the passes take them: {BlockParams weight field: (A, B)} views into
    a flat adapter vector (parameters or gradients), and the scale alpha / r."""

    pairs: dict[str, tuple[np.ndarray, np.ndarray]]
    scale: float

    def get(self, weight: str) -> tuple[np.ndarray, np.ndarray] | None:
        return self.pairs.get(weight)


class LoraLayout:
    """Names, shapes and offsets of every adapter in the flat LoRA vector; the init and the merge.

    rank r >= 1 (rank 0, LoRA off, is no layout: build the model without one), alpha (scale =
    alpha / r, peft's default, not rsLoRA), targets (TARGETS' names), dropout (peft's lora_dropout:
    on each adapter's input, in training passes given a dropout seed: model.LoraDropout). Every
    entry is a 2-D weight and weight-decayed, as torch.optim.AdamW over peft's trainable
    parameters decays them all."""

    def __init__(self, cfg: ModelConfig, rank: int, alpha: float = 16.0,
                 targets: Sequence[str] = DEFAULT_TARGETS, dropout: float = 0.0):
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
            raise ValueError(f"lora.rank = {rank!r}: expected an integer >= 1 (rank 0 is LoRA off)")
        if not math.isfinite(alpha):
            raise ValueError(f"lora.alpha = {alpha!r}: expected a finite number")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"lora.dropout = {dropout!r}: expected 0 <= dropout < 1")
        self.cfg = cfg
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.scale = self.alpha / self.rank
        self.targets = check_targets(targets)
        C, r = cfg.n_embd, self.rank
        entries: list[Entry] = []
        self.layer_ranges: list[tuple[int, int]] = []
        offset = 0
        for layer in range(cfg.n_layer):
            start = offset
            for target in self.targets:
                fan_in, fan_out = _SHAPES[TARGETS[target]](C)
                for name, shape in (("lora_A", (r, fan_in)), ("lora_B", (fan_out, r))):
                    entries.append(Entry(f"h.{layer}.{target}.{name}.weight", shape, offset, True))
                    offset += shape[0] * shape[1]
            self.layer_ranges.append((start, offset))
        self.entries = entries
        self.by_name = {e.name: e for e in entries}
        self.size = offset

    # ------------------------------------------------------------------ views

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """{name: view} of every adapter, names 'h.{layer}.{target}.lora_A.weight' (peft's keys
        without 'base_model.model.transformer.': peft_key)."""
        if flat.shape != (self.size,):
            raise ValueError(f"LoRA buffer of shape {flat.shape}, the LoRA layout has ({self.size},)")
        return {e.name: flat[e.offset : e.offset + e.size].reshape(e.shape) for e in self.entries}

    def blocks(self, flat: np.ndarray) -> list[BlockAdapters]:
        """The same views per block, keyed by the BlockParams field they adapt: what the passes take."""
        v = self.views(flat)

        def pair(layer: int, t: str) -> tuple[np.ndarray, np.ndarray]:
            return v[f"h.{layer}.{t}.lora_A.weight"], v[f"h.{layer}.{t}.lora_B.weight"]
        return [BlockAdapters({TARGETS[t]: pair(layer, t) for t in self.targets}, self.scale)
                for layer in range(self.cfg.n_layer)]

    def decay_segments(self, start: int = 0, end: int | None = None) -> list[tuple[int, int, bool]]:
        """[(lo, hi, decayed)] over [start, end), relative to start (optim.AdamW's argument):
        every adapter is decayed, so one run."""
        end = self.size if end is None else end
        return [(0, end - start, True)] if end > start else []

    def describe(self) -> list[dict]:
        return [{"name": e.name, "shape": list(e.shape), "offset": e.offset} for e in self.entries]

    def config(self) -> dict:
        """What identifies this layout (a checkpoint records it; a resume compares it)."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "targets": list(self.targets)}

    # ------------------------------------------------------------------ init, merge

    def init(self, flat: np.ndarray, seed: int) -> None:
        """peft's init (the module docstring): A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0. The draws are
        NumPy's, from `seed` (not torch's stream: the distribution is peft's, the numbers are not)."""
        rng = np.random.default_rng(seed)
        v = self.views(flat)
        for e in self.entries:
            if ".lora_A." in e.name:
                # kaiming_uniform_(a=sqrt(5)): gain sqrt(2 / (1 + 5)), bound sqrt(3) gain / sqrt(fan_in)
                bound = math.sqrt(3.0) * math.sqrt(2.0 / 6.0) / math.sqrt(e.shape[1])
                v[e.name][...] = rng.uniform(-bound, bound, e.shape)
            else:
                v[e.name][...] = 0.0

    def merged(self, base: np.ndarray, flat: np.ndarray) -> np.ndarray:
        """A new flat parameter vector: merge_into on a copy of the base (which is not changed)."""
        out = base.copy()
        self.merge_into(out, flat)
        return out

    def merge_into(self, params: np.ndarray, flat: np.ndarray) -> None:
        """In place, in the base's model.Layout: every adapted weight W (in, out) of `params` becomes
        W + scale * (B @ A).T, computed as peft merges (B @ A in the adapters' dtype, transposed,
        scaled, added)."""
        layout = Layout(self.cfg)
        if params.shape != (layout.size,):
            raise ValueError(f"base parameters of shape {params.shape}, the model's layout has "
                             f"({layout.size},)")
        w = layout.views(params)
        v = self.views(flat)
        for layer in range(self.cfg.n_layer):
            for t in self.targets:
                a, b = v[f"h.{layer}.{t}.lora_A.weight"], v[f"h.{layer}.{t}.lora_B.weight"]
                delta = (b @ a).T * np.asarray(self.scale, b.dtype)
                w[f"h.{layer}.{t}.weight"][...] += delta.astype(params.dtype, copy=False)

    # ------------------------------------------------------------------ peft's format

    def to_peft_state_dict(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """{peft key: array} as peft's adapter_model.safetensors holds them (copies)."""
        return {peft_key(n): np.ascontiguousarray(a) for n, a in self.views(flat).items()}

    def from_peft_state_dict(self, state: dict[str, np.ndarray], flat: np.ndarray) -> None:
        """Fill the flat adapter vector from peft's keys (every one this layout has, of its shape)."""
        for name, view in self.views(flat).items():
            key = peft_key(name)
            if key not in state:
                raise KeyError(f"LoRA weights: tensor {key!r} missing")
            src = np.asarray(state[key])
            if src.shape != view.shape:
                raise ValueError(f"LoRA weights: {key} has shape {src.shape}, expected {view.shape}")
            view[...] = src
