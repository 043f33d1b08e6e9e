"""GPT-2 in NumPy: the flat parameter layout, the block forward/backward pair, the KV cache.

Every parameter lives in one flat vector and each named tensor is a view into it (llm.c's
ParameterTensors). The gradient buffer has the same layout, so one reduction covers all gradients,
the optimizer runs one vectorised update over a slice, and a checkpoint shard is a byte range.

The layout order is [wte, wpe, block 0 ... block L-1, ln_f]. Blocks are contiguous so that the
backward pass, which finishes them last-to-first, can hand each finished block's gradient slice
to the communicator while it works on the next one.

Shapes in comments: B sequences, T positions, C = n_embd, nh heads of hs = C / nh, V vocabulary.

precision="bf16" (distgpt/bf16.py): the matmul weights also have bf16 copies (a bf16.Bf16Weights:
uint16 bits in the same layout), remade once after each optimizer step by their owner, never by the
model, which only reads them; the linears and the head multiply with them, attention multiplies
bf16 q/k/v, everything else reads the float32 parameters. The precision is chosen once, at
construction: it picks the kernel table (ops.Fp32Kernels or ops.Bf16Kernels) the passes call.

recompute="block" (train.recompute): what block_forward keeps for block_backward is the block's
input alone, the residual stream entering it; block_backward first re-runs that block's forward
into one shared set of block activations (up to the GELU's input: the rest of the block is not
part of that state). The re-run is the same arithmetic on the same inputs
(the weights, the bf16 copy and the dropout masks do not change between a forward and its
backward), so it reproduces the saved activations bit for bit: losses and gradients are those of
recompute="none". In fp32 a block's saved state is 12 (B*T, C) floats, its input one: the
blocks keep 12 + (L - 1) of them instead of 12 L, for 2/3 of the matmuls of another forward of
L - 1 blocks (GPT-2 small, T 1024, B 1, 2 cores of a Zen 4: ~1.17x the step time, fp32 and bf16).
There is no "selective" mode (keep the matmul outputs, recompute the cheap layers): recompute="none"
already keeps neither attention's probabilities nor the GELU's output, so what is left to drop is
the LayerNorms' outputs, 4 of a block's 36 bytes per row and width in bf16 (8 of 48 in fp32).

lora (distgpt/lora.py): low-rank adapters on a frozen base. Each adapted linear adds
scale * (x @ A.T) @ B.T to its output (in the model's matmul precision: a bf16 model rounds x, A,
B and the products between, as autocast does for peft's adapters); the adapters are one
flat vector of their own with its own gradient buffer, and the base has none: backward computes
the input gradients through the frozen layers and the adapters' gradients, nothing else.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from distgpt import bf16, ops
from distgpt.config import RECOMPUTE_MODES, ModelConfig

if TYPE_CHECKING:                   # lora.py builds on this module's Layout
    from distgpt.lora import BlockAdapters, LoraLayout

__all__ = ["GPT", "Layout", "ModelConfig", "KVCache", "init_params", "activation_bytes", "dropout_mask_bytes",
           "workspace_bytes"]


# ----------------------------------------------------------------------------- the parameter table

def _param(name: str, shape: Callable[[int], tuple[int, ...]], decay: bool):
    """A block tensor: its Hugging Face name (without 'h.{layer}.'), shape from C, weight-decayed or not."""
    return field(metadata={"name": name, "shape": shape, "decay": decay})


@dataclass
class BlockParams:
    """One transformer block's tensors: views into a flat buffer, in layout order. The one table of
    block tensors: Layout, the weights formats and the model all read it from these fields.
    Matmul weights are (in, out), as Hugging Face's Conv1D stores them; only they are decayed."""

    ln1_w: np.ndarray = _param("ln_1.weight", lambda c: (c,), False)
    ln1_b: np.ndarray = _param("ln_1.bias", lambda c: (c,), False)
    qkv_w: np.ndarray = _param("attn.c_attn.weight", lambda c: (c, 3 * c), True)
    qkv_b: np.ndarray = _param("attn.c_attn.bias", lambda c: (3 * c,), False)
    attn_proj_w: np.ndarray = _param("attn.c_proj.weight", lambda c: (c, c), True)
    attn_proj_b: np.ndarray = _param("attn.c_proj.bias", lambda c: (c,), False)
    ln2_w: np.ndarray = _param("ln_2.weight", lambda c: (c,), False)
    ln2_b: np.ndarray = _param("ln_2.bias", lambda c: (c,), False)
    fc_w: np.ndarray = _param("mlp.c_fc.weight", lambda c: (c, 4 * c), True)
    fc_b: np.ndarray = _param("mlp.c_fc.bias", lambda c: (4 * c,), False)
    mlp_proj_w: np.ndarray = _param("mlp.c_proj.weight", lambda c: (4 * c, c), True)
    mlp_proj_b: np.ndarray = _param("mlp.c_proj.bias", lambda c: (c,), False)


BLOCK_FIELDS = dataclasses.fields(BlockParams)
MATMUL_WEIGHTS = ("qkv_w", "attn_proj_w", "fc_w", "mlp_proj_w")    # the ones bf16 copies are made of
BLOCK_PARAMS = tuple((f.metadata["name"], f.metadata["shape"], f.metadata["decay"]) for f in BLOCK_FIELDS)
# a frozen block's "gradients" (LoRA's base): the kernels take None as no gradient wanted
FROZEN_BLOCK = BlockParams(**{f.name: None for f in BLOCK_FIELDS})


@dataclass
class ParameterTensors:
    """All of the model's tensors as views into one flat buffer (parameters or gradients)."""

    wte: np.ndarray                 # (padded V, C), tied with the output head
    wpe: np.ndarray                 # (block_size, C)
    blocks: list[BlockParams]
    lnf_w: np.ndarray               # (C,)
    lnf_b: np.ndarray               # (C,)


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    offset: int
    decay: bool

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class Layout:
    """Names, shapes and offsets of every parameter in the flat vector."""

    def __init__(self, cfg: ModelConfig):
        C = cfg.n_embd
        entries: list[Entry] = []
        offset = 0

        def add(name: str, shape: tuple[int, ...], decay: bool) -> None:
            nonlocal offset
            entries.append(Entry(name, shape, offset, decay))
            offset += math.prod(shape)

        add("wte", (cfg.padded_vocab, C), True)
        add("wpe", (cfg.block_size, C), True)
        self.layer_ranges: list[tuple[int, int]] = []
        for layer in range(cfg.n_layer):
            start = offset
            for name, shape, decay in BLOCK_PARAMS:
                add(f"h.{layer}.{name}", shape(C), decay)
            self.layer_ranges.append((start, offset))
        add("ln_f.weight", (C,), False)
        add("ln_f.bias", (C,), False)
        self.entries = entries
        self.by_name = {e.name: e for e in entries}
        self.size = offset
        self.cfg = cfg

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """{name: view} of every tensor (the names of Hugging Face's GPT-2 without 'transformer.')."""
        if flat.shape != (self.size,):
            raise ValueError(f"flat buffer of shape {flat.shape}, the layout has ({self.size},)")
        return {e.name: flat[e.offset : e.offset + e.size].reshape(e.shape) for e in self.entries}

    def tensors(self, flat: np.ndarray) -> ParameterTensors:
        """The same views, typed: what the forward and backward passes index."""
        return self.typed(self.views(flat))

    def typed(self, v: dict[str, np.ndarray | None]) -> ParameterTensors:
        """{name: tensor} (views(), or other arrays by the same names), typed."""
        blocks = [BlockParams(**{f.name: v[f"h.{layer}.{f.metadata['name']}"] for f in BLOCK_FIELDS})
                  for layer in range(self.cfg.n_layer)]
        return ParameterTensors(v["wte"], v["wpe"], blocks, v["ln_f.weight"], v["ln_f.bias"])

    def decay_segments(self, start: int = 0, end: int | None = None) -> list[tuple[int, int, bool]]:
        """[(lo, hi, decayed)] runs covering [start, end), relative to start, merging neighbours
        with the same flag: weight decay applies to 2-D weights (matmuls, embeddings) only."""
        end = self.size if end is None else end
        runs: list[tuple[int, int, bool]] = []
        for e in self.entries:
            lo, hi = max(e.offset, start) - start, min(e.offset + e.size, end) - start
            if lo >= hi:
                continue
            if runs and runs[-1][2] == e.decay and runs[-1][1] == lo:
                runs[-1] = (runs[-1][0], hi, e.decay)
            else:
                runs.append((lo, hi, e.decay))
        return runs

    def describe(self) -> list[dict]:
        return [{"name": e.name, "shape": list(e.shape), "offset": e.offset} for e in self.entries]

    def matmul_weight_ranges(self) -> list[tuple[int, int]]:
        """Flat [start, end) of every weight a bf16 model keeps a bf16 copy of: wte's vocabulary
        rows (not its padding) and each block's four matmul weights."""
        wte = self.by_name["wte"]
        matmul = {f.metadata["name"] for f in BLOCK_FIELDS if f.name in MATMUL_WEIGHTS}
        blocks = [e for e in self.entries if e.name.startswith("h.") and e.name.split(".", 2)[2] in matmul]
        return [(wte.offset, wte.offset + self.cfg.vocab_size * self.cfg.n_embd)] + [
            (e.offset, e.offset + e.size) for e in blocks]

    def float32_small_size(self) -> int:
        """Values outside wte and the blocks' matmul weights (LayerNorms, biases, wpe): what a base
        held in bf16 keeps as float32 copies (GPT._widened_small)."""
        matmul = sum(b - a for a, b in self.matmul_weight_ranges())    # (wte's vocabulary rows among them)
        return self.size - matmul - (self.cfg.padded_vocab - self.cfg.vocab_size) * self.cfg.n_embd

    def n_params(self, count_padding: bool = False) -> int:
        pad = 0 if count_padding else (self.cfg.padded_vocab - self.cfg.vocab_size) * self.cfg.n_embd
        return self.size - pad


def init_params(layout: Layout, params: np.ndarray, seed: int) -> None:
    """GPT-2 initialisation: N(0, 0.02) weights, residual projections scaled by 1/sqrt(2 L),
    zero biases, unit LayerNorm gains; padded vocabulary rows zero."""
    cfg = layout.cfg
    rng = np.random.default_rng(seed)
    p = layout.views(params)
    params[:] = 0.0
    for e in layout.entries:
        leaf = e.name.rsplit(".", 1)[-1]
        if e.name.endswith("ln_1.weight") or e.name.endswith("ln_2.weight") or e.name == "ln_f.weight":
            p[e.name][...] = 1.0
        elif leaf == "bias":
            continue
        else:
            std = 0.02
            if e.name.endswith("c_proj.weight"):
                std = 0.02 / math.sqrt(2 * cfg.n_layer)
            p[e.name][...] = rng.standard_normal(e.shape, dtype=np.float64) * std
    p["wte"][cfg.vocab_size :] = 0.0


# ----------------------------------------------------------------------------- activations, dropout

@dataclass
class BlockActs:
    """What block_backward needs from block_forward, for one block (views into Activations)."""

    ln1_xhat: np.ndarray            # (BT, C) normalised input of ln_1
    ln1_out: np.ndarray             # (BT, C)                      bf16 bits in a bf16 model
    ln1_rstd: np.ndarray            # (BT,)
    qkv: np.ndarray                 # (BT, 3C)                     bf16 bits in a bf16 model
    lse: np.ndarray                 # (B, nh, T) attention's log-normalisers: backward recomputes the rest
    attn_y: np.ndarray              # (BT, C) attention output, before c_proj; bf16 bits in a bf16 model
    ln2_xhat: np.ndarray            # (BT, C)
    ln2_out: np.ndarray             # (BT, C)                      bf16 bits in a bf16 model
    ln2_rstd: np.ndarray            # (BT,)
    fc_pre: np.ndarray              # (BT, 4C) input of the GELU (its output is recomputed in backward)


class Scratch:
    """Buffers every block reuses, each with one meaning:
    branch      (BT, C)   a residual branch's output before it is added (forward), or the gradient
                          reaching that branch after dropout (backward)
    hidden      (BT, 4C)  the MLP's GELU output, then the gradient flowing back through it
    gelu_slope  (BT, 4C)  GELU's derivative at fc_pre (backward)
    d_in        (BT, C)   the gradient on its way from a sub-layer's output to the block's input
    d_qkv       (BT, 3C)  the gradient of the attention's q, k and v (backward)"""

    def __init__(self, BT: int, C: int, dtype: np.dtype, backward: bool):
        self.branch = np.empty((BT, C), dtype)
        self.hidden = np.empty((BT, 4 * C), dtype)
        self.gelu_slope = np.empty((BT, 4 * C), dtype) if backward else None
        self.d_in = np.empty((BT, C), dtype) if backward else None
        self.d_qkv = np.empty((BT, 3 * C), dtype) if backward else None


class LoraDropout:
    """Inverted dropout on the adapters' inputs (peft's lora_dropout: B(A(dropout(x)))), a keep mask
    per block, adapted weight and global row, drawn from (seed..., row, layer, weight) when asked
    for: the same masks whatever the micro-batching or the ranks, as Dropout's, and none kept
    (backward, and recompute's re-run, draw them again: a block's masks are 7 (B*T, C) bools, which
    kept for every block would outweigh the block inputs recompute keeps)."""

    TAG = 0x4C6F5241                  # its own streams, apart from Dropout's (seed..., row)

    def __init__(self, p: float, B: int, T: int, seed: tuple[int, ...], row0: int):
        self.p, self.B, self.T, self.seed, self.row0 = p, B, T, tuple(seed), row0
        self.scale = 1.0 / (1.0 - p)

    def keep(self, layer: int, weight: str, width: int) -> np.ndarray:
        """(B*T, width) bools: True where the adapter of `weight` in block `layer` sees its input."""
        slot = MATMUL_WEIGHTS.index(weight)     # fixed per weight: other targets do not shift it
        out = np.empty((self.B, self.T, width), bool)
        for b in range(self.B):
            rng = np.random.default_rng([*self.seed, self.row0 + b, layer, slot, self.TAG])
            out[b] = rng.random((self.T, width), dtype=np.float32) >= self.p
        return out.reshape(self.B * self.T, width)


class LoraScratch:
    """The adapters' buffers (distgpt/lora.py), reused by every target of every block:
    u, du   (BT, r)   scale * x @ A.T, and the gradient reaching it (backward), float32
    xd      (BT, 4C)  with LoRA dropout: an adapter's input after dropout, then (backward) the
                      part of the input's gradient that goes through the adapter (None without)
    drop    the pass's LoraDropout, or None (no dropout: p = 0, evaluation, inference)
    A bf16 model's adapters multiply bf16 operands (ops.lora_forward), and add:
    u16, du16 (BT, r)   u's and du's roundings
    x16     (BT, 4C)  the rounding of an input not stored as bf16 (the GELU's output, a dropped input)
    d16     (BT, 4C)  the rounding of the output's gradient (backward)"""

    def __init__(self, BT: int, C: int, rank: int, dtype: np.dtype, precision: str, dropout: bool = False):
        self.u = _aligned((BT, rank), dtype)
        self.du = _aligned((BT, rank), dtype)
        self.xd = _aligned((BT * 4 * C,), dtype) if dropout else None
        self.drop: LoraDropout | None = None
        low = precision == "bf16"
        self.u16 = _aligned((BT, rank), np.uint16) if low else None
        self.du16 = _aligned((BT, rank), np.uint16) if low else None
        self.x16 = _aligned((BT * 4 * C,), np.uint16) if low else None
        self.d16 = _aligned((BT * 4 * C,), np.uint16) if low else None

    def input(self, x: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
        """x (a linear's input: float32, or bf16 bits as a bf16 model stores it) as its adapter's
        matmuls take it, after dropout where `keep` is given (x * keep * scale, made in xd): float32
        in an fp32 model; in a bf16 one bf16 bits, x itself where it is stored so, else rounded."""
        if keep is not None:
            xd = self.work(x.shape)
            if x.dtype == np.uint16:
                bf16.to_float32(x, xd, parallel=True)
                xd *= keep
            else:
                np.multiply(x, keep, out=xd)
            xd *= self.drop.scale
            x = xd
        if self.x16 is None or x.dtype == np.uint16:
            return x
        return bf16.to_bf16(x, self._piece(self.x16, x.shape), parallel=True)

    def grad(self, dout: np.ndarray) -> np.ndarray:
        """An adapted linear's output gradient as its adapter's matmuls take it (rounded in bf16)."""
        if self.d16 is None:
            return dout
        return bf16.to_bf16(dout, self._piece(self.d16, dout.shape), parallel=True)

    def work(self, shape: tuple[int, int]) -> np.ndarray:
        """A contiguous (rows, width) float32 piece of xd."""
        return self._piece(self.xd, shape)

    @staticmethod
    def _piece(buf: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        return buf[: shape[0] * shape[1]].reshape(shape)


def saved_state(recompute: str, n_layer: int, keep: int = 0) -> tuple[int, int]:
    """(sets of block activations, block inputs) a training pass keeps for its backward.
    none: every block's activations. block: one shared set, which the forward leaves holding the
    last block's (so its backward re-runs nothing) and each earlier block's backward re-fills from
    that block's saved input: the inputs of every block but the last. keep k (train.recompute_keep):
    the last k blocks have sets of their own besides, so the shared set's last user is block
    L - 1 - k and only blocks 0 .. L - 2 - k keep inputs and are re-run (k >= L - 1: as none)."""
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute {recompute!r}: expected one of {', '.join(RECOMPUTE_MODES)}")
    if keep < 0:
        raise ValueError(f"recompute keep {keep}: expected >= 0")
    if recompute == "none":
        return n_layer, 0
    k = min(keep, n_layer - 1)
    return 1 + k, n_layer - 1 - k


def _aligned(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """np.empty on a 64-byte boundary. A block's forward re-run under recompute writes other
    buffers than the saved pass did; with each one aligned alike, a gemm whose kernels depend on
    the alignment (MKL's, without its CNR mode) takes the same path, and sums in the same order."""
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    raw = np.empty(n + 64, np.uint8)
    skip = -raw.ctypes.data % 64
    return raw[skip : skip + n].view(dtype).reshape(shape)


class Activations:
    """Every buffer of a forward (and backward) pass for one (B, T), allocated once and reused.
    Training keeps each block's activations (`saved_blocks` = L), or under recompute one set and
    the input of each block but the last (`saved_inputs` = L - 1: saved_state); inference reuses
    one set.
    A bf16 model (`precision`) stores the activations that only feed matmuls as bf16 bits (the ln_1
    and ln_2 outputs, q/k/v, the attention output), the rounding those matmuls take anyway: half
    their memory, and no rounding per call. The GELU input stays float32, as GELU computes in
    float32 (rounding it too, as autocast does, made runs 10-30x more sensitive to how the batch is
    split over ranks: see benchmarks/README.md)."""

    def __init__(self, cfg: ModelConfig, B: int, T: int, dtype: np.dtype, head_chunk_rows: int,
                 saved_blocks: int, backward: bool, precision: str = "fp32", saved_inputs: int = 0,
                 lora_rank: int = 0, lora_dropout: bool = False):
        C, nh, BT = cfg.n_embd, cfg.n_head, B * T
        z = lambda *s: _aligned(s, dtype)  # noqa: E731
        m = (lambda *s: _aligned(s, np.uint16)) if precision == "bf16" else z  # noqa: E731
        self.B, self.T, self.n_layer = B, T, cfg.n_layer
        self.x = z(BT, C)                                   # the residual stream (backward: its gradient)
        # one allocation per block and buffer (each on a 64-byte boundary, see _aligned)
        self.blocks = [BlockActs(z(BT, C), m(BT, C), z(BT), m(BT, 3 * C), z(B, nh, T), m(BT, C),
                                 z(BT, C), m(BT, C), z(BT), z(BT, 4 * C)) for _ in range(saved_blocks)]
        # recompute: the residual stream entering block i (a re-run of the block overwrites it)
        self.inputs = [z(BT, C) for _ in range(saved_inputs)]
        self.lnf_xhat, self.lnf_out, self.lnf_rstd = z(BT, C), z(BT, C), z(BT)
        self.dlnf_out = z(BT, C) if backward else None
        self.scratch = Scratch(BT, C, dtype, backward)
        # one chunk of the head's logits (a fresh 100 MB array every step would be page-faulted in)
        self.logits = z(min(BT, head_chunk_rows), cfg.vocab_size)
        self.lora = LoraScratch(BT, C, lora_rank, dtype, precision, lora_dropout) if lora_rank else None
        self.owner: object = None                           # the TrainingForward whose activations these are

    def block(self, layer: int) -> BlockActs:
        # the last len(blocks) - 1 blocks have sets of their own; every earlier one shares set 0
        return self.blocks[max(0, layer - (self.n_layer - len(self.blocks)))]


def dropout_mask_bytes(cfg: ModelConfig, B: int, T: int) -> int:
    """Bytes of the keep masks a training forward draws with dropout on (Dropout.draw: one bool per
    embedding, attention probability and residual element of every layer), held until its backward;
    0 without dropout. Recompute does not shrink them: a re-run must reuse the same masks."""
    if cfg.dropout == 0.0:
        return 0
    C, L, nh = cfg.n_embd, cfg.n_layer, cfg.n_head
    return B * T * C + L * B * nh * T * T + 2 * L * B * T * C


def activation_bytes(cfg: ModelConfig, B: int, T: int, head_chunk_rows: int = 512, itemsize: int = 4,
                     precision: str = "fp32", recompute: str = "none", lora_rank: int = 0,
                     lora_dropout: bool = False, recompute_keep: int = 0) -> int:
    """Bytes of the training buffers Activations allocates for a (B, T) micro-batch, plus the head's
    chunk; a bf16 model stores 6 of each block's 12 BT x C floats in bf16. Under recompute="block"
    one block's set and L - 1 block inputs (BT x C each) instead of L sets (recompute_keep k:
    1 + k sets and L - 1 - k inputs). lora_rank r > 0: the adapters' scratch (LoraScratch:
    2 BT x r, in bf16 also 2 BT x r and 2 BT x 4C bf16, with lora_dropout (p > 0) a BT x 4C; a
    pass's masks are drawn one adapter at a time, and not counted)."""
    low = precision == "bf16"
    C, BT = cfg.n_embd, B * T
    sets, inputs = saved_state(recompute, cfg.n_layer, recompute_keep)
    stored = 6 * BT * C + (6 * BT * C * 2 // itemsize if low else 6 * BT * C)
    per_layer = stored + 2 * BT + B * cfg.n_head * T
    scratch = 17 * BT * C + BT
    head = min(BT, head_chunk_rows) * cfg.vocab_size
    lora = 0
    if lora_rank:
        dropped = 4 * BT * C if lora_dropout else 0
        lora = itemsize * (2 * BT * lora_rank + dropped)
        if low:                         # u16, du16 (BT, r) and x16, d16 (BT, 4C): bf16 bits
            lora += 2 * (2 * BT * lora_rank + 2 * BT * 4 * C)
    return itemsize * (sets * per_layer + inputs * BT * C + scratch + head) + lora


def workspace_bytes(cfg: ModelConfig, B: int, T: int, precision: str = "fp32",
                    head_chunk_rows: int = 512) -> int:
    """Bytes of a bf16 model's kernel workspace (ops.Bf16Kernels' bf16.Workspace) at its largest:
    a linear's input and output gradient rounded to bf16, at most B*T x 4C each (the MLP's), the
    head's input (B*T x C) and one chunk of the logits' gradient. 0 in fp32, which rounds nothing."""
    if precision != "bf16":
        return 0
    BT, C = B * T, cfg.n_embd
    return 2 * (2 * BT * 4 * C + BT * C + min(BT, head_chunk_rows) * cfg.vocab_size)


class Dropout:
    """Inverted dropout: keep masks for the embeddings, each block's attention probabilities and both
    residual branches, drawn per global row from (seed..., row), so that the same rows get the same
    masks whatever the number of ranks or micro-batches. Dropout.OFF applies nothing."""

    OFF: Dropout

    def __init__(self, p: float, masks: dict[str, np.ndarray] | None):
        self.p, self.masks = p, masks
        self.scale = 1.0 / (1.0 - p)

    @classmethod
    def draw(cls, cfg: ModelConfig, B: int, T: int, seed: tuple[int, ...], row0: int) -> Dropout:
        p, C, L, nh = cfg.dropout, cfg.n_embd, cfg.n_layer, cfg.n_head
        masks = {"emb": np.empty((B, T, C), bool), "att": np.empty((L, B, nh, T, T), bool),
                 "res1": np.empty((L, B, T, C), bool), "res2": np.empty((L, B, T, C), bool)}
        for b in range(B):
            rng = np.random.default_rng([*seed, row0 + b])
            masks["emb"][b] = rng.random((T, C), dtype=np.float32) >= p
            for layer in range(L):
                masks["att"][layer, b] = rng.random((nh, T, T), dtype=np.float32) >= p
                masks["res1"][layer, b] = rng.random((T, C), dtype=np.float32) >= p
                masks["res2"][layer, b] = rng.random((T, C), dtype=np.float32) >= p
        return cls(p, masks)

    def keep(self, name: str, layer: int | None = None) -> np.ndarray | None:
        if self.masks is None:
            return None
        return self.masks[name] if layer is None else self.masks[name][layer]

    def apply_(self, a: np.ndarray, name: str, layer: int | None = None) -> None:
        """a *= mask * scale, in place (forward, and the gradient through the same mask)."""
        if self.masks is not None:
            a *= self.keep(name, layer).reshape(a.shape)
            a *= self.scale

    def applied(self, d: np.ndarray, name: str, layer: int, out: np.ndarray) -> np.ndarray:
        """d through the mask, written to `out`; d itself when there is no dropout."""
        if self.masks is None:
            return d
        np.multiply(d, self.keep(name, layer).reshape(d.shape), out=out)
        out *= self.scale
        return out


Dropout.OFF = Dropout(0.0, None)


def split_heads(buf: np.ndarray, B: int, n_head: int, n_embd: int) -> tuple[np.ndarray, ...]:
    """(B*T, k*C) buffer -> k strided (B, nh, T, hs) views, one per C-wide part (no copies)."""
    parts, hs = buf.shape[-1] // n_embd, n_embd // n_head
    v = buf.reshape(B, -1, parts, n_head, hs).transpose(2, 0, 3, 1, 4)
    return tuple(v[i] for i in range(parts))


# ----------------------------------------------------------------------------- the block pair

def _adapt(ad: BlockAdapters | None, weight: str, x: np.ndarray, out: np.ndarray,
           ls: LoraScratch | None, layer: int) -> None:
    """out += the LoRA adapter of `weight` applied to x (the linear's input), if it has one."""
    pair = None if ad is None else ad.get(weight)
    if pair is None:
        return
    keep = None if ls.drop is None else ls.drop.keep(layer, weight, x.shape[1])
    ops.lora_forward(ls.input(x, keep), pair[0], pair[1], ad.scale, out, ls.u, ls.u16)


def _adapt_backward(ad: BlockAdapters | None, dad: BlockAdapters | None, weight: str, dout: np.ndarray,
                    x: np.ndarray, ls: LoraScratch | None, accumulate: bool, layer: int
                    ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray | None] | None, np.ndarray | None]:
    """The gradients of `weight`'s adapter, if it has one (into dad). Returns (pending, dout16):
    pending is (du, its A, its dropout mask), for the caller to add the input's part
    (_adapt_input) once the base linear has written the input's gradient; dout16 the bf16
    rounding of dout the adapter took (bf16 adapters), which the base linear's backward takes too
    instead of rounding dout again. (None, None) without an adapter."""
    pair = None if ad is None else ad.get(weight)
    if pair is None:
        return None, None
    da, db = dad.get(weight)
    keep = None if ls.drop is None else ls.drop.keep(layer, weight, x.shape[1])
    dout_in = ls.grad(dout)
    du = ops.lora_backward(dout_in, ls.input(x, keep), pair[0], pair[1], ad.scale, da, db, ls.u,
                           ls.du, accumulate, ls.u16, ls.du16)
    return (du, pair[0], keep), (None if ls.d16 is None else dout_in)    # d16: a bf16 model's


def _shared_rounding(ad: BlockAdapters | None, weight: str, x: np.ndarray, ls: LoraScratch | None
                     ) -> np.ndarray:
    """x as `weight`'s base linear and its adapter both take it: in a bf16 model whose adapter
    reads x undropped, x's bf16 rounding, made once here (both would make the same one); else x
    (LoraScratch.input gives x itself in an fp32 model)."""
    if ad is None or ad.get(weight) is None or ls.drop is not None:
        return x
    return ls.input(x)


def _adapt_input(pending: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None, dx: np.ndarray,
                 ls: LoraScratch | None) -> None:
    """dx += the adapter's part of its input's gradient (through its dropout mask, if any)."""
    if pending is None:
        return
    du, a_weight, keep = pending
    if keep is None:
        ops.lora_input_grad(du, a_weight, dx)
    else:
        ops.lora_input_grad(du, a_weight, dx, keep, ls.drop.scale, ls.work(dx.shape))


def block_forward(x: np.ndarray, w: BlockParams, a: BlockActs, s: Scratch, cfg: ModelConfig, layer: int,
                  drop: Dropout, kern: ops.Kernels, mw: BlockParams, cache: KVCache | None = None,
                  state_only: bool = False, ad: BlockAdapters | None = None,
                  ls: LoraScratch | None = None) -> None:
    """x += attn(ln_1(x)); x += mlp(ln_2(x)), in place on the residual stream x (B*T, C). With a
    KV cache, x holds the new positions only and attention also sees the cached ones. kern: the
    model's kernels (its precision); mw: the weights their matmuls take (w itself in fp32, the bf16
    copies in bf16; only the four matmul weights are read from it). state_only (recompute's re-run
    before block_backward): stop once `a` is complete, at the GELU's input; the MLP's output, a
    third of the block's matmul work, is not part of the state, and x is not needed after.
    ad: the block's LoRA adapters (each adds to its linear's output before anything reads it,
    bf16 rounding included), ls their scratch."""
    B = a.lse.shape[0]
    split = lambda buf: split_heads(buf, B, cfg.n_head, cfg.n_embd)  # noqa: E731
    # a bf16 model stores the ln_1 and ln_2 outputs, q/k/v and the attention output as bf16: each
    # is made in float32 in a scratch buffer free at that point, then rounded into its stored buffer
    stored16 = kern.stores_bf16

    def made(stored: np.ndarray, scratch: np.ndarray = s.branch) -> np.ndarray:  # where it is computed
        return scratch.reshape(-1)[: stored.size].reshape(stored.shape) if stored16 else stored

    def store(stored: np.ndarray, scratch: np.ndarray = s.branch) -> None:
        if stored16:
            bf16.to_bf16(made(stored, scratch), stored, parallel=True)

    a.ln1_rstd[:] = ops.layernorm_forward(x, w.ln1_w, w.ln1_b, made(a.ln1_out), a.ln1_xhat)  # (BT, C)
    store(a.ln1_out)
    kern.linear_forward(a.ln1_out, mw.qkv_w, w.qkv_b, made(a.qkv, s.hidden))           # (BT, 3C)
    _adapt(ad, "qkv_w", a.ln1_out, made(a.qkv, s.hidden), ls, layer)
    store(a.qkv, s.hidden)
    q, k, v = split(a.qkv)                                                              # (B, nh, T, hs)
    (y,) = split(made(a.attn_y))                                                        # (B, nh, T, hs)
    q_offset = 0
    if cache is not None:
        q_offset = cache.length
        k, v = cache.append(layer, k, v)                                    # (B, nh, q_offset + T, hs)
    kern.attention_forward(q, k, v, cfg.layer_window(layer), y, a.lse, drop.keep("att", layer), drop.scale,
                           q_offset)
    store(a.attn_y)
    kern.linear_forward(a.attn_y, mw.attn_proj_w, w.attn_proj_b, s.branch)             # (BT, C)
    _adapt(ad, "attn_proj_w", a.attn_y, s.branch, ls, layer)
    drop.apply_(s.branch, "res1", layer)
    x += s.branch
    a.ln2_rstd[:] = ops.layernorm_forward(x, w.ln2_w, w.ln2_b, made(a.ln2_out), a.ln2_xhat)  # (BT, C)
    store(a.ln2_out)
    kern.linear_forward(a.ln2_out, mw.fc_w, w.fc_b, a.fc_pre)                           # (BT, 4C)
    _adapt(ad, "fc_w", a.ln2_out, a.fc_pre, ls, layer)
    if state_only:
        return
    ops.gelu_forward(a.fc_pre, s.hidden)                                                # (BT, 4C)
    hidden = _shared_rounding(ad, "mlp_proj_w", s.hidden, ls)
    kern.linear_forward(hidden, mw.mlp_proj_w, w.mlp_proj_b, s.branch)                  # (BT, C)
    _adapt(ad, "mlp_proj_w", hidden, s.branch, ls, layer)
    drop.apply_(s.branch, "res2", layer)
    x += s.branch


def block_backward(dx: np.ndarray, w: BlockParams, g: BlockParams | None, a: BlockActs, s: Scratch,
                   cfg: ModelConfig, layer: int, drop: Dropout, accumulate: bool, kern: ops.Kernels,
                   mw: BlockParams, ad: BlockAdapters | None = None, dad: BlockAdapters | None = None,
                   ls: LoraScratch | None = None, need_dx: bool = True) -> None:
    """The gradient of block_forward. dx (B*T, C) comes in as d loss / d block output and leaves as
    d loss / d block input; the block's parameter gradients g are added to (written, if not
    `accumulate`: the first micro-batch of a step). kern, mw: as in block_forward.
    g None: a frozen block (LoRA's base): no weight, bias or LayerNorm gradients, only the input's.
    ad, dad, ls: the LoRA adapters, their gradients (added to, or written, as g) and scratch.
    need_dx False (a frozen model's first block, whose input gradient nothing reads): stop once
    the adapters' gradients are done, leaving dx unfinished."""
    g = FROZEN_BLOCK if g is None else g
    B = a.lse.shape[0]
    split = lambda buf: split_heads(buf, B, cfg.n_head, cfg.n_embd)  # noqa: E731
    # MLP branch: x = x + mlp_proj(gelu(fc(ln_2(x))))
    d_branch = drop.applied(dx, "res2", layer, out=s.branch)                            # (BT, C)
    ops.gelu_forward(a.fc_pre, s.hidden, slope=s.gelu_slope)       # recompute the output; slope from its exp
    # (the adapter reads the GELU's output before the base linear overwrites it with its gradient)
    lora_a, d16 = _adapt_backward(ad, dad, "mlp_proj_w", d_branch, s.hidden, ls, accumulate, layer)
    kern.linear_backward(d_branch, s.hidden, mw.mlp_proj_w, g.mlp_proj_w, g.mlp_proj_b, s.hidden,
                         accumulate, dout16=d16)                                        # (BT, 4C) d hidden
    _adapt_input(lora_a, s.hidden, ls)
    ops.multiply_(s.hidden, s.gelu_slope)                                               # (BT, 4C) d fc_pre
    lora_a, d16 = _adapt_backward(ad, dad, "fc_w", s.hidden, a.ln2_out, ls, accumulate, layer)
    kern.linear_backward(s.hidden, a.ln2_out, mw.fc_w, g.fc_w, g.fc_b, s.d_in, accumulate,
                         dout16=d16)                                                    # (BT, C)
    _adapt_input(lora_a, s.d_in, ls)
    ops.layernorm_backward(s.d_in, a.ln2_xhat, a.ln2_rstd, w.ln2_w, g.ln2_w, g.ln2_b, s.d_in, accumulate)
    dx += s.d_in
    # attention branch: x = x + attn_proj(attention(ln_1(x)))
    d_branch = drop.applied(dx, "res1", layer, out=s.branch)                            # (BT, C)
    lora_a, d16 = _adapt_backward(ad, dad, "attn_proj_w", d_branch, a.attn_y, ls, accumulate, layer)
    kern.linear_backward(d_branch, a.attn_y, mw.attn_proj_w, g.attn_proj_w, g.attn_proj_b, s.d_in,
                         accumulate, dout16=d16)                                        # (BT, C) d attn_y
    _adapt_input(lora_a, s.d_in, ls)
    q, k, v = split(a.qkv)                                                              # (B, nh, T, hs)
    (y,) = split(a.attn_y)                         # (bf16 attention takes its row sums from its blocks)
    (dy,) = split(s.d_in)
    dq, dk, dv = split(s.d_qkv)
    kern.attention_backward(dy, q, k, v, y, a.lse, cfg.layer_window(layer), dq, dk, dv,
                            drop.keep("att", layer), drop.scale)
    lora_a, d16 = _adapt_backward(ad, dad, "qkv_w", s.d_qkv, a.ln1_out, ls, accumulate, layer)
    if not need_dx and g is FROZEN_BLOCK:
        return
    kern.linear_backward(s.d_qkv, a.ln1_out, mw.qkv_w, g.qkv_w, g.qkv_b, s.d_in, accumulate,
                         dout16=d16)                                                    # (BT, C)
    _adapt_input(lora_a, s.d_in, ls)
    ops.layernorm_backward(s.d_in, a.ln1_xhat, a.ln1_rstd, w.ln1_w, g.ln1_w, g.ln1_b, s.d_in, accumulate)
    dx += s.d_in


# ----------------------------------------------------------------------------- the model

@dataclass
class TrainingForward:
    """A training forward's result and what its backward needs (the activations stay in `acts`)."""

    loss: float
    idx: np.ndarray                 # (B, T) input tokens
    dropout: Dropout
    acts: Activations
    accumulate: bool                # add to the gradients (False: the first micro-batch writes them)
    lora_dropout: LoraDropout | None = None     # the adapters' dropout masks' draw (LoRA, p > 0)


class BackwardHooks(Protocol):
    """What backward tells a gradient reducer that overlaps the sum with it (dist.GradReducer)."""

    def head_done(self) -> None:
        """wte's gradient is final but for this micro-batch's token rows (the tied head's part
        comes from the forward, which computes the loss's gradient as it goes)."""

    def block_done(self, layer: int) -> None:
        """Block `layer`'s gradients are final (last block first; ln_f's with the last block)."""

    def token_rows(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """The token embeddings' gradient of this micro-batch, sparse: rows[i] belongs to wte
        row ids[i] (repeats add up). The reducer adds every rank's rows after summing wte."""


class GPT:
    """Owns views of the flat parameter and gradient buffers and the activation buffers.

    forward(idx, targets, grad_scale) -> TrainingForward, then backward(that): one training micro-batch.
    loss(idx, targets) -> float: evaluation. logits(idx, cache=None) -> (B, T, V): inference, with or
    without a KV cache. The flat buffers may be given (e.g. in memory shared with other ranks).
    precision: "fp32", or "bf16" (float32 model, bf16 matmuls): chosen here, once. A bf16 model reads
    the bf16 copy of its matmul weights from `weights16` (a bf16.Bf16Weights on these parameters:
    a node-shared one from the trainer), or from a private one it makes; whoever changes the
    parameters tells that copy (weights_changed(), or the trainer through the copy itself).
    recompute: "none" or "block" (saved_state; the module's docstring), also chosen here, once;
    recompute_keep: under "block", how many of the last blocks keep their activations (saved_state).

    lora (a lora.LoraLayout of this cfg): LoRA on a frozen base. The base (`params`) gets no
    gradient buffer (self.grads and self.dw are None; `grads` must not be given) and backward runs
    no weight-gradient matmul and no bias, LayerNorm or embedding gradient: only the input
    gradients through the frozen layers, and the adapters' gradients. The adapters are one flat
    vector in the LoRA layout, `lora_params` (self.lora_params; zeros if not given: lora.init
    fills it as peft does), their gradients `lora_grads` (self.lora_grads; None if not trainable),
    written or added as self.grads is without LoRA (zero_grad, the `accumulate` rule).
    Backward hooks: block_done(layer) once block `layer`'s adapter gradients (lora.layer_ranges[layer]
    of lora_grads) are final; never head_done or token_rows (the embedding has no gradient: a
    reducer over the adapters has no token table).

    base16 (a frozen base held in bf16 alone: LoRA, or trainable=False; precision bf16): the whole
    base as bf16 bits (uint16) in the Layout, e.g. one buffer shared by a node's ranks, instead of
    float32 `params`. The matmuls read it directly (no Bf16Weights); the LayerNorms, biases and wpe
    are widened to small float32 copies here, the token embedding's rows as they are looked up. The
    model computes exactly what a bf16 model on float32 parameters equal to the widened bits does
    (self.params and self.p are then None and {}). The base must not change under the model."""

    def __init__(self, cfg: ModelConfig, dtype: type = np.float32, params: np.ndarray | None = None,
                 grads: np.ndarray | None = None, head_chunk_rows: int = 512, trainable: bool = True,
                 precision: str = "fp32", weights16: bf16.Bf16Weights | None = None,
                 recompute: str = "none", lora: LoraLayout | None = None,
                 lora_params: np.ndarray | None = None, lora_grads: np.ndarray | None = None,
                 base16: np.ndarray | None = None, recompute_keep: int = 0):
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd {cfg.n_embd} is not divisible by n_head {cfg.n_head}")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision {precision!r}: expected fp32 or bf16 (bf16.resolve decides auto)")
        if precision == "bf16" and np.dtype(dtype) != np.float32:
            raise ValueError(f"bf16 matmuls need a float32 model, not {np.dtype(dtype)}")
        self.cfg = cfg
        self.precision = precision
        self.recompute = recompute
        self._saved = saved_state(recompute, cfg.n_layer, recompute_keep)   # (block sets, block inputs)
        self.kernels = ops.kernels(precision)
        self.dtype = np.dtype(dtype)
        self.layout = Layout(cfg)
        self.trainable = trainable
        self._check_base16(base16, params, weights16, lora)
        self.base16 = base16
        self.params = self._flat(params, "parameter") if base16 is None else None
        self.lora = lora
        self._init_lora(lora, grads, lora_params, lora_grads)
        # inference (sampling, export) needs no gradient buffer: a model's worth of memory saved;
        # neither does a frozen base (LoRA)
        base_grads = trainable and lora is None
        self.grads = self._flat(grads, "gradient") if base_grads else None
        self.g = self.layout.views(self.grads) if base_grads else {}
        self.dw = self.layout.tensors(self.grads) if base_grads else None
        self.head_chunk_rows = head_chunk_rows
        self._acts: dict[tuple[int, int, int], Activations] = {}
        self._grads_stale = False   # after zero_grad(): the next backward overwrites, not adds
        self._wte32: np.ndarray | None = None      # base16: wte widened, made by the first logits()
        if base16 is not None:
            self.p = {}
            self.w = self.layout.typed(self._widened_small(base16))
            self.weights16 = None
            self._mw = self.layout.tensors(base16)
            return
        self.p = self.layout.views(self.params)              # by name (weights formats, tests)
        self.w = self.layout.tensors(self.params)           # typed (the passes below)
        self.weights16 = self._bf16_copy(weights16) if precision == "bf16" else None
        if precision == "fp32" and weights16 is not None:
            raise ValueError("an fp32 model has no bf16 weight copy (weights16)")
        # the matmul weights as the kernels take them: the float32 tensors, or views of the bf16 copy
        self._mw = self.w if self.weights16 is None else self.layout.tensors(self.weights16.bits)

    def _check_base16(self, base16: np.ndarray | None, params: np.ndarray | None,
                      weights16: bf16.Bf16Weights | None, lora: LoraLayout | None) -> None:
        if base16 is None:
            return
        if self.precision != "bf16":
            raise ValueError("a base held in bf16 (base16) needs precision bf16")
        if params is not None or weights16 is not None:
            raise ValueError("base16 is the whole base: give no float32 params or weights16 with it")
        if lora is None and self.trainable:
            raise ValueError("a base held in bf16 (base16) is frozen: train it with LoRA, or trainable=False")
        if base16.shape != (self.layout.size,) or base16.dtype != np.uint16:
            raise ValueError(f"base16 buffer {base16.dtype}{base16.shape}, "
                             f"expected uint16({self.layout.size},)")

    def _widened_small(self, base16: np.ndarray) -> dict[str, np.ndarray | None]:
        """float32 copies of the base's tensors that no matmul takes (LayerNorms, biases, wpe); None
        for the block matmul weights and wte, which are read as bits."""
        matmul = {f.metadata["name"] for f in BLOCK_FIELDS if f.name in MATMUL_WEIGHTS}
        out: dict[str, np.ndarray | None] = {}
        for name, bits in self.layout.views(base16).items():
            big = name == "wte" or (name.startswith("h.") and name.split(".", 2)[2] in matmul)
            out[name] = None if big else bf16.to_float32(bits)
        return out

    def _init_lora(self, lora: LoraLayout | None, grads: np.ndarray | None, lora_params: np.ndarray | None,
                   lora_grads: np.ndarray | None) -> None:
        """The adapters' flat buffers and their per-block views (the class docstring)."""
        self.lora_params = self.lora_grads = None
        # the adapters as the passes multiply them: views of lora_params, or in a bf16 model of their
        # bf16 roundings (_lora16), remade from lora_params by every pass's trunk (9.8M values at XL r 8)
        self._adapters: list[BlockAdapters | None] = [None] * self.cfg.n_layer
        self._adapter_grads: list[BlockAdapters | None] = [None] * self.cfg.n_layer
        self._lora16: np.ndarray | None = None
        if lora is None:
            if lora_params is not None or lora_grads is not None:
                raise ValueError("lora_params or lora_grads without a lora layout")
            return
        if lora.cfg != self.cfg:
            raise ValueError("the LoRA layout was made for another model config")
        if grads is not None:
            raise ValueError("a LoRA model's base is frozen: it takes no base gradient buffer (grads)")
        self.lora_params = self._flat(lora_params, "LoRA parameter", lora.size)
        if self.precision == "bf16":
            self._lora16 = np.zeros(lora.size, np.uint16)
        self._adapters = lora.blocks(self.lora_params if self._lora16 is None else self._lora16)
        if self.trainable:
            self.lora_grads = self._flat(lora_grads, "LoRA gradient", lora.size)
            self._adapter_grads = lora.blocks(self.lora_grads)
        elif lora_grads is not None:
            raise ValueError("lora_grads for a model built with trainable=False")

    def _bf16_copy(self, weights16: bf16.Bf16Weights | None) -> bf16.Bf16Weights:
        ranges = self.layout.matmul_weight_ranges()
        if weights16 is None:
            return bf16.Bf16Weights(self.params, ranges)
        if weights16.params is not self.params or weights16.ranges != tuple(ranges):
            raise ValueError("weights16 is a bf16 copy of other parameters: make it on this model's "
                             "parameter buffer with Layout.matmul_weight_ranges()")
        return weights16

    def weights_changed(self) -> None:
        """The parameters were changed (an optimizer step, a checkpoint, an edit): a bf16 model's
        private copy of the matmul weights is remade by the next pass; a shared one, converted a
        slice per rank, is its trainer's to complete (bf16.Bf16Weights.changed_all, then current)."""
        if self.weights16 is not None:
            self.weights16.changed_all()

    def _matmul_weights(self) -> ParameterTensors:
        """The weights this pass's matmuls take: the float32 parameters, or their bf16 copies, up to
        date (a stale private copy is remade here)."""
        if self.weights16 is not None:
            self.weights16.for_pass()
        return self._mw

    def _flat(self, buf: np.ndarray | None, what: str, size: int | None = None) -> np.ndarray:
        size = self.layout.size if size is None else size
        if buf is None:
            return np.zeros(size, self.dtype)
        if buf.shape != (size,) or buf.dtype != self.dtype:
            raise ValueError(f"{what} buffer {buf.dtype}{buf.shape}, expected {self.dtype}({size},)")
        return buf

    def _activations(self, B: int, T: int, training: bool) -> Activations:
        key = (B, T, training)
        if key not in self._acts:
            if len(self._acts) >= 3:  # training, eval and one more shape; drop the oldest
                self._acts.pop(next(iter(self._acts)))
            if training:        # from now on passes without gradients use the training set
                self._acts.pop((B, T, False), None)
            sets, inputs = self._saved if training else (1, 0)
            lo = self.lora
            self._acts[key] = Activations(self.cfg, B, T, self.dtype, self.head_chunk_rows, sets, training,
                                          self.precision, inputs, 0 if lo is None else lo.rank,
                                          lo is not None and lo.dropout > 0)
        return self._acts[key]

    def _inference_activations(self, B: int, T: int) -> Activations:
        """A pass without gradients (evaluation, logits): in the training buffers of its shape when no
        backward awaits them (they hold all that such a pass writes: on GPT-2 XL at T1024 that is
        ~200 MiB per rank not allocated a second time), else in a set of its own, which the first
        training pass of that shape frees (a run's evaluation at step 0)."""
        training = self._acts.get((B, T, True))
        if training is not None and training.owner is None:
            return training
        return self._activations(B, T, training=False)

    def _dropout(self, B: int, T: int, seed: tuple[int, ...] | None, row0: int) -> Dropout:
        if seed is None or self.cfg.dropout == 0.0:
            return Dropout.OFF
        return Dropout.draw(self.cfg, B, T, seed, row0)

    def _lora_dropout(self, B: int, T: int, seed: tuple[int, ...] | None, row0: int) -> LoraDropout | None:
        if seed is None or self.lora is None or self.lora.dropout == 0.0:
            return None
        return LoraDropout(self.lora.dropout, B, T, seed, row0)

    def _trunk(self, idx: np.ndarray, a: Activations, drop: Dropout, cache: KVCache | None = None,
               lora_drop: LoraDropout | None = None) -> None:
        """Embeddings, every block, ln_f: a.lnf_out (B*T, C) is the head's input."""
        cfg, w, kern = self.cfg, self.w, self.kernels
        if a.lora is not None:
            a.lora.drop = lora_drop
        B, T = idx.shape
        t0 = 0 if cache is None else cache.length
        if cache is not None and t0 + T > cache.max_len:
            raise ValueError(f"KV cache full: {t0} + {T} > {cache.max_len} positions")
        if t0 + T > cfg.block_size:
            raise ValueError(f"sequence length {t0 + T} exceeds block_size {cfg.block_size}")
        mw = self._matmul_weights()
        if self._lora16 is not None:        # what backward's matmuls take too (the same parameters)
            bf16.to_bf16(self.lora_params, self._lora16, parallel=True)
        x = a.x                                                                         # (BT, C)
        if w.wte is None:                   # base16: the rows' bits, widened (exactly)
            bf16.to_float32(np.take(mw.wte, idx.reshape(-1), axis=0), out=x)
        else:
            np.take(w.wte, idx.reshape(-1), axis=0, out=x)
        x.reshape(B, T, -1)[...] += w.wpe[t0 : t0 + T]
        drop.apply_(x, "emb")
        for layer, block in enumerate(w.blocks):
            if layer < len(a.inputs):
                a.inputs[layer][...] = x                # recompute: what this block's backward re-runs from
            block_forward(x, block, a.block(layer), a.scratch, cfg, layer, drop, kern, mw.blocks[layer],
                          cache, ad=self._adapters[layer], ls=a.lora)
        if cache is not None:
            cache.length += T
        a.lnf_rstd[:] = ops.layernorm_forward(x, w.lnf_w, w.lnf_b, a.lnf_out, a.lnf_xhat)

    def forward(self, idx: np.ndarray, targets: np.ndarray, grad_scale: float,
                dropout_seed: tuple[int, ...] | None = None, row0: int = 0) -> TrainingForward:
        """The training forward of a micro-batch (idx, targets: (B, T) ints). The loss gradient is
        scaled by grad_scale (1 / (accumulation steps x ranks) makes a SUM over ranks the global
        mean). dropout_seed (seed, step) draws dropout masks for global rows row0...; None: none."""
        if not self.trainable:
            raise RuntimeError("this model was built with trainable=False: no gradients")
        B, T = idx.shape
        a = self._activations(B, T, training=True)
        drop = self._dropout(B, T, dropout_seed, row0)
        lora_drop = self._lora_dropout(B, T, dropout_seed, row0)
        self._trunk(idx, a, drop, lora_drop=lora_drop)
        V, accumulate = self.cfg.vocab_size, not self._grads_stale
        # the head's backward happens here, while each chunk's probabilities are at hand
        dwte = None if self.dw is None else self.dw.wte[:V]         # None: a frozen embedding (LoRA)
        loss = self.kernels.head_loss(a.lnf_out, self._mw.wte[:V], targets.reshape(-1), grad_scale,
                                      a.dlnf_out, dwte, self.head_chunk_rows,
                                      accumulate=accumulate, scratch=a.logits)
        self._grads_stale = False
        a.owner = TrainingForward(loss, idx, drop, a, accumulate, lora_drop)
        return a.owner

    def backward(self, fwd: TrainingForward, hooks: BackwardHooks | None = None) -> None:
        """Adds the gradient of `fwd` (the latest training forward of its shape) to self.grads (with
        LoRA: self.lora_grads), or writes it if this is the first backward since zero_grad(). With
        hooks (a gradient reducer that sends gradients as they are done), backward reports what is
        finished when, and hands over this micro-batch's token-embedding rows instead of adding them
        to wte's gradient."""
        a = fwd.acts
        if a.owner is not fwd:
            raise RuntimeError("backward() needs the latest training forward of its shape: "
                               "these activations were overwritten")
        a.owner = None
        cfg, w, dw, drop, acc = self.cfg, self.w, self.dw, fwd.dropout, fwd.accumulate
        mw = self._matmul_weights()
        B, T = fwd.idx.shape
        dx = a.x                                   # the residual stream's buffer now carries its gradient
        frozen = dw is None                        # LoRA: only the adapters get gradients
        if a.lora is not None:
            a.lora.drop = fwd.lora_dropout
        if hooks is not None and not frozen:
            hooks.head_done()                      # the forward's fused head wrote wte's gradient
        ops.layernorm_backward(a.dlnf_out, a.lnf_xhat, a.lnf_rstd, w.lnf_w, None if frozen else dw.lnf_w,
                               None if frozen else dw.lnf_b, dx, acc)
        kern = self.kernels
        for layer in reversed(range(cfg.n_layer)):
            ad = self._adapters[layer]         # (the forward's: its trunk made the bf16 ones)
            if layer < len(a.inputs):       # recompute: re-fill the shared set (it holds the last block's)
                block_forward(a.inputs[layer], w.blocks[layer], a.block(layer), a.scratch, cfg, layer, drop,
                              kern, mw.blocks[layer], state_only=True, ad=ad, ls=a.lora)
            block_backward(dx, w.blocks[layer], None if frozen else dw.blocks[layer], a.block(layer),
                           a.scratch, cfg, layer, drop, acc, kern, mw.blocks[layer], ad=ad,
                           dad=self._adapter_grads[layer], ls=a.lora, need_dx=not frozen or layer > 0)
            if hooks is not None:
                hooks.block_done(layer)
        if frozen:
            return                                 # no embedding gradients
        drop.apply_(dx, "emb")
        dw.wpe[:T] += dx.reshape(B, T, -1).sum(axis=0)     # (T, C)
        if hooks is not None:
            hooks.token_rows(fwd.idx.reshape(-1), dx)      # (B*T,), (B*T, C): added after the sum
        else:
            np.add.at(dw.wte, fwd.idx.reshape(-1), dx)

    def zero_grad(self) -> None:
        """Start a new accumulation. Lazily: the next training forward/backward overwrites every
        gradient it produces instead of adding to it (no zeroing pass, no read-add-write pass);
        only the rows no backward writes (positions beyond T, the vocabulary padding) are zeroed. (A
        LoRA model's backward writes every adapter gradient: nothing to zero.)"""
        if self.dw is not None:
            self.dw.wpe[:] = 0.0
            self.dw.wte[self.cfg.vocab_size :] = 0.0
        self._grads_stale = True

    def loss(self, idx: np.ndarray, targets: np.ndarray, dropout_seed: tuple[int, ...] | None = None,
             row0: int = 0) -> float:
        """Mean cross-entropy of targets given idx (both (B, T)), without gradients; without dropout
        unless dropout_seed is given (then with the masks a training forward would draw)."""
        B, T = idx.shape
        a = self._inference_activations(B, T)
        self._trunk(idx, a, self._dropout(B, T, dropout_seed, row0),
                    lora_drop=self._lora_dropout(B, T, dropout_seed, row0))
        V = self.cfg.vocab_size
        return self.kernels.head_loss(a.lnf_out, self._mw.wte[:V], targets.reshape(-1), None, None, None,
                                      self.head_chunk_rows, scratch=a.logits)

    def logits(self, idx: np.ndarray, cache: KVCache | None = None) -> np.ndarray:
        """(B, T, V) logits of idx (B, T). With a KV cache, idx are the next positions after
        cache.length, and their keys and values are appended: a new token costs one position."""
        B, T = idx.shape
        a = self._inference_activations(B, T)
        self._trunk(idx, a, Dropout.OFF, cache)
        V = self.cfg.vocab_size
        wte = self.w.wte
        if wte is None:                     # base16: widened once, for inference only
            if self._wte32 is None:
                self._wte32 = bf16.to_float32(self._mw.wte[:V])
            wte = self._wte32
        return (a.lnf_out @ wte[:V].T).reshape(B, T, V)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        # a bf16 model's attention multiplies bf16 keys and values: the cache keeps them so
        dtype = np.uint16 if self.precision == "bf16" else self.dtype
        return KVCache(self.cfg, batch, max_len or self.cfg.block_size, dtype)


class KVCache:
    """Keys and values of every layer for positions [0, length), per sequence in the batch."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: np.dtype):
        hs = cfg.n_embd // cfg.n_head
        shape = (cfg.n_layer, batch, cfg.n_head, max_len, hs)
        self.k = np.zeros(shape, dtype)
        self.v = np.zeros(shape, dtype)
        self.length = 0
        self.max_len = max_len

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store layer's keys and values (B, nh, T, hs) of positions length.. ; return all of them so far."""
        t0, t1 = self.length, self.length + k.shape[2]
        self.k[layer, :, :, t0:t1] = k
        self.v[layer, :, :, t0:t1] = v
        return self.k[layer, :, :, :t1], self.v[layer, :, :, :t1]

    def reset(self) -> None:
        """Empty: the next positions are written from 0 again (sampling re-fills a cropped window)."""
        self.length = 0

    def reorder(self, rows: np.ndarray) -> None:
        """Keep sequence rows[i] as row i (beam search reshuffles its beams)."""
        self.k = self.k[:, rows]
        self.v = self.v[:, rows]
