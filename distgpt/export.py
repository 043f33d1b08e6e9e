"""Write a model's weights in another ecosystem's format.

    python -m distgpt.export --ckpt out --format hf --out gpt2-mine       # transformers folder
    python -m distgpt.export --ckpt out --format llmc --out gpt2_mine.bin  # llm.c checkpoint

--ckpt takes a distgpt checkpoint folder or out_dir (its newest checkpoint), or anything the
weights loader reads (a Hugging Face folder or hub id, an llm.c .bin), so this also converts
between those formats.
"""

from __future__ import annotations

from typing import NoReturn

from distgpt.cli import Parser, fail
from distgpt.model import Layout


def _fail(message: str) -> NoReturn:
    fail("export", message)


def main(argv: list[str] | None = None) -> None:
    p = Parser("export", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint folder, out_dir, HF folder / hub id, llm.c .bin")
    p.add_argument(
        "--format", required=True, choices=["hf", "llmc"], help="hf: safetensors folder; llmc: .bin"
    )
    p.add_argument("--out", required=True, help="folder (hf) or file (llmc) to write")
    args = p.parse_args(argv)

    from distgpt.weights import load_for_inference, save_hf, save_llmc

    try:
        cfg, params, _ = load_for_inference(args.ckpt)
        if args.format == "hf":
            save_hf(args.out, cfg, params)
        else:
            save_llmc(args.out, cfg, params)
    except (ValueError, OSError, KeyError) as e:
        _fail(str(e) if isinstance(e, OSError) or not e.args else str(e.args[0]))  # KeyError quotes str()
    n = Layout(cfg).n_params() / 1e6
    shape = f"{cfg.n_layer} layers, {cfg.n_head} heads, n_embd {cfg.n_embd}, vocab {cfg.vocab_size}"
    print(f"wrote {args.out} ({args.format}, {n:.2f}M parameters: {shape}, block_size {cfg.block_size})")


if __name__ == "__main__":
    main()
