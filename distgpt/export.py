"""Write a model's weights in another ecosystem's format.

    python -m distgpt.export --ckpt out --format hf --out gpt2-mine       # transformers folder
    python -m distgpt.export --ckpt out --format llmc --out gpt2_mine.bin  # llm.c checkpoint

--ckpt takes a distgpt checkpoint folder or out_dir (its newest checkpoint), or anything the
weights loader reads (a Hugging Face folder or hub id, an llm.c .bin), so this also converts
between those formats.

export never deletes or overwrites what it did not write. hf: --out is a folder that must be new or
empty, or hold an earlier export (recognised by the marker file export writes into it); into any
other folder only with --force, and even then only the files export writes (config.json,
model.safetensors, the tokenizer's files) are replaced: anything else there stays. llmc: a file at
--out is replaced only when export wrote it, or with --force. A training run's own folders (out_dir,
its ckpt folder, a checkpoint) and the folder the weights are read from are refused in any case.

A GPT-2-tokenizer model's hf export also holds GPT-2's tokenizer (vocab.json, merges.txt and their
configs, the files tiktoken's gpt2 encoding is built from), so `AutoTokenizer.from_pretrained(DIR)`
works offline; a bytes-tokenizer model has no tokenizer files to write.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import NoReturn

from distgpt.cli import Parser, check_switches, fail, make_dirs, remove_new_dirs
from distgpt.model import Layout, ModelConfig

GPT2_VOCAB = 50257


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


def _check_target(out: Path, fmt: str, source: str, force: bool) -> None:
    """Every refusal before the (slow) loading of the weights; one line each."""
    resolved = out.resolve()
    src = Path(source).expanduser()
    if src.exists():
        src = src.resolve()
        if resolved == src or resolved in src.parents:
            _fail(f"--out {out} is the --ckpt source {source} or holds it: export would write over "
                  "the weights it reads; pick another --out")
    if fmt == "hf":
        problem = _run_folder_problem(resolved, out_dir_too=True)
        if problem:
            _fail(f"--out {out} {problem}: export into a new folder instead (e.g. {out / 'hf'})"
                  if "out_dir" in problem else f"--out {out} {problem}: export into a new folder instead")
        if out.exists() and not out.is_dir():
            _fail(f"--out {out} is a file; --format hf writes a folder (config.json, model.safetensors, ...)")
        from distgpt.weights import hf_export_conflicts

        conflicts = hf_export_conflicts(out)
        if conflicts and not force:
            more = len(conflicts) - 3
            shown = ", ".join(conflicts[:3]) + (f" and {more} more" if more > 0 else "")
            _fail(f"--out {out} already holds files export did not write ({shown}); pick a new or empty "
                  "folder, or pass --force to write config.json, model.safetensors and the tokenizer "
                  "files there (replacing those names only)")
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


def main(argv: list[str] | None = None) -> None:
    p = Parser("export", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint folder, out_dir, HF folder / hub id, llm.c .bin")
    p.add_argument(
        "--format", required=True, choices=["hf", "llmc"], help="hf: safetensors folder; llmc: .bin"
    )
    p.add_argument("--out", required=True, help="folder (hf) or file (llmc) to write")
    p.add_argument("--force", action="store_true",
                   help="write into an existing folder (hf: only export's own file names are replaced) "
                        "or over an existing file (llmc) that export did not write")
    p.add_argument("--tokenizer", choices=["gpt2", "bytes"], default=None,
                   help="hf: the model's tokenizer (default: the checkpoint's; gpt2 for a 50257 vocab)")
    args = p.parse_args(argv)
    check_switches("export")
    if not args.ckpt.strip():
        _fail("--ckpt is empty: name a checkpoint folder, out_dir, Hugging Face folder or hub id, or .bin")
    if not args.out.strip():
        _fail("--out is empty: name a folder (hf) or file (llmc)")
    out = Path(args.out).expanduser()
    _check_target(out, args.format, args.ckpt, args.force)

    from distgpt.weights import (
        HF_EXPORT_FILES,
        HF_EXPORT_MARKER,
        gpt2_tokenizer_files,
        load_for_inference,
        save_hf,
        save_llmc,
    )

    created: list[Path] = []
    # what a failure may clean up: export's files in a folder that held nothing before
    fresh = args.format == "hf" and (not out.exists() or not any(out.iterdir()))
    names = (*HF_EXPORT_FILES, HF_EXPORT_MARKER) if fresh else ()
    try:
        cfg, params, saved_tok = load_for_inference(args.ckpt)
        note = ""
        if args.format == "hf":
            tok = _tokenizer_for(cfg, saved_tok, args.tokenizer)
            extra = gpt2_tokenizer_files(cfg.block_size) if tok == "gpt2" else {}
            note = {"gpt2": "; tokenizer: gpt2 (vocab.json, merges.txt)",
                    "bytes": "; no tokenizer files: the bytes tokenizer has none (ids 0-255 are UTF-8 bytes, "
                             "256 is end-of-text)",
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
    n = Layout(cfg).n_params() / 1e6
    plural = lambda n, word: f"{n} {word}" + ("" if n == 1 else "s")  # noqa: E731
    shape = (f"{plural(cfg.n_layer, 'layer')}, {plural(cfg.n_head, 'head')}, n_embd {cfg.n_embd}, "
             f"vocab {cfg.vocab_size}")
    print(f"wrote {args.out} ({args.format}, {n:.2f}M parameters: {shape}, "
          f"block_size {cfg.block_size}{note})")


if __name__ == "__main__":
    main()
