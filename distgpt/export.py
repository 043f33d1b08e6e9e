"""Write a model's weights in another ecosystem's format.

    python -m distgpt.export --ckpt out --format hf --out gpt2-mine       # transformers folder
    python -m distgpt.export --ckpt out --format llmc --out gpt2_mine.bin  # llm.c checkpoint
    python -m distgpt.export --ckpt out --format peft --out adapter        # a LoRA run's adapters

--ckpt takes a distgpt checkpoint folder or out_dir (its newest checkpoint), or anything the
weights loader reads (a Hugging Face folder or hub id, an llm.c .bin), so this also converts
between those formats.

A LoRA run's checkpoint holds only the adapters; its manifest names the base they were trained on
(meta lora.base: the init_from source and a checksum). --format peft writes the adapters alone as
peft saves them (adapter_config.json + adapter_model.safetensors, for
`peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(BASE), DIR)`); --format hf and
llmc load the base and write it with the adapters merged in (W + alpha / r * (B @ A).T), a plain
GPT-2 that needs no peft. --base points at the base when it is no longer where training found it.

export never deletes or overwrites what it did not write. hf and peft: --out is a folder that must
be new or empty, or hold an earlier export of that format (recognised by the marker file export
writes into it); into any other folder only with --force, and even then only the files export
writes (hf: config.json, model.safetensors, the tokenizer's files; peft: adapter_config.json,
adapter_model.safetensors) are replaced: anything else there stays. Each format has its own
marker, so neither takes the other's files for its own. llmc: a file at --out is replaced only
when export wrote it, or with --force. A training run's own folders (out_dir,
its ckpt folder, a checkpoint) and the folders the weights are read from (a LoRA run's base
included) are refused in any case.

A GPT-2-tokenizer model's hf export also holds GPT-2's tokenizer (vocab.json, merges.txt and their
configs, the files tiktoken's gpt2 encoding is built from), so `AutoTokenizer.from_pretrained(DIR)`
works offline; a bytes-tokenizer model has no tokenizer files to write.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import numpy as np

from distgpt.cli import Parser, check_switches, fail, make_dirs, remove_new_dirs
from distgpt.model import Layout, ModelConfig

if TYPE_CHECKING:
    from distgpt.lora import LoraLayout
    from distgpt.weights import LoraCheckpoint

GPT2_VOCAB = 50257
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
# peft's own marker, beside (never instead of) an hf export's: each format recognises only the files
# it wrote itself, so neither replaces or deletes the other's
PEFT_MARKER = ".distgpt-peft-export.json"


def _fail(message: str) -> NoReturn:
    fail("export", message)


def _is_checkpoint(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == "distgpt-checkpoint"


def _run_folder_problem(folder: Path, out_dir_too: bool) -> str | None:
    """Why `folder` is one of a training run's folders, which export must not write into whatever
    the flags: a checkpoint, a ckpt folder, or a folder inside one of them (checkpoint rotation
    would delete what export put there), and, with out_dir_too, the run's out_dir itself (ckpt/ or
    metrics.jsonl inside), where an hf export's files would mix with the run's."""
    run = folder.is_dir() and ((folder / "ckpt").is_dir() or (folder / "metrics.jsonl").exists())
    if out_dir_too and run:
        return "is a training run's out_dir"
    for f in (folder, *folder.parents):
        ckpt_dir = f.name == "ckpt" and f.is_dir() and ((f / "latest").exists() or any(f.glob("step_*")))
        if ckpt_dir or (f.is_dir() and _is_checkpoint(f)):
            return f"{'is' if f == folder else 'is inside'} a training run's checkpoint folder {f}"
    return None


def _refuse_source(out: Path, source: str, flag: str) -> None:
    """--out must not be a folder (or file) the weights are read from, nor hold one."""
    resolved = out.resolve()
    src = Path(source).expanduser()
    if src.exists():
        src = src.resolve()
        if resolved == src or resolved in src.parents:
            _fail(f"--out {out} is the {flag} source {source} or holds it: export would write over "
                  "the weights it reads; pick another --out")


_FOLDER_FILES = {"hf": "config.json, model.safetensors, ...",
                 "peft": "adapter_config.json, adapter_model.safetensors"}


def _check_target(out: Path, fmt: str, source: str, force: bool) -> None:
    """Every refusal before the (slow) loading of the weights; one line each."""
    resolved = out.resolve()
    _refuse_source(out, source, "--ckpt")
    if fmt in ("hf", "peft"):
        problem = _run_folder_problem(resolved, out_dir_too=True)
        if problem:
            _fail(f"--out {out} {problem}: export into a new folder instead (e.g. {out / fmt})"
                  if "out_dir" in problem else f"--out {out} {problem}: export into a new folder instead")
        if out.exists() and not out.is_dir():
            _fail(f"--out {out} is a file; --format {fmt} writes a folder ({_FOLDER_FILES[fmt]})")
        if fmt == "hf":
            from distgpt.weights import hf_export_conflicts

            conflicts = hf_export_conflicts(out)
            writes = "config.json, model.safetensors and the tokenizer files"
        else:
            conflicts = peft_export_conflicts(out)
            writes = "adapter_config.json and adapter_model.safetensors"
        if conflicts and not force:
            more = len(conflicts) - 3
            shown = ", ".join(conflicts[:3]) + (f" and {more} more" if more > 0 else "")
            _fail(f"--out {out} already holds files export did not write ({shown}); pick a new or empty "
                  f"folder, or pass --force to write {writes} there (replacing those names only)")
    else:
        from distgpt.weights import written_by_save_llmc

        if out.is_dir():
            _fail(f"--out {out} is a folder; --format llmc writes one file (e.g. {out / 'model.bin'})")
        problem = _run_folder_problem(resolved.parent, out_dir_too=False)
        if problem:
            _fail(f"--out {out}: its folder {problem}: write it elsewhere")
        if out.exists() and not force and not written_by_save_llmc(out):
            _fail(f"--out {out} exists and is not an llm.c checkpoint that export wrote; pick another "
                  "name, or pass --force to replace it")


def _tokenizer_for(cfg: ModelConfig, saved: str | None, asked: str | None) -> str | None:
    """The model's tokenizer: --tokenizer, else the checkpoint's, else "gpt2" for a model with exactly
    GPT-2's vocabulary (Hugging Face's and llm.c's GPT-2 files), else unknown (None)."""
    name = asked or saved or ("gpt2" if cfg.vocab_size == GPT2_VOCAB else None)
    if name == "gpt2" and cfg.vocab_size < GPT2_VOCAB:
        _fail(f"the model's vocab_size is {cfg.vocab_size}, too small for the gpt2 tokenizer's {GPT2_VOCAB} "
              "tokens; pass the right --tokenizer")
    return name


def _undo(created: list[Path], folder: Path | None, names: tuple[str, ...]) -> None:
    """After a failed export: remove the files named `names` from `folder` (None: none), which was
    made by this export or empty before it, then the folders it created, if empty. An earlier
    export's folder is left as the failure left it: its marker still lists every file, old and new."""
    if folder is not None:
        for name in names:
            for leftover in folder.glob(f".{name}.*.tmp"):
                leftover.unlink(missing_ok=True)
            (folder / name).unlink(missing_ok=True)
    remove_new_dirs(created)


# ----------------------------------------------------------------------------------------------------
# a LoRA run's checkpoint: the adapters, the base they were trained on, the merged model


def peek_meta(spec: str) -> dict | None:
    """The meta of the checkpoint that --ckpt names, from its manifest alone (no shard is read: the
    loader that runs next reads and hashes them once); None when spec is no distgpt checkpoint.
    For an out_dir, the newest checkpoint whose manifest parses: the runs of one out_dir are all
    LoRA or all not, so an older one answers for a newer one the loader will skip."""
    from distgpt import checkpoint
    from distgpt.weights import is_checkpoint_dir

    path = Path(spec).expanduser()
    if not is_checkpoint_dir(path):
        return None

    folders = [path] if (path / "manifest.json").exists() else checkpoint.list_checkpoints(path)
    for folder in folders:
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if isinstance(manifest, dict) and isinstance(manifest.get("meta"), dict):
            return manifest["meta"]
    return None


def is_lora(meta: dict | None) -> bool:
    """A LoRA run's checkpoint: its meta has a (non-empty) lora entry, as checkpoint.read_lora asks."""
    return meta is not None and bool(meta.get("lora"))


def _base_source(meta: dict | None) -> str | None:
    base = meta.get("lora", {}).get("base") if is_lora(meta) and isinstance(meta["lora"], dict) else None
    source = base.get("source") if isinstance(base, dict) else None
    return source if isinstance(source, str) and source else None


@dataclass
class Weights:
    """What export and sample read: a model config, flat float32 parameters in its layout, the
    tokenizer's name if known, and for a LoRA run's checkpoint what it was merged from."""

    cfg: ModelConfig
    params: np.ndarray
    tokenizer: str | None
    lora: LoraCheckpoint | None = None


def load_weights(spec: str, base: str | None = None) -> Weights:
    """Anything weights.load_for_inference reads, and a LoRA run's checkpoint: its base (`base`, else
    the source its manifest records) with the adapters merged in (LoraLayout.merged: peft's merge),
    a plain GPT-2 for sampling and for the hf and llmc formats."""
    from distgpt.weights import WeightsError, load_for_inference, lora_checkpoint, merged_lora

    meta = peek_meta(spec)
    if not is_lora(meta):
        if base is not None:
            raise WeightsError(f"--base {base}: {spec} is not a LoRA run's checkpoint (its manifest has no "
                               "meta lora), so it has no base to replace")
        cfg, params, tokenizer = load_for_inference(spec)
        return Weights(cfg, params, tokenizer)
    ck = lora_checkpoint(spec, base)
    return Weights(ck.cfg, merged_lora(ck), ck.tokenizer, ck)


# ----------------------------------------------------------------------------------------------------
# peft's folder


def peft_export_conflicts(folder: str | Path) -> list[str]:
    """What in `folder` a peft export did not write (weights.ExportFolder.conflicts)."""
    return _peft_export().conflicts(folder)


def _peft_export():
    """peft's folder as export writes it: weights.ExportFolder with peft's own marker, so an hf and a
    peft export never take each other's files for their own."""
    from distgpt.weights import ExportFolder

    return ExportFolder(PEFT_MARKER, "distgpt-peft-export", PEFT_FILES)


def adapter_config(layout: LoraLayout, base_model: str | None) -> dict:
    """peft's adapter_config.json for these adapters on a GPT2LMHeadModel (peft 0.21.2's LoraConfig
    fields; those not given take LoraConfig's defaults, which are what the adapters mean)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",            # PeftModelForCausalLM: keys under base_model.model.
        "base_model_name_or_path": base_model,
        "r": layout.rank,
        "lora_alpha": layout.alpha,
        "lora_dropout": layout.dropout,
        "target_modules": list(layout.targets),
        "fan_in_fan_out": True,              # GPT-2's Conv1D holds its weights (in, out)
        "bias": "none",
        "use_rslora": False,                 # scale alpha / r, not alpha / sqrt(r)
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def save_peft(folder: str | Path, layout: LoraLayout, adapters: np.ndarray, base_model: str | None) -> None:
    """adapter_config.json + adapter_model.safetensors (float32, peft's keys: lora.peft_key) into
    `folder` (made if missing), as peft's save_pretrained writes them. Each file is written to a
    temporary name and renamed; the marker lists old and new contents while they change, then the new."""
    from safetensors.numpy import save

    folder = Path(folder)
    state = layout.to_peft_state_dict(np.asarray(adapters, dtype=np.float32))
    config = json.dumps(adapter_config(layout, base_model), indent=2) + "\n"
    files = {"adapter_model.safetensors": save(state, metadata={"format": "pt"}),
             "adapter_config.json": config.encode()}
    _peft_export().write(folder, files)


def _peft_base_name(source: str) -> str | None:
    """base_model_name_or_path: what GPT2LMHeadModel.from_pretrained takes, an HF folder (absolute, so
    the adapters' folder can move) or a hub id; None for a base transformers cannot read (an llm.c
    file, a distgpt checkpoint)."""
    path = Path(source).expanduser()
    if not path.exists():
        return source                        # a hub id: training fetched it under this name
    return str(path.resolve()) if path.is_dir() and (path / "config.json").exists() else None


# ----------------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> None:
    p = Parser("export", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint folder, out_dir, HF folder / hub id, llm.c .bin")
    p.add_argument("--format", required=True, choices=["hf", "llmc", "peft"],
                   help="hf: safetensors folder; llmc: .bin; peft: a LoRA run's adapters (peft's folder)")
    p.add_argument("--out", required=True, help="folder (hf, peft) or file (llmc) to write")
    p.add_argument("--force", action="store_true",
                   help="write into an existing folder (hf, peft: only export's own file names are replaced) "
                        "or over an existing file (llmc) that export did not write")
    p.add_argument("--tokenizer", choices=["gpt2", "bytes"], default=None,
                   help="hf: the model's tokenizer (default: the checkpoint's; gpt2 for a 50257 vocab)")
    p.add_argument("--base", default=None,
                   help="a LoRA checkpoint's base (HF folder / hub id, llm.c .bin, distgpt checkpoint), when "
                        "it is no longer at the source its manifest records")
    args = p.parse_args(argv)
    check_switches("export")
    if not args.ckpt.strip():
        _fail("--ckpt is empty: name a checkpoint folder, out_dir, Hugging Face folder or hub id, or .bin")
    if not args.out.strip():
        _fail("--out is empty: name a folder (hf, peft) or file (llmc)")
    if args.base is not None and not args.base.strip():
        _fail("--base is empty: name the LoRA run's base (Hugging Face folder or hub id, .bin, checkpoint)")
    out = Path(args.out).expanduser()
    meta = peek_meta(args.ckpt)
    if args.format == "peft":
        if not is_lora(meta):
            what = "a checkpoint without meta lora" if meta is not None else "no distgpt checkpoint"
            _fail(f"--ckpt {args.ckpt} is not a LoRA run's checkpoint ({what}): --format peft writes a LoRA "
                  "run's adapters; use --format hf or llmc for a whole model")
        if args.tokenizer is not None:
            _fail("--tokenizer: --format peft writes the adapters alone, no tokenizer files")
    _check_target(out, args.format, args.ckpt, args.force)
    base = args.base or _base_source(meta)
    if args.format != "peft" and base is not None:
        _refuse_source(out, base, "LoRA base")

    from distgpt.weights import (
        HF_EXPORT_FILES,
        HF_EXPORT_MARKER,
        gpt2_tokenizer_files,
        lora_checkpoint,
        save_hf,
        save_llmc,
    )

    created: list[Path] = []
    # what a failure may clean up: export's files in a folder that held nothing before
    fresh = args.format != "llmc" and (not out.exists() or not any(out.iterdir()))
    own = (*HF_EXPORT_FILES, HF_EXPORT_MARKER) if args.format == "hf" else (*PEFT_FILES, PEFT_MARKER)
    names = own if fresh else ()
    try:
        if args.format == "peft":
            ck = lora_checkpoint(args.ckpt, args.base)
            created = make_dirs(out)
            base_model = _peft_base_name(ck.base)
            save_peft(out, ck.layout, ck.adapters, base_model)
        else:
            w = load_weights(args.ckpt, args.base)
            cfg, params = w.cfg, w.params
            note = ""
            if args.format == "hf":
                tok = _tokenizer_for(cfg, w.tokenizer, args.tokenizer)
                extra = gpt2_tokenizer_files(cfg.block_size) if tok == "gpt2" else {}
                note = {"gpt2": "; tokenizer: gpt2 (vocab.json, merges.txt)",
                        "bytes": "; no tokenizer files: the bytes tokenizer has none (ids 0-255 are UTF-8 "
                                 "bytes, 256 is end-of-text)",
                        None: "; no tokenizer files: the model's tokenizer is unknown (pass --tokenizer gpt2 "
                              "to add GPT-2's)"}[tok]
                created = make_dirs(out)
                save_hf(out, cfg, params, extra)
            else:
                created = make_dirs(out.parent)
                save_llmc(out, cfg, params)
    except (ValueError, OSError, KeyError) as e:  # WeightsError, DataError, DiskFullError among them
        _undo(created, out if fresh else None, names)
        _fail(str(e) if isinstance(e, OSError) or not e.args else str(e.args[0]))  # KeyError quotes str()
    except BaseException:
        _undo(created, out if fresh else None, names)
        raise
    plural = lambda n, word: f"{n} {word}" + ("" if n == 1 else "s")  # noqa: E731
    if args.format == "peft":
        lo = ck.layout
        where = (f"base_model_name_or_path {base_model}" if base_model is not None else
                 f"its base {ck.base} is not a transformers model: export it with --format hf and load "
                 "that folder as the base")
        print(f"wrote {args.out} (peft: LoRA rank {lo.rank}, alpha {lo.alpha:g} on {', '.join(lo.targets)}; "
              f"{lo.size:,} adapter parameters over {plural(ck.cfg.n_layer, 'layer')}; {where})")
        return
    n = Layout(cfg).n_params() / 1e6
    shape = (f"{plural(cfg.n_layer, 'layer')}, {plural(cfg.n_head, 'head')}, n_embd {cfg.n_embd}, "
             f"vocab {cfg.vocab_size}")
    merged = (f"; LoRA rank {w.lora.layout.rank} merged into its base {w.lora.base}"
              if w.lora is not None else "")
    print(f"wrote {args.out} ({args.format}, {n:.2f}M parameters: {shape}, "
          f"block_size {cfg.block_size}{note}{merged})")


if __name__ == "__main__":
    main()
