"""GPT-2 in NumPy: the flat parameter layout, forward and backward over reused buffers, KV cache.

Every parameter lives in one flat vector; each named tensor is a view into it. The gradient
buffer has the same layout, so one allreduce covers all gradients, the optimizer runs one
vectorised update over a slice, and a checkpoint shard is a byte range of the same vector.

The layout order is [wte, wpe, layer 0 ... layer L-1, ln_f]. Layers are contiguous so that the
backward pass, which finishes them last-to-first, can hand each finished layer's gradient slice
to the communicator while it works on the next one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from distgpt import ops
from distgpt.config import ModelConfig

LAYER_PARAMS = (  # name, shape as a function of C, decayed (2-D matmul weights only)
    ("ln_1.weight", lambda c: (c,), False),
    ("ln_1.bias", lambda c: (c,), False),
    ("attn.c_attn.weight", lambda c: (c, 3 * c), True),
    ("attn.c_attn.bias", lambda c: (3 * c,), False),
    ("attn.c_proj.weight", lambda c: (c, c), True),
    ("attn.c_proj.bias", lambda c: (c,), False),
    ("ln_2.weight", lambda c: (c,), False),
    ("ln_2.bias", lambda c: (c,), False),
    ("mlp.c_fc.weight", lambda c: (c, 4 * c), True),
    ("mlp.c_fc.bias", lambda c: (4 * c,), False),
    ("mlp.c_proj.weight", lambda c: (4 * c, c), True),
    ("mlp.c_proj.bias", lambda c: (c,), False),
)


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
            for name, shape, decay in LAYER_PARAMS:
                add(f"h.{layer}.{name}", shape(C), decay)
            self.layer_ranges.append((start, offset))
        add("ln_f.weight", (C,), False)
        add("ln_f.bias", (C,), False)
        self.entries = entries
        self.by_name = {e.name: e for e in entries}
        self.size = offset
        self.cfg = cfg

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        assert flat.shape == (self.size,), (flat.shape, self.size)
        return {e.name: flat[e.offset : e.offset + e.size].reshape(e.shape) for e in self.entries}

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


class _Acts:
    """Activation buffers for one (B, T), allocated once and reused every step."""

    def __init__(self, cfg: ModelConfig, B: int, T: int, dtype: np.dtype, head_chunk_rows: int):
        C, L, nh = cfg.n_embd, cfg.n_layer, cfg.n_head
        hs = C // nh
        BT = B * T
        z = lambda *s: np.empty(s, dtype=dtype)  # noqa: E731
        self.x = z(BT, C)  # residual stream
        self.ln1_xhat, self.ln1_out, self.ln1_rstd = z(L, BT, C), z(L, BT, C), z(L, BT)
        self.qkv = z(L, BT, 3 * C)
        self.lse = z(L, B, nh, T)  # attention softmax log-normalisers: backward recomputes the rest
        self.attn_y = z(L, BT, C)
        self.ln2_xhat, self.ln2_out, self.ln2_rstd = z(L, BT, C), z(L, BT, C), z(L, BT)
        self.fc_pre = z(L, BT, 4 * C)
        self.lnf_xhat, self.lnf_out, self.lnf_rstd = z(BT, C), z(BT, C), z(BT)
        self.dlnf_out = z(BT, C)
        # scratch, reused inside a layer
        self.s_qkv = z(BT, 3 * C)
        self.s_c = z(BT, C)
        self.s_c2 = z(BT, C)
        self.s_4c = z(BT, 4 * C)
        self.gelu_slope = z(BT, 4 * C)
        # one chunk of the head's logits (a fresh 100 MB array every step would be page-faulted in)
        self.logits = z(min(BT, head_chunk_rows), cfg.vocab_size)
        self.shape = (B, T, nh, hs)

    def heads(self, a: np.ndarray) -> tuple[np.ndarray, ...]:
        """(B*T, k*C) buffer -> k strided (B, nh, T, hs) views, one per C-wide part (no copies)."""
        B, T, nh, hs = self.shape
        parts = a.shape[-1] // (nh * hs)
        v = a.reshape(B, T, parts, nh, hs).transpose(2, 0, 3, 1, 4)
        return tuple(v[i] for i in range(parts))


def activation_bytes(cfg: ModelConfig, B: int, T: int, head_chunk_rows: int = 512, itemsize: int = 4) -> int:
    """Bytes of the training buffers `_Acts` allocates for a (B, T) micro-batch, plus the head's chunk."""
    C, L, BT = cfg.n_embd, cfg.n_layer, B * T
    per_layer = 12 * BT * C + 2 * BT + B * cfg.n_head * T
    scratch = 17 * BT * C + BT
    head = min(BT, head_chunk_rows) * cfg.vocab_size
    return itemsize * (L * per_layer + scratch + head)


class GPT:
    """Owns the flat parameter and gradient buffers and the activations of the last forward."""

    def __init__(
        self,
        cfg: ModelConfig,
        dtype: type = np.float32,
        params: np.ndarray | None = None,
        head_chunk_rows: int = 512,
        trainable: bool = True,
    ):
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd {cfg.n_embd} is not divisible by n_head {cfg.n_head}")
        self.cfg = cfg
        self.dtype = np.dtype(dtype)
        self.layout = Layout(cfg)
        self.params = np.zeros(self.layout.size, self.dtype) if params is None else params
        # inference (sampling, export) needs no gradient buffer: a model's worth of memory saved
        self.grads = np.zeros(self.layout.size, self.dtype) if trainable else None
        self.p = self.layout.views(self.params)
        self.g = self.layout.views(self.grads) if trainable else {}
        self.head_chunk_rows = head_chunk_rows
        self._acts: dict[tuple[int, int], _Acts] = {}
        self._last: tuple | None = None
        self._grads_stale = False   # after zero_grad(): the next backward overwrites, not adds
        self.layer_done_hook = None  # called with the layer index as its gradients finish

    # ------------------------------------------------------------------ helpers
    def _buffers(self, B: int, T: int) -> _Acts:
        key = (B, T)
        if key not in self._acts:
            if len(self._acts) >= 2:  # training and eval shapes; drop anything older
                self._acts.pop(next(iter(self._acts)))
            self._acts[key] = _Acts(self.cfg, B, T, self.dtype, self.head_chunk_rows)
        return self._acts[key]

    def _dropout_masks(self, B: int, T: int, seed: tuple[int, ...], row0: int) -> dict[str, np.ndarray]:
        """Inverted-dropout keep masks drawn per global row from (seed..., row): the same rows
        get the same masks whatever the number of ranks or micro-batches."""
        cfg, p = self.cfg, self.cfg.dropout
        C, L, nh = cfg.n_embd, cfg.n_layer, cfg.n_head
        masks = {
            "emb": np.empty((B, T, C), bool),
            "att": np.empty((L, B, nh, T, T), bool),
            "res1": np.empty((L, B, T, C), bool),
            "res2": np.empty((L, B, T, C), bool),
        }
        for b in range(B):
            rng = np.random.default_rng([*seed, row0 + b])
            masks["emb"][b] = rng.random((T, C), dtype=np.float32) >= p
            for layer in range(L):
                masks["att"][layer, b] = rng.random((nh, T, T), dtype=np.float32) >= p
                masks["res1"][layer, b] = rng.random((T, C), dtype=np.float32) >= p
                masks["res2"][layer, b] = rng.random((T, C), dtype=np.float32) >= p
        return masks

    def _drop(self, a: np.ndarray, keep: np.ndarray) -> None:
        a *= keep.reshape(a.shape)
        a *= 1.0 / (1.0 - self.cfg.dropout)

    # ------------------------------------------------------------------ training forward/backward
    def forward(
        self,
        idx: np.ndarray,
        targets: np.ndarray | None = None,
        grad_scale: float | None = None,
        dropout_seed: tuple[int, ...] | None = None,
        row0: int = 0,
        return_logits: bool = False,
    ):
        """Mean cross-entropy of `targets` given `idx` (both (B, T) ints).

        grad_scale: when given, this forward is followed by backward(); the loss gradient is scaled
        by it (1 / (accumulation steps x ranks) makes a SUM-allreduce give the global mean).
        dropout_seed: (seed, step) when dropout is active (training); None disables dropout.
        return_logits: also return (B, T, vocab_size) logits (tests, sampling); costs memory.
        """
        cfg, p = self.cfg, self.p
        B, T = idx.shape
        self._last = None  # only a training forward may be followed by backward(); this one overwrites it
        if grad_scale is not None and self.grads is None:
            raise RuntimeError("this model was built with trainable=False: no gradients")
        if T > cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}")
        C = cfg.n_embd
        a = self._buffers(B, T)
        use_dropout = dropout_seed is not None and cfg.dropout > 0.0
        masks = self._dropout_masks(B, T, dropout_seed, row0) if use_dropout else None
        keep_scale = 1.0 / (1.0 - cfg.dropout)

        x = a.x
        np.take(p["wte"], idx.reshape(-1), axis=0, out=x)
        x.reshape(B, T, C)[...] += p["wpe"][:T]
        if use_dropout:
            self._drop(x, masks["emb"])
        for layer in range(cfg.n_layer):
            lp = f"h.{layer}."
            a.ln1_rstd[layer] = ops.layernorm_forward(
                x, p[lp + "ln_1.weight"], p[lp + "ln_1.bias"], a.ln1_out[layer], a.ln1_xhat[layer]
            )
            ops.linear_forward(
                a.ln1_out[layer], p[lp + "attn.c_attn.weight"], p[lp + "attn.c_attn.bias"], a.qkv[layer]
            )
            q, k, v = a.heads(a.qkv[layer])
            (y,) = a.heads(a.attn_y[layer])
            ops.attention_forward(q, k, v, cfg.layer_window(layer), y, a.lse[layer],
                                  keep=masks["att"][layer] if use_dropout else None, keep_scale=keep_scale)
            ops.linear_forward(
                a.attn_y[layer], p[lp + "attn.c_proj.weight"], p[lp + "attn.c_proj.bias"], a.s_c
            )
            if use_dropout:
                self._drop(a.s_c, masks["res1"][layer])
            x += a.s_c
            a.ln2_rstd[layer] = ops.layernorm_forward(
                x, p[lp + "ln_2.weight"], p[lp + "ln_2.bias"], a.ln2_out[layer], a.ln2_xhat[layer]
            )
            ops.linear_forward(
                a.ln2_out[layer], p[lp + "mlp.c_fc.weight"], p[lp + "mlp.c_fc.bias"], a.fc_pre[layer]
            )
            ops.gelu_forward(a.fc_pre[layer], a.s_4c)
            ops.linear_forward(a.s_4c, p[lp + "mlp.c_proj.weight"], p[lp + "mlp.c_proj.bias"], a.s_c)
            if use_dropout:
                self._drop(a.s_c, masks["res2"][layer])
            x += a.s_c
        a.lnf_rstd[:] = ops.layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"], a.lnf_out, a.lnf_xhat)

        V = cfg.vocab_size
        if targets is None:
            return (a.lnf_out @ p["wte"][:V].T).reshape(B, T, V)
        logits = np.empty((B * T, V), self.dtype) if return_logits else None
        accumulate = not self._grads_stale
        loss = ops.head_loss(
            a.lnf_out,
            p["wte"][:V],
            targets.reshape(-1),
            grad_scale,
            a.dlnf_out if grad_scale is not None else None,
            self.g["wte"][:V] if grad_scale is not None else None,
            self.head_chunk_rows,
            logits,
            accumulate=accumulate,
            scratch=a.logits,
        )
        if grad_scale is not None:
            self._grads_stale = False
            self._last = (idx, masks, B, T, accumulate)
        if return_logits:
            return loss, logits.reshape(B, T, V)
        return loss

    def backward(self) -> None:
        """Accumulates the gradient of the last training forward into self.grads (overwrites it,
        if this is the first backward since zero_grad())."""
        if self._last is None:
            raise RuntimeError("backward() needs a forward() with grad_scale set")
        idx, masks, B, T, acc = self._last
        self._last = None
        cfg, p, g = self.cfg, self.p, self.g
        a = self._buffers(B, T)
        dx = a.x  # the residual stream's buffer now carries its gradient
        ops.layernorm_backward(
            a.dlnf_out, a.lnf_xhat, a.lnf_rstd, p["ln_f.weight"], g["ln_f.weight"], g["ln_f.bias"], dx, acc
        )
        for layer in reversed(range(cfg.n_layer)):
            lp = f"h.{layer}."
            # MLP: x = x + proj(gelu(fc(ln2(x))))
            dres = a.s_c
            if masks is not None:
                np.multiply(dx, masks["res2"][layer].reshape(dx.shape), out=dres)
                dres *= 1.0 / (1.0 - cfg.dropout)
            else:
                dres = dx
            # recompute the gelu output instead of storing it; its slope comes from the same exp
            ops.gelu_forward(a.fc_pre[layer], a.s_4c, slope=a.gelu_slope)
            ops.linear_backward(
                dres,
                a.s_4c,
                p[lp + "mlp.c_proj.weight"],
                g[lp + "mlp.c_proj.weight"],
                g[lp + "mlp.c_proj.bias"],
                a.s_4c,
                acc,
            )
            ops.multiply_(a.s_4c, a.gelu_slope)                 # through the gelu
            ops.linear_backward(
                a.s_4c,
                a.ln2_out[layer],
                p[lp + "mlp.c_fc.weight"],
                g[lp + "mlp.c_fc.weight"],
                g[lp + "mlp.c_fc.bias"],
                a.s_c2,
                acc,
            )
            ops.layernorm_backward(
                a.s_c2,
                a.ln2_xhat[layer],
                a.ln2_rstd[layer],
                p[lp + "ln_2.weight"],
                g[lp + "ln_2.weight"],
                g[lp + "ln_2.bias"],
                a.s_c2,
                acc,
            )
            dx += a.s_c2
            # attention: x = x + proj(attn(ln1(x)))
            if masks is not None:
                dres = a.s_c
                np.multiply(dx, masks["res1"][layer].reshape(dx.shape), out=dres)
                dres *= 1.0 / (1.0 - cfg.dropout)
            else:
                dres = dx
            ops.linear_backward(
                dres,
                a.attn_y[layer],
                p[lp + "attn.c_proj.weight"],
                g[lp + "attn.c_proj.weight"],
                g[lp + "attn.c_proj.bias"],
                a.s_c2,
                acc,
            )
            q, k, v = a.heads(a.qkv[layer])
            (y,) = a.heads(a.attn_y[layer])
            (dy,) = a.heads(a.s_c2)
            dq, dk, dv = a.heads(a.s_qkv)
            ops.attention_backward(dy, q, k, v, y, a.lse[layer], cfg.layer_window(layer), dq, dk, dv,
                                   keep=masks["att"][layer] if masks is not None else None,
                                   keep_scale=1.0 / (1.0 - cfg.dropout))
            ops.linear_backward(
                a.s_qkv,
                a.ln1_out[layer],
                p[lp + "attn.c_attn.weight"],
                g[lp + "attn.c_attn.weight"],
                g[lp + "attn.c_attn.bias"],
                a.s_c2,
                acc,
            )
            ops.layernorm_backward(
                a.s_c2,
                a.ln1_xhat[layer],
                a.ln1_rstd[layer],
                p[lp + "ln_1.weight"],
                g[lp + "ln_1.weight"],
                g[lp + "ln_1.bias"],
                a.s_c2,
                acc,
            )
            dx += a.s_c2
            if self.layer_done_hook is not None:
                self.layer_done_hook(layer)
        if masks is not None:
            dx *= masks["emb"].reshape(dx.shape)
            dx *= 1.0 / (1.0 - cfg.dropout)
        g["wpe"][:T] += dx.reshape(B, T, -1).sum(axis=0)
        np.add.at(g["wte"], idx.reshape(-1), dx)

    def zero_grad(self) -> None:
        """Start a new accumulation. Lazily: the next training forward/backward overwrites every
        gradient it produces instead of adding to it (no zeroing pass, no read-add-write pass);
        only the rows no backward writes (positions beyond T, the vocabulary padding) are zeroed."""
        V = self.cfg.vocab_size
        self.g["wpe"][:] = 0.0
        self.g["wte"][V:] = 0.0
        self._grads_stale = True

    def use_grad_buffer(self, buf: np.ndarray) -> None:
        """Accumulate gradients into `buf` from now on (e.g. memory shared with the other ranks)."""
        self.g = self._flat_views(buf, "gradient")
        self.grads = buf

    def use_param_buffer(self, buf: np.ndarray) -> None:
        """Read and update parameters in `buf` from now on (it must hold them already)."""
        self.p = self._flat_views(buf, "parameter")
        self.params = buf

    def _flat_views(self, buf: np.ndarray, what: str) -> dict[str, np.ndarray]:
        if buf.shape != (self.layout.size,) or buf.dtype != self.dtype:
            raise ValueError(f"{what} buffer {buf.dtype}{buf.shape}, "
                             f"expected {self.dtype}({self.layout.size},)")
        return self.layout.views(buf)

    # ------------------------------------------------------------------ inference with a KV cache
    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        return KVCache(self.cfg, batch, max_len or self.cfg.block_size, self.dtype)

    def forward_cached(self, idx: np.ndarray, cache: KVCache) -> np.ndarray:
        """Logits (B, Tn, V) for the new tokens idx (B, Tn) at positions cache.length.., appending
        their keys and values to the cache: each new token costs one position, not a full pass."""
        cfg, p = self.cfg, self.p
        B, Tn = idx.shape
        t0 = cache.length
        if t0 + Tn > cache.max_len:
            raise ValueError(f"KV cache full: {t0} + {Tn} > {cache.max_len} positions")
        C, nh = cfg.n_embd, cfg.n_head
        hs = C // nh
        x = p["wte"][idx.reshape(-1)] + np.tile(p["wpe"][t0 : t0 + Tn], (B, 1))
        xhat = np.empty_like(x)
        h = np.empty_like(x)
        t_all = np.arange(t0 + Tn)
        t_new = np.arange(t0, t0 + Tn)
        for layer in range(cfg.n_layer):
            lp = f"h.{layer}."
            ops.layernorm_forward(x, p[lp + "ln_1.weight"], p[lp + "ln_1.bias"], h, xhat)
            qkv = h @ p[lp + "attn.c_attn.weight"] + p[lp + "attn.c_attn.bias"]
            qkv = qkv.reshape(B, Tn, 3, nh, hs).transpose(2, 0, 3, 1, 4)
            cache.k[layer, :, :, t0 : t0 + Tn] = qkv[1]
            cache.v[layer, :, :, t0 : t0 + Tn] = qkv[2]
            k = cache.k[layer, :, :, : t0 + Tn]
            v = cache.v[layer, :, :, : t0 + Tn]
            att = (qkv[0] @ k.swapaxes(-1, -2)) * (1.0 / math.sqrt(hs))
            blocked = t_all[None, :] > t_new[:, None]
            w = cfg.layer_window(layer)
            if w is not None:
                blocked |= t_all[None, :] <= t_new[:, None] - w
            att[..., blocked] = -np.inf
            ops.softmax_lastaxis_(att)
            y = (att @ v).transpose(0, 2, 1, 3).reshape(B * Tn, C)
            x += y @ p[lp + "attn.c_proj.weight"] + p[lp + "attn.c_proj.bias"]
            ops.layernorm_forward(x, p[lp + "ln_2.weight"], p[lp + "ln_2.bias"], h, xhat)
            f = h @ p[lp + "mlp.c_fc.weight"] + p[lp + "mlp.c_fc.bias"]
            x += (
                ops.gelu_forward(f, np.empty_like(f)) @ p[lp + "mlp.c_proj.weight"]
                + p[lp + "mlp.c_proj.bias"]
            )
        ops.layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"], h, xhat)
        cache.length = t0 + Tn
        return (h @ p["wte"][: cfg.vocab_size].T).reshape(B, Tn, cfg.vocab_size)


class KVCache:
    """Keys and values of every layer for positions [0, length), per sequence in the batch."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: np.dtype):
        hs = cfg.n_embd // cfg.n_head
        shape = (cfg.n_layer, batch, cfg.n_head, max_len, hs)
        self.k = np.zeros(shape, dtype)
        self.v = np.zeros(shape, dtype)
        self.length = 0
        self.max_len = max_len

    def reorder(self, rows: np.ndarray) -> None:
        """Keep sequence rows[i] as row i (beam search reshuffles its beams)."""
        self.k = self.k[:, rows]
        self.v = self.v[:, rows]
