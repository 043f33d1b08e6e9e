"""Parameters in and out of the ecosystem's formats: Hugging Face GPT-2 (state dict names,
safetensors folders, hub ids) and llm.c's .bin checkpoints.

Our per-tensor names are Hugging Face's without the "transformer." prefix, and our matmul
weights are stored (in, out) like its Conv1D, so the HF mapping is a rename plus vocab padding.
llm.c stores the same tensors stacked over layers and its matmul weights (out, in), so that
mapping is a transpose per layer.

Loading goes through open_init: the source's config and its tensors' names and shapes first, then
InitSource.fill streams the tensors one at a time (safetensors and llm.c files memory-mapped, a
distgpt checkpoint's shards by byte range) into the destination, float32 or bf16 bits (a LoRA run's
frozen base in shared memory), never holding a whole float32 copy beside it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from distgpt import bf16
from distgpt.config import SHAPE_KEYS
from distgpt.fileio import atomic_write, fsync_dir, write_json_atomic
from distgpt.model import BLOCK_PARAMS, Layout, ModelConfig

if TYPE_CHECKING:                   # lora.py builds on model.py, as this module does
    from distgpt.lora import LoraLayout


class WeightsError(ValueError):
    """A weights file or folder that cannot be read or does not fit. One line, ready to print."""


LLMC_MAGIC = 20240326
LLMC_VERSIONS = {3: "float32", 5: "bfloat16"}  # llm.c's train_gpt2.py write_model: both pad the vocab
LLMC_HEADER_INTS = 256
# save_llmc's signature in the header's last int, which llm.c neither reads nor writes (its header
# uses ints 0-7, the rest are zeros): it tells export that a file at --out is its own earlier output,
# which it may replace, and not an llm.c checkpoint trained elsewhere
LLMC_WRITER_TAG = int.from_bytes(b"dgpt", "little")

# what the file's config must say for our forward pass to compute the same function
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


# ----------------------------------------------------------------------------------------------------
# state dicts


def hf_name(name: str) -> str:
    return f"transformer.{name}"


def to_hf_state_dict(layout: Layout, params: np.ndarray) -> dict[str, np.ndarray]:
    """Our flat params -> {hf name: array} (unpadded vocab; lm_head is tied to wte and not listed)."""
    views = layout.views(params)
    out = {hf_name(n): np.ascontiguousarray(v) for n, v in views.items()}
    out["transformer.wte.weight"] = np.ascontiguousarray(views["wte"][: layout.cfg.vocab_size])
    del out["transformer.wte"]
    out["transformer.wpe.weight"] = out.pop("transformer.wpe")
    return out


def from_hf_state_dict(layout: Layout, state: dict[str, np.ndarray], params: np.ndarray) -> None:
    """Fill our flat params from a Hugging Face GPT-2 state dict (numpy arrays)."""
    views = layout.views(params)
    cfg = layout.cfg
    for name, view in views.items():
        key = {"wte": "transformer.wte.weight", "wpe": "transformer.wpe.weight"}.get(name, hf_name(name))
        if key not in state:
            raise KeyError(f"weights: tensor {key!r} missing from the checkpoint")
        src = np.asarray(state[key])
        if name == "wte":
            if src.shape != (cfg.vocab_size, cfg.n_embd):
                raise ValueError(
                    f"weights: {key} has shape {src.shape}, expected {(cfg.vocab_size, cfg.n_embd)}"
                )
            view[: cfg.vocab_size] = src
            view[cfg.vocab_size :] = 0.0
            continue
        if name == "wpe" and src.shape[0] >= view.shape[0]:
            src = src[: view.shape[0]]  # a shorter block_size than the checkpoint's is allowed
        if src.shape != view.shape:
            raise ValueError(f"weights: {key} has shape {tuple(src.shape)}, expected {view.shape}")
        view[...] = src


# ----------------------------------------------------------------------------------------------------
# loading: any source -> (ModelConfig, flat float32 params)


def check_shape(user: dict[str, int], file_cfg: ModelConfig, source: str) -> None:
    """Raise if a value the user set disagrees with the file. Only the given keys are compared;
    block_size may be smaller than the file's (the position table is truncated), not larger."""
    for key, value in user.items():
        have = getattr(file_cfg, key)
        if key == "block_size":
            if value > have:
                raise WeightsError(
                    f"model.block_size is {value} in the config but {source} has only {have} positions"
                )
        elif value != have:
            raise WeightsError(f"model.{key} is {value} in the config but {have} in {source}")


class InitSource:
    """Weights to start from, opened: the model config they imply (`cfg`) and their tensors, read one
    at a time when fill() asks (memory-mapped or a byte range of the file each), so that filling a
    buffer never holds more than that buffer and one tensor. Every tensor's name and shape was
    checked when the source was opened."""

    def __init__(self, spec: str, cfg: ModelConfig, state: _LazyState):
        self.spec, self.cfg, self._state = spec, cfg, state

    def fill(self, dest: np.ndarray, digest: bool = False) -> str | None:
        """Write the weights into `dest`, a flat buffer in Layout(cfg): float32 values, or bf16 bits
        (uint16, each value rounded to nearest even) for a base held in bf16. With `digest`: the
        sha256 of the float32 values in layout order as read (the vocabulary padding as zeros),
        whatever dest holds: the base's identity for a LoRA checkpoint."""
        layout = Layout(self.cfg)
        if dest.shape != (layout.size,) or dest.dtype not in (np.float32, np.uint16):
            raise ValueError(f"fill: a {dest.dtype}{dest.shape} buffer, expected float32 or uint16 "
                             f"({layout.size},)")
        h = hashlib.sha256() if digest else None
        V = self.cfg.vocab_size
        for name, view in layout.views(dest).items():
            src = np.ascontiguousarray(self._state.load(_state_key(name)), np.float32)
            if name == "wpe":
                src = src[: view.shape[0]]   # a shorter block_size than the file's
            rows = view[:V] if name == "wte" else view
            if dest.dtype == np.uint16:
                bf16.to_bf16(src, out=rows)
            else:
                rows[...] = src
            if h is not None:
                h.update(src)
            if name == "wte":
                view[V:] = 0
                if h is not None:
                    h.update(bytes(4 * view[V:].size))
            del src
        return None if h is None else h.hexdigest()


def open_init(spec: str, cfg: ModelConfig | None = None, *, check: Iterable[str] = ()) -> InitSource:
    """init_from, opened (see load_init for `cfg` and `check`): a Hugging Face folder, a hub id, an
    llm.c .bin, or a distgpt checkpoint folder or out_dir (its newest checkpoint; a model pretrained
    with distgpt). Reads the config and the tensors' names and shapes, no weights."""
    ckpt = _distgpt_checkpoint(spec)
    if ckpt is not None:
        file_cfg, state = _read_checkpoint(ckpt, spec)
    else:
        path = _resolve(spec)
        if path.is_file():
            file_cfg, state = _read_llmc(path)
        else:
            file_cfg, state = _read_hf_folder(path)
    model_cfg = file_cfg
    if cfg is not None:
        check_shape({k: getattr(cfg, k) for k in check}, file_cfg, spec)
        check_shape({"block_size": cfg.block_size}, file_cfg, spec)
        model_cfg = cfg.model_copy(update={k: getattr(file_cfg, k) for k in SHAPE_KEYS})
    _check_tensors(Layout(model_cfg), state, spec)
    return InitSource(spec, model_cfg, state)


def load_init(
    spec: str, cfg: ModelConfig | None = None, *, check: Iterable[str] = ()
) -> tuple[ModelConfig, np.ndarray]:
    """Weights to start from: a Hugging Face folder (config.json + safetensors), a hub id such as
    "gpt2", an llm.c .bin, or a distgpt checkpoint. The model's shape comes from the file.

    With `cfg`, its other fields (dropout, vocab_multiple, attention, window, and block_size, which
    may be smaller than the file's) are kept. Its shape keys are replaced by the file's, except that
    the keys named in `check` must agree with the file (the training loop instead calls check_shape
    with the keys the user set). Returns the config and a flat float32 vector in our layout.
    """
    source = open_init(spec, cfg, check=check)
    params = np.zeros(Layout(source.cfg).size, np.float32)
    source.fill(params)
    return source.cfg, params


def _state_key(name: str) -> str:
    """Our layout's tensor name -> its Hugging Face state-dict key."""
    return {"wte": "transformer.wte.weight", "wpe": "transformer.wpe.weight"}.get(name, hf_name(name))


def _check_tensors(layout: Layout, state: _LazyState, spec: str) -> None:
    """Every tensor the layout needs is in `state` with a shape that fits (from_hf_state_dict's rules)."""
    cfg = layout.cfg
    for e in layout.entries:
        key = _state_key(e.name)
        if key not in state.shapes:
            raise WeightsError(f"{spec}: tensor {key!r} missing from the checkpoint")
        shape = tuple(state.shapes[key])
        want = tuple(e.shape)
        if e.name == "wte":
            want = (cfg.vocab_size, cfg.n_embd)
        elif e.name == "wpe" and len(shape) == 2 and shape[0] >= want[0]:
            shape = (want[0], *shape[1:])
        if shape != want:
            raise WeightsError(f"{spec}: {key} has shape {shape}, expected {want}")


class _LazyState:
    """A weights file's tensors by Hugging Face key: their shapes now, their float32 values when
    load(key) is called (one tensor each time; nothing is kept)."""

    def __init__(self) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._loaders: dict[str, Callable[[], np.ndarray]] = {}

    def add(self, key: str, shape: Iterable[int], loader: Callable[[], np.ndarray]) -> None:
        self.shapes[key] = tuple(int(d) for d in shape)
        self._loaders[key] = loader

    def load(self, key: str) -> np.ndarray:
        return self._loaders[key]()

    def rename(self, old: str, new: str) -> None:
        self.shapes[new] = self.shapes.pop(old)
        self._loaders[new] = self._loaders.pop(old)

    def drop(self, key: str) -> None:
        del self.shapes[key], self._loaders[key]

    def materialise(self) -> dict[str, np.ndarray]:
        return {k: self.load(k) for k in self.shapes}


def load_for_inference(spec: str) -> tuple[ModelConfig, np.ndarray, str | None]:
    """Any weights worth sampling from or exporting: a distgpt checkpoint folder or out_dir (its
    newest checkpoint), or anything load_init reads. Returns (config, params, tokenizer name or None).
    A LoRA checkpoint gives its base (read again from the source it records, which must still hold
    the same weights) with the adapters merged in."""
    path = Path(spec).expanduser()
    if is_checkpoint_dir(path):
        from distgpt.checkpoint import read_params

        try:
            manifest, params = read_params(str(path))
        except Exception as e:  # its errors vary; we only relay them, on one line
            raise WeightsError(
                f"{spec}: not a Hugging Face folder (no config.json) nor a readable distgpt checkpoint: {e}"
            ) from None
        meta = manifest.get("meta", {})
        if meta.get("lora"):            # its params are the adapters: checked as export checks them
            ck = _lora_checkpoint(spec, manifest, params, None)
            return ck.cfg, merged_lora(ck), ck.tokenizer
        cfg = _checkpoint_model(meta, spec)
        return cfg, np.ascontiguousarray(params, dtype=np.float32), meta.get("tokenizer")
    cfg, params = load_init(spec)
    return cfg, params, None


@dataclass
class LoraCheckpoint:
    """A LoRA run's checkpoint as read: the run's model config (the base's shape), the adapters' layout
    and flat vector, where its base is and the checksum training recorded for it."""

    spec: str
    cfg: ModelConfig
    layout: LoraLayout
    adapters: np.ndarray
    base: str
    base_sha256: str | None
    tokenizer: str | None


def lora_checkpoint(spec: str, base: str | None = None) -> LoraCheckpoint:
    """A LoRA run's checkpoint (folder or out_dir): its adapters and what they need. `base` replaces
    the base source that its manifest records (the base moved since training). WeightsError, one line,
    for anything missing or inconsistent."""
    from distgpt import checkpoint

    try:
        manifest, _, adapters = checkpoint.read_lora(spec)
    except Exception as e:  # its errors vary (CheckpointError, OSError); relayed on one line
        raise WeightsError(f"{spec}: not a readable distgpt checkpoint: {e}") from None
    return _lora_checkpoint(spec, manifest, adapters, base)


def _lora_checkpoint(spec: str, manifest: dict, adapters: np.ndarray, base: str | None) -> LoraCheckpoint:
    """lora_checkpoint's checks, on a LoRA checkpoint's manifest and flat adapters as read."""
    from distgpt.lora import LoraLayout

    lcfg = manifest["meta"]["lora"]
    where = f"{spec}: the checkpoint's meta lora"
    if not isinstance(lcfg, dict):
        raise WeightsError(f"{where} is {lcfg!r}, expected a mapping of rank, alpha, targets, base")
    missing = [k for k in ("rank", "alpha", "targets", "base") if k not in lcfg]
    if missing:
        raise WeightsError(f"{where} has no {', '.join(missing)}")
    recorded = lcfg["base"]
    source = recorded.get("source") if isinstance(recorded, dict) else None
    if not isinstance(source, str) or not source:
        raise WeightsError(f"{where}.base is {recorded!r}, expected {{source: the weights it was trained "
                           "on, sha256: their checksum}")
    meta = manifest["meta"]
    saved = (meta.get("config") or {}).get("model") if isinstance(meta.get("config"), dict) else None
    if not isinstance(saved, dict) or not saved:
        raise WeightsError(f"{spec}: the checkpoint's meta has no config.model (the shape of the base)")
    cfg = model_config({k: v for k, v in saved.items() if k in ModelConfig.model_fields},
                       f"{spec}: the checkpoint's model config")
    try:
        layout = LoraLayout(cfg, lcfg["rank"], lcfg["alpha"], lcfg["targets"], lcfg.get("dropout", 0.0))
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{where}: {e}") from None
    adapters = np.ascontiguousarray(adapters, dtype=np.float32)
    if adapters.shape != (layout.size,) or manifest.get("layout") != layout.describe():
        raise WeightsError(f"{spec}: its {adapters.size} adapter values and layout do not fit the LoRA its "
                           f"meta describes (rank {layout.rank}, targets {', '.join(layout.targets)}, "
                           f"{cfg.n_layer} layers, n_embd {cfg.n_embd}: {layout.size} values)")
    sha = recorded.get("sha256")
    return LoraCheckpoint(spec, cfg, layout, adapters, base or source,
                          sha if isinstance(sha, str) else None, meta.get("tokenizer"))


def merged_lora(ck: LoraCheckpoint) -> np.ndarray:
    """A LoRA checkpoint's model as one flat float32 vector: its base (lora_base, checked against
    the recorded checksum) with the adapters merged in place (lora.LoraLayout.merge_into: peft's
    merge), so that one model's worth of memory is held."""
    params = lora_base(ck.spec, ck.cfg, ck.base, ck.base_sha256)
    ck.layout.merge_into(params, ck.adapters)
    return params


def lora_base(spec: str, cfg: ModelConfig, source: str, sha256: str | None) -> np.ndarray:
    """The float32 parameters of the base that LoRA checkpoint `spec` was trained on, in its model's
    layout (cfg: its block_size and vocabulary padding), streamed from `source` as training loaded
    them (open_init: an HF folder or hub id, an llm.c .bin, a distgpt checkpoint), and checked
    against the sha256 the checkpoint records (InitSource.fill's, over the float32 values in layout
    order). Every failure is one WeightsError line naming the checkpoint and the base."""
    try:
        init = open_init(source, cfg, check=SHAPE_KEYS)
        params = np.zeros(Layout(init.cfg).size, np.float32)
        digest = init.fill(params, digest=True)
    except (ValueError, KeyError, OSError) as e:     # WeightsError among them
        msg = str(e) if isinstance(e, OSError) or not e.args else str(e.args[0])
        hint = "" if Path(source).expanduser().exists() else "; pass --base to point at it"
        raise WeightsError(f"{spec}: cannot load the LoRA base it was trained on ({msg}){hint}") from None
    if sha256 is not None and digest != sha256:
        raise WeightsError(
            f"{spec}: its LoRA base {source} has changed since training (sha256 {digest[:16]}, the "
            f"checkpoint records {sha256[:16]}): the adapters fit only the weights they were trained "
            "on; pass --base to point at those")
    return params


def _checkpoint_model(meta: dict, spec: str) -> ModelConfig:
    saved = meta.get("config", {}).get("model", {})
    model = {k: v for k, v in saved.items() if k in ModelConfig.model_fields}
    return model_config(model, f"{spec}: the checkpoint's model config")


def _distgpt_checkpoint(spec: str) -> Path | None:
    """`spec` as a distgpt checkpoint folder or out_dir, or None when it is not one."""
    from distgpt.checkpoint import MANIFEST

    path = Path(spec).expanduser()
    if not is_checkpoint_dir(path):
        return None
    return path if (path / MANIFEST).is_file() or (path / "ckpt").is_dir() else None


def _read_checkpoint(path: Path, spec: str) -> tuple[ModelConfig, _LazyState]:
    """A distgpt checkpoint as weights to start from: its model config and its tensors, each read
    from the shards' byte range when loaded (a model pretrained with distgpt, fine-tuned next)."""
    from distgpt.checkpoint import param_reader

    try:
        manifest, read = param_reader(path)
    except Exception as e:  # CheckpointError and the file system's errors: relayed on one line
        raise WeightsError(f"{spec}: not a readable distgpt checkpoint: {e}") from None
    meta = manifest["meta"]
    if meta.get("lora"):
        raise WeightsError(f"{spec}: a LoRA checkpoint (adapters on a frozen base), not a whole model: "
                           "export it merged (distgpt-export --format hf) and start from that folder")
    cfg = _checkpoint_model(meta, spec)
    state = _LazyState()
    for e in manifest["layout"]:
        shape, offset = tuple(e["shape"]), e["offset"]
        if e["name"] == "wte":
            shape = (cfg.vocab_size, shape[1])        # without the vocabulary padding
        size = math.prod(shape)
        state.add(_state_key(e["name"]), shape,
                  lambda o=offset, n=size, s=shape: read(o, o + n).reshape(s))
    return cfg, state


def is_checkpoint_dir(path: Path) -> bool:
    """Whether a folder is read as a distgpt checkpoint folder or out_dir: a folder that is not a
    Hugging Face one (no config.json, no sharded-safetensors index)."""
    return path.is_dir() and not (path / "config.json").exists() and not _has_hf_index(path)


def _has_hf_index(folder: Path) -> bool:
    return (folder / "model.safetensors.index.json").exists()


def _looks_like_hub_id(spec: str) -> bool:
    # "gpt2", "openai-community/gpt2-medium"; never an absolute, home or dotted relative path
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", spec) is not None and not spec.endswith(
        (".bin", ".safetensors", ".json")
    )


def _resolve(spec: str) -> Path:
    """A local file (llm.c) or a folder holding config.json; hub ids are fetched (or found in the
    local hub cache when offline) into such a folder."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix == ".safetensors" or path.name == "config.json":
            path = path.parent  # the user pointed into a Hugging Face folder
        else:
            return path
    if path.is_dir():
        if not (path / "config.json").exists():
            raise WeightsError(
                f"{spec}: folder has no config.json (expected a Hugging Face GPT-2 folder as "
                "save_pretrained writes it, or an llm.c .bin file)"
            )
        return path
    if not _looks_like_hub_id(spec):
        raise WeightsError(f"{spec}: no such file or folder")
    return _snapshot(spec)


def _snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise WeightsError(
            f"{repo_id}: not a local file or folder, and huggingface_hub is not installed to fetch it"
        ) from None
    try:
        folder = snapshot_download(repo_id, allow_patterns=["config.json", "*.safetensors", "*.json"])
    except Exception as e:  # offline, unknown repo, no cache: all end the same way
        raise WeightsError(
            f"{repo_id}: no such file or folder, and fetching it as a Hugging Face hub id failed "
            f"({type(e).__name__}; offline and not in the hub cache?): download it first "
            f"(`hf download {repo_id}`) or pass a local folder"
        ) from None
    return Path(folder)


def model_config(fields: dict, source: str) -> ModelConfig:
    """ModelConfig(**fields), its validation errors as one WeightsError line naming `source`."""
    from pydantic import ValidationError

    try:
        return ModelConfig(**fields)
    except ValidationError as e:
        reasons = "; ".join(str(err.get("msg", err)).removeprefix("Value error, ") for err in e.errors())
        raise WeightsError(f"{source}: {reasons}") from None


def _file_config(raw: dict, source: str) -> ModelConfig:
    """ModelConfig from a GPT-2 config.json, refusing variants our forward pass does not compute."""
    if not isinstance(raw, dict):
        raise WeightsError(f"{source}: config.json holds a {type(raw).__name__}, expected a JSON object")
    if raw.get("model_type", "gpt2") != "gpt2":
        raise WeightsError(f"{source}: model_type is {raw.get('model_type')!r}, only 'gpt2' is supported")
    missing = [k for k in ("n_embd", "n_head", "n_layer", "vocab_size") if k not in raw]
    if "n_positions" not in raw and "n_ctx" not in raw:
        missing.append("n_positions")
    if missing:
        raise WeightsError(f"{source}: config.json has no {', '.join(missing)} (not a GPT-2 config?)")
    unsupported = {
        "activation_function": (raw.get("activation_function", "gelu_new"), GELU_TANH),
        "scale_attn_weights": (raw.get("scale_attn_weights", True), (True,)),
        "scale_attn_by_inverse_layer_idx": (raw.get("scale_attn_by_inverse_layer_idx", False), (False,)),
        "add_cross_attention": (raw.get("add_cross_attention", False), (False,)),
        "tie_word_embeddings": (raw.get("tie_word_embeddings", True), (True,)),
    }
    for key, (value, ok) in unsupported.items():
        if value not in ok:
            raise WeightsError(f"{source}: config.json {key} = {value!r} is not supported (need {ok[0]!r})")
    C = raw["n_embd"]
    if raw.get("n_inner") not in (None, 4 * C):
        raise WeightsError(
            f"{source}: config.json n_inner = {raw['n_inner']} is not supported (need 4 * n_embd)"
        )
    if not math.isclose(raw.get("layer_norm_epsilon", 1e-5), 1e-5):
        raise WeightsError(
            f"{source}: config.json layer_norm_epsilon = {raw['layer_norm_epsilon']} (need 1e-5)"
        )
    fields = dict(n_layer=raw["n_layer"], n_head=raw["n_head"], n_embd=C,
                  block_size=raw.get("n_positions", raw.get("n_ctx")), vocab_size=raw["vocab_size"])
    return model_config(fields, f"{source}/config.json")


def _read_hf_folder(folder: Path) -> tuple[ModelConfig, _LazyState]:
    try:
        raw = json.loads((folder / "config.json").read_bytes())
    except (UnicodeDecodeError, ValueError) as e:
        raise WeightsError(f"{folder / 'config.json'}: not valid JSON ({e})") from None
    file_cfg = _file_config(raw, str(folder))
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").exists():
        files = [folder / "model.safetensors"]
    elif index.exists():
        with open(index) as f:
            files = [folder / name for name in sorted(set(json.load(f)["weight_map"].values()))]
    else:
        hint = (
            " (only PyTorch weights: re-save them with safe_serialization)"
            if any(folder.glob("*.bin"))
            else ""
        )
        raise WeightsError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")
    state = _LazyState()
    for file in files:
        _lazy_safetensors(file, state)
    return file_cfg, _normalise_hf_names(state, str(folder))


def _normalise_hf_names(state: _LazyState, source: str) -> _LazyState:
    """GPT2LMHeadModel saves "transformer.*"; GPT2Model (e.g. the hub's gpt2) saves bare names and the
    attention-mask buffers. Map both onto the former and drop the buffers. An lm_head stored beside
    wte must equal it (compared when wte is read)."""
    for name in list(state.shapes):
        if re.search(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$", name):
            state.drop(name)  # the causal mask, not a parameter
        elif name != "lm_head.weight" and not name.startswith("transformer."):
            state.rename(name, hf_name(name))
    if "lm_head.weight" in state.shapes:
        head = state._loaders.pop("lm_head.weight")
        del state.shapes["lm_head.weight"]
        wte_key = "transformer.wte.weight"
        if wte_key in state.shapes:
            wte = state._loaders[wte_key]

            def tied() -> np.ndarray:
                w = wte()
                if not np.array_equal(head(), w):
                    raise WeightsError(f"{source}: lm_head.weight differs from wte; untied heads are not "
                                       "supported")
                return w
            state._loaders[wte_key] = tied
    return state


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as float32."""
    state = _LazyState()
    _lazy_safetensors(path, state)
    return state.materialise()


def _lazy_safetensors(path: Path, state: _LazyState) -> None:
    """The tensors of one safetensors file into `state`, each read when loaded: float32 and float16
    through safetensors' memory map, bfloat16 (NumPy has none) from its raw bytes (the format: u64
    header length, JSON header, then data)."""
    from safetensors import safe_open

    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:  # checked first: garbage would ask for a header of exabytes
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise WeightsError(f"{path}: not a safetensors file ({e})") from None
    try:
        with safe_open(str(path), framework="np") as f:
            names = list(f.keys())
    except Exception as e:  # safetensors' own error type varies by version
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None

    def loader(name: str, info: dict) -> Callable[[], np.ndarray]:
        if info["dtype"] == "BF16":
            lo, hi = info["data_offsets"]
            return lambda: _bf16_to_f32(np.fromfile(path, dtype="<u2", count=(hi - lo) // 2,
                                                    offset=8 + n + lo)).reshape(info["shape"])

        def read() -> np.ndarray:
            with safe_open(str(path), framework="np") as f:
                return f.get_tensor(name).astype(np.float32, copy=False)
        return read
    for name in names:
        state.add(name, header[name]["shape"], loader(name, header[name]))


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32
    return (raw.astype(np.uint32) << 16).view(np.float32)


# ----------------------------------------------------------------------------------------------------
# llm.c .bin


def _llmc_tensors(L: int, C: int, Vp: int, maxT: int) -> list[tuple[str, tuple[int, ...]]]:
    """llm.c's parameter order and shapes (train_gpt2.c ParameterTensors): the embeddings, then each
    block tensor of model.BLOCK_PARAMS stacked over the layers (matmul weights as (out, in)), then ln_f."""
    stacked = [(name, (L, *shape(C)[::-1])) for name, shape, _ in BLOCK_PARAMS]
    return [("wte", (Vp, C)), ("wpe", (maxT, C)), *stacked, ("ln_f.weight", (C,)), ("ln_f.bias", (C,))]


def _read_llmc(path: Path) -> tuple[ModelConfig, _LazyState]:
    header = np.fromfile(path, dtype="<i4", count=LLMC_HEADER_INTS)
    if header.size < LLMC_HEADER_INTS or header[0] != LLMC_MAGIC:
        raise WeightsError(f"{path}: not an llm.c model checkpoint (bad magic number)")
    version = int(header[1])
    if version not in LLMC_VERSIONS:
        raise WeightsError(f"{path}: llm.c checkpoint version {version} is not supported (need 3 or 5)")
    maxT, V, L, NH, C, Vp = (int(x) for x in header[2:8])
    tensors = _llmc_tensors(L, C, Vp, maxT)
    count = sum(math.prod(s) for _, s in tensors)
    itemsize = 4 if version == 3 else 2
    expected = 4 * LLMC_HEADER_INTS + count * itemsize
    if path.stat().st_size != expected:
        raise WeightsError(
            f"{path}: {path.stat().st_size} bytes, but its header describes {expected} (truncated file?)"
        )
    # memory-mapped: each tensor is read (and, version 5, widened) when it is loaded
    flat = np.memmap(path, dtype="<f4" if version == 3 else "<u2", mode="r", offset=4 * LLMC_HEADER_INTS,
                     shape=(count,))
    arrays, offset = {}, 0
    for name, shape in tensors:
        arrays[name] = flat[offset : offset + math.prod(shape)].reshape(shape)
        offset += math.prod(shape)

    def widen(a: np.ndarray) -> np.ndarray:
        return np.asarray(a, np.float32) if version == 3 else _bf16_to_f32(np.ascontiguousarray(a))

    state = _LazyState()
    wte = arrays.pop("wte")
    state.add("transformer.wte.weight", (V, C), lambda: widen(wte[:V]))
    for ours, key in (("wpe", "transformer.wpe.weight"), ("ln_f.weight", "transformer.ln_f.weight"),
                      ("ln_f.bias", "transformer.ln_f.bias")):
        a = arrays.pop(ours)
        state.add(key, a.shape, lambda a=a: widen(a))
    for name, stacked in arrays.items():
        matmul = stacked.ndim == 3  # llm.c multiplies by (out, in) weights; ours are (in, out)
        for layer in range(L):
            t = stacked[layer].T if matmul else stacked[layer]
            state.add(f"transformer.h.{layer}.{name}", t.shape, lambda t=t: widen(t))
    return ModelConfig(n_layer=L, n_head=NH, n_embd=C, block_size=maxT, vocab_size=V), state


def save_llmc(path: str | os.PathLike, cfg: ModelConfig, params: np.ndarray) -> None:
    """Write an llm.c version-3 (float32) checkpoint, atomically: readers see the old file or the new one."""
    layout = Layout(cfg)
    p = layout.views(np.asarray(params, dtype=np.float32))
    L, C = cfg.n_layer, cfg.n_embd
    header = np.zeros(LLMC_HEADER_INTS, "<i4")
    header[:8] = [LLMC_MAGIC, 3, cfg.block_size, cfg.vocab_size, L, cfg.n_head, C, cfg.padded_vocab]
    header[-1] = LLMC_WRITER_TAG
    with atomic_write(path) as f:
        f.write(header.tobytes())
        for name, _ in _llmc_tensors(L, C, cfg.padded_vocab, cfg.block_size):
            if name in ("wte", "wpe", "ln_f.weight", "ln_f.bias"):
                f.write(np.ascontiguousarray(p[name], "<f4").tobytes())
                continue
            for layer in range(L):
                t = p[f"h.{layer}.{name}"]
                f.write(np.ascontiguousarray(t.T if t.ndim == 2 else t, "<f4").tobytes())


def written_by_save_llmc(path: str | os.PathLike) -> bool:
    """Whether `path` is an llm.c checkpoint that save_llmc wrote (its header carries our tag)."""
    try:
        header = np.fromfile(path, dtype="<i4", count=LLMC_HEADER_INTS)
    except (OSError, ValueError):
        return False
    return header.size == LLMC_HEADER_INTS and header[0] == LLMC_MAGIC and header[-1] == LLMC_WRITER_TAG


# ----------------------------------------------------------------------------------------------------
# Hugging Face folder


def hf_config(cfg: ModelConfig) -> dict:
    """config.json for GPT2LMHeadModel. GPT-2's end-of-text is 50256; smaller vocabularies (e.g. the
    byte tokenizer's 257) put it last, where our tokenizers put it."""
    eot = 50256 if cfg.vocab_size > 50256 else cfg.vocab_size - 1
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "tie_word_embeddings": True,
        "use_cache": True,
        "dtype": "float32",
    }


HF_EXPORT_MARKER = ".distgpt-export.json"
HF_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
HF_EXPORT_FILES = ("config.json", "model.safetensors", *HF_TOKENIZER_FILES)


def gpt2_tokenizer_files(block_size: int) -> dict[str, bytes]:
    """GPT-2's tokenizer as a Hugging Face folder holds it: vocab.json and merges.txt are the bytes
    of GPT-2's encoder.json and vocab.bpe, the files tiktoken's "gpt2" encoding is built from.

    They are fetched through tiktoken's own loader, so they come from its cache (TIKTOKEN_CACHE_DIR)
    or its download, checked against the sha256 it pins: the constructor tiktoken registers for
    "gpt2" is run with its BPE-building step replaced by one that records which files it would read,
    and tiktoken.load.read_file_cached then reads them. No URL or hash is copied here, and nothing
    global is patched (a copy of the constructor gets its own globals)."""
    import types

    import tiktoken.load
    from tiktoken_ext import openai_public

    wanted: dict = {}

    def record(*args, **kwargs) -> dict:
        wanted.update(kwargs)
        return {}

    constructor = openai_public.gpt2
    copy = types.FunctionType(constructor.__code__, {**constructor.__globals__,
                                                      "data_gym_to_mergeable_bpe_ranks": record})
    copy()
    keys = ("vocab_bpe_file", "encoder_json_file")
    if not all(k in wanted for k in keys):  # a tiktoken whose gpt2 encoding is built differently
        raise WeightsError(f"tiktoken {getattr(tiktoken, '__version__', '?')}: cannot locate GPT-2's "
                           "encoder.json and vocab.bpe through its gpt2 constructor")
    try:
        merges = tiktoken.load.read_file_cached(wanted["vocab_bpe_file"], wanted.get("vocab_bpe_hash"))
        vocab = tiktoken.load.read_file_cached(wanted["encoder_json_file"], wanted.get("encoder_json_hash"))
    except Exception as e:  # offline without a cache fails deep inside requests
        raise WeightsError(
            "gpt2 tokenizer files: tiktoken could not load GPT-2's encoder.json / vocab.bpe (offline? point "
            f"TIKTOKEN_CACHE_DIR at a folder holding them): {type(e).__name__}"
        ) from None
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size, "add_prefix_space": False,
              **special}
    return {"vocab.json": vocab, "merges.txt": merges,
            "tokenizer_config.json": _json_bytes(config), "special_tokens_map.json": _json_bytes(special)}


def _json_bytes(obj: object) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ExportFolder:
    """A folder format that export writes (hf here; peft in distgpt/export.py), recognised as its own
    by a marker file listing the sha256 of every file it wrote: a folder is an earlier export when
    everything in it is the marker or a file the marker lists, with the contents export gave it.
    Recognising the file names alone would take a folder someone else saved (save_pretrained writes
    a config.json and model.safetensors too) or an exported file the user edited since for ours, and
    replacing either would lose their work. Folders exported before the marker existed are therefore
    not recognised: `--force` replaces them."""

    marker: str                 # the marker's file name
    kind: str                   # its "format" field
    files: tuple[str, ...]      # the names this format may write

    def read_marker(self, folder: Path) -> dict[str, list[str]] | None:
        """{file name: sha256 values export wrote under that name}, or None when there is no marker
        of ours (then nothing in the folder counts as written by export)."""
        try:
            marker = json.loads((folder / self.marker).read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            return None
        ours = isinstance(marker, dict) and marker.get("format") == self.kind
        files = marker.get("files") if ours else None
        if not isinstance(files, dict):
            return None
        return {name: [h for h in hashes if isinstance(h, str)] for name, hashes in files.items()
                if name in self.files and isinstance(hashes, list)}

    def written(self, folder: Path, name: str, marker: dict[str, list[str]] | None) -> bool:
        path = folder / name
        return (marker is not None and name in marker and path.is_file() and not path.is_symlink()
                and _sha256_file(path) in marker[name])

    def conflicts(self, folder: str | os.PathLike) -> list[str]:
        """What in `folder` export did not write (names, sorted); [] for a missing or empty folder
        or an earlier export of this format."""
        folder = Path(folder)
        if not folder.is_dir():
            return []
        marker = self.read_marker(folder)
        return sorted(p.name for p in folder.iterdir()
                      if p.name != self.marker and not self.written(folder, p.name, marker))

    def write(self, folder: Path, files: dict[str, bytes]) -> None:
        """`files` into `folder` (made if missing), each to a temporary name renamed over its own;
        nothing else is touched but files of an earlier export of this format (listed in its marker,
        unchanged) that this one does not write. The marker is written first listing the old and the
        new contents, and last listing only the new: a crash in between leaves a folder that is
        still recognised as an export."""
        new = {name: [hashlib.sha256(data).hexdigest()] for name, data in files.items()}
        folder.mkdir(parents=True, exist_ok=True)
        old = self.read_marker(folder) or {}
        stale = [name for name in old if name not in files and self.written(folder, name, old)]
        self._write_marker(folder, {name: sorted(set(old.get(name, [])) | set(new.get(name, [])))
                                    for name in {*old, *new}})
        for name, data in files.items():
            with atomic_write(folder / name) as f:
                f.write(data)
        for name in stale:
            (folder / name).unlink()
        self._write_marker(folder, new)
        fsync_dir(folder)

    def _write_marker(self, folder: Path, files: dict[str, list[str]]) -> None:
        write_json_atomic(folder / self.marker,
                          {"format": self.kind, "version": 1, "files": dict(sorted(files.items()))})


HF_EXPORT = ExportFolder(HF_EXPORT_MARKER, "distgpt-hf-export", HF_EXPORT_FILES)


def hf_export_conflicts(folder: str | os.PathLike) -> list[str]:
    """What in `folder` an hf export did not write (ExportFolder.conflicts)."""
    return HF_EXPORT.conflicts(folder)


def save_hf(folder: str | os.PathLike, cfg: ModelConfig, params: np.ndarray,
            extra_files: dict[str, bytes] | None = None) -> None:
    """Write config.json + model.safetensors as GPT2LMHeadModel.save_pretrained does (lm_head is
    tied, so, like save_pretrained, it is not stored), plus `extra_files` (the tokenizer's files,
    names from HF_TOKENIZER_FILES), into `folder` (made if missing).

    Each file is written to a temporary name and renamed over its own name; nothing else in the
    folder is touched, except files of an earlier export (listed in its marker, unchanged) that this
    export does not write, e.g. the tokenizer files of a GPT-2-tokenizer model replaced by a
    bytes-tokenizer one, which would otherwise describe the wrong vocabulary. The marker is written
    first listing the old and the new contents, and last listing only the new: a crash in between
    leaves a folder that is still recognised as an export (hf_export_conflicts)."""
    if cfg.attention != "dense":
        raise WeightsError(f"model.attention = {cfg.attention!r} has no Hugging Face GPT-2 equivalent")
    from safetensors.numpy import save

    folder = Path(folder)
    extra_files = dict(extra_files or {})
    unknown = sorted(set(extra_files) - set(HF_TOKENIZER_FILES))
    if unknown:
        raise ValueError(f"save_hf: extra files {unknown} are not tokenizer files {HF_TOKENIZER_FILES}")
    state = to_hf_state_dict(Layout(cfg), np.asarray(params, dtype=np.float32))
    # safetensors' save() returns the bytes, so atomic_write can fsync them and report a full disk
    # (save_file writes from Rust, unsynced, and fails with a SafetensorError that hides the errno)
    files = {"model.safetensors": save(state, metadata={"format": "pt"}), **extra_files,
             "config.json": _json_bytes(hf_config(cfg))}  # config.json last, as save_pretrained
    HF_EXPORT.write(folder, files)


