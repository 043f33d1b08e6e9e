"""Text from a model: temperature / top-k / top-p sampling, greedy decoding and beam search, with
the model's KV cache so each new token costs one position instead of a full forward pass.

    python -m distgpt.sample --ckpt out --prompt "To be, or not" --top-k 50 --max-new-tokens 200

--ckpt takes a distgpt checkpoint folder, an out_dir (its newest checkpoint), a Hugging Face folder
or hub id (e.g. gpt2), or an llm.c .bin. A LoRA run's checkpoint samples its base (the source its
manifest records, or --base) with the adapters merged in. Tokens are printed as they are generated.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import NoReturn

import numpy as np

from distgpt import blas
from distgpt.cli import Parser, check_switches, fail
from distgpt.model import GPT

# ----------------------------------------------------------------------------------------------------
# choosing the next token


def filter_logits(logits: np.ndarray, top_k: int | None = None, top_p: float | None = None) -> np.ndarray:
    """A copy of logits (..., V) with everything outside the kept set at -inf.

    top_k keeps the k largest (and anything tied with the k-th, as Hugging Face's TopKLogitsWarper).
    top_p then keeps the smallest set of most probable tokens whose probability sums to >= top_p,
    always at least one: like TopPLogitsWarper, tokens are dropped from the least probable end
    while the dropped mass stays <= 1 - top_p; among equal logits the higher id is dropped first.
    """
    out = np.array(logits, dtype=np.float64 if logits.dtype == np.float64 else np.float32, copy=True)
    V = out.shape[-1]
    if top_k is not None and 0 < top_k < V:
        kth = np.partition(out, V - top_k, axis=-1)[..., V - top_k : V - top_k + 1]
        out[out < kth] = -np.inf
    if top_p is not None and top_p < 1.0:
        # ascending, and among equal logits the higher id first, so the lower id survives longer
        # (as argmax prefers it); torch's unstable sort gives HF no defined order for ties
        order = np.argsort(-out, axis=-1, kind="stable")[..., ::-1]
        asc = np.take_along_axis(out, order, axis=-1).astype(np.float64)
        probs = np.exp(asc - asc[..., -1:])
        probs /= probs.sum(axis=-1, keepdims=True)
        drop = np.cumsum(probs, axis=-1) <= 1.0 - top_p
        drop[..., -1] = False  # the most probable token always stays
        np.put_along_axis(out, order, np.where(drop, -np.inf, asc).astype(out.dtype), axis=-1)
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _choose(
    logits: np.ndarray,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    greedy: bool,
    rng: np.random.Generator,
) -> int:
    if greedy or temperature <= 0.0:
        return int(np.argmax(logits))  # the first of equal maxima, like torch.argmax
    scaled = filter_logits(logits.astype(np.float64) / temperature, top_k, top_p)
    probs = np.exp(scaled - scaled.max())
    cdf = np.cumsum(probs)
    # inverse-CDF draw: one uniform per token, and a token of probability 0 can never be drawn
    return min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(cdf) - 1)


def _start(prompt: list[int], eot: int | None) -> list[int]:
    """The tokens to start from: an empty prompt becomes [eot], GPT-2's document start."""
    prompt = [int(t) for t in prompt]
    if not prompt:
        if eot is None:
            raise ValueError("an empty prompt needs eot to start from")
        prompt = [eot]
    return prompt


def generate(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    rng: np.random.Generator | None = None,
    eot: int | None = None,
    on_token: Callable[[int], None] | None = None,
    use_cache: bool = True,
    vocab_limit: int | None = None,
) -> list[int]:
    """New tokens after `prompt` (eot itself is not returned). Stops at eot or max_new_tokens.
    on_token(id) is called as each token is chosen (streaming). temperature 0 is greedy.

    The model sees the last block_size tokens, as nanoGPT crops its context: a longer prompt is
    cropped, and so is the context once prompt and output outgrow block_size. With the KV cache each
    new token costs one position until the cache holds block_size of them; after that the window
    slides, and since GPT-2's learned positions are absolute, the cached keys of the shifted window
    are not reusable: each token then re-prefills the cropped window (one forward pass over it, as
    nanoGPT and use_cache=False do every token). use_cache=False recomputes the whole window every
    token (a benchmark baseline); vocab_limit restricts choices to ids below it (a tokenizer smaller
    than the model's vocab)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    rng = np.random.default_rng() if rng is None else rng
    tokens = _start(prompt, eot)
    out: list[int] = []
    if max_new_tokens <= 0:
        return out
    block = model.cfg.block_size
    cache = model.new_cache(1, block) if use_cache else None

    def window_logits() -> np.ndarray:
        if cache is not None:
            cache.reset()     # overwritten from position 0: the window's positions start there
        return model.logits(np.asarray([tokens[-block:]]), cache)[0, -1]

    logits = window_logits()
    while True:
        tok = _choose(logits[:vocab_limit], temperature, top_k, top_p, greedy, rng)
        if tok == eot:
            break
        out.append(tok)
        tokens.append(tok)
        if on_token is not None:
            on_token(tok)
        if len(out) == max_new_tokens:
            break
        if cache is not None and cache.length < block:
            logits = model.logits(np.asarray([[tok]]), cache)[0, -1]
        else:
            logits = window_logits()
    return out


def beam_search(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    beams: int,
    length_penalty: float = 1.0,
    eot: int | None = None,
    vocab_limit: int | None = None,
) -> list[int]:
    """The best continuation by beam search, as Hugging Face's generate(num_beams=beams,
    do_sample=False) with its default early_stopping=False computes it (eot not returned).
    Beyond block_size the context is cropped as in generate() (each beam's window re-prefilled).

    Each step keeps the 2 x beams best (beam, token) extensions; those among the best `beams` that
    end in eot (or reach the length limit) become finished hypotheses scored
    sum_logprob / new_tokens**length_penalty, the best `beams` non-finished ones continue. The search
    stops when `beams` hypotheses are finished and the best live beam's score at its current
    length cannot beat the worst of them, or at the length limit.
    """
    if beams < 1:
        raise ValueError(f"beams must be >= 1, got {beams}")
    prompt = _start(prompt, eot)
    n = max_new_tokens
    if n <= 0:
        return []
    block = model.cfg.block_size
    cache = model.new_cache(1, block)
    logits = model.logits(np.asarray([prompt[-block:]]), cache)[:, -1]  # prefill once, then copy it
    cache.reorder(np.zeros(beams, dtype=np.intp))
    logits = np.repeat(logits, beams, axis=0)
    seqs = np.zeros((beams, 0), dtype=np.int64)
    # only the first beam is live at the start, or the first step would pick each token `beams` times
    scores = np.full(beams, -1e9)
    scores[0] = 0.0
    finished: list[tuple[float, list[int]]] = []  # (score, tokens), best first, at most `beams`
    for step in range(n):
        logp = _log_softmax(logits[:, :vocab_limit].astype(np.float64)) + scores[:, None]
        V = logp.shape[1]
        flat = logp.ravel()
        K = min(2 * beams, flat.size)
        top = np.argpartition(-flat, K - 1)[:K]
        top = top[np.argsort(-flat[top], kind="stable")]
        src, tok = np.divmod(top, V)
        cand = flat[top]
        last = step == n - 1
        ends = np.full(K, last) if eot is None else (tok == eot) | last
        length = step + 1
        for i in np.flatnonzero(ends[:beams]):  # only the best `beams` candidates may finish
            finished.append((cand[i] / length**length_penalty, [*seqs[src[i]].tolist(), int(tok[i])]))
        finished.sort(key=lambda h: -h[0])
        del finished[beams:]
        if last:
            break
        live = np.flatnonzero(~ends)[:beams]
        seqs = np.concatenate([seqs[src[live]], tok[live, None]], axis=1)
        scores = cand[live]
        if len(finished) == beams and scores[0] / length**length_penalty <= finished[-1][0]:
            break  # HF's early-stop heuristic: the live beams can no longer improve the finished set
        if cache.length < block:
            cache.reorder(src[live])
            logits = model.logits(tok[live, None], cache)[:, -1]
        else:  # the window slides: every beam's last block_size tokens from position 0
            windows = np.concatenate([np.tile(np.asarray(prompt), (len(live), 1)), seqs], axis=1)[:, -block:]
            cache = model.new_cache(len(live), block)
            logits = model.logits(windows, cache)[:, -1]
    best = finished[0][1]
    return best[:-1] if eot is not None and best and best[-1] == eot else best


# ----------------------------------------------------------------------------------------------------
# streaming text


class StreamDecoder:
    """Tokens in, printable text out. A multi-byte UTF-8 character can be split across tokens: text
    whose decoding ends in U+FFFD (an incomplete character) is held back until a later token
    completes it (or until that is impossible: a character has at most 4 bytes)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.pending: list[int] = []

    def push(self, token: int) -> str:
        self.pending.append(token)
        text = self.tok.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < 4:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.tok.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


# ----------------------------------------------------------------------------------------------------
# command line


def _fail(message: str) -> NoReturn:
    fail("sample", message)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = Parser("sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint folder, out_dir, HF folder / hub id, llm.c .bin")
    p.add_argument("--base", default=None,
                   help="a LoRA checkpoint's base (HF folder / hub id, llm.c .bin, distgpt checkpoint), when "
                        "it is no longer at the source its manifest records")
    p.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=100,
                   help="tokens to generate; beyond the model's block_size the context is cropped to its "
                        "last block_size tokens, as nanoGPT does (default 100)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="divides the logits before sampling; 0 means greedy (the most probable token, "
                        "as --greedy); must be >= 0 (default 1.0)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--greedy", action="store_true", help="always the most probable token")
    p.add_argument("--beams", type=int, default=None, help="beam search with this many beams")
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam score = logprob / len**this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", choices=["gpt2", "bytes"], default=None, help="default: the checkpoint's")
    p.add_argument("--no-cache", action="store_true", help="recompute the full context every token")
    args = p.parse_args(argv)
    if not args.ckpt.strip():
        p.error("--ckpt is empty: name a checkpoint folder, out_dir, Hugging Face folder or hub id, or .bin")
    if args.base is not None and not args.base.strip():
        p.error("--base is empty: name the LoRA run's base (Hugging Face folder or hub id, .bin, checkpoint)")
    if args.max_new_tokens < 0 or args.num_samples < 1:
        p.error("--max-new-tokens must be >= 0 and --num-samples >= 1")
    if not 0.0 <= args.temperature < float("inf"):
        p.error(f"--temperature must be >= 0 (0 means greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        p.error(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.beams is not None:
        if args.beams < 1:
            p.error(f"--beams must be >= 1, got {args.beams}")
        if args.num_samples > 1 or args.no_cache:
            p.error("beam search is deterministic and cached: drop --num-samples / --no-cache")
    return args


def _prompt_problem(prompt: str) -> str | None:
    """Why the prompt is not text. Python decodes the command line with surrogateescape, so bytes
    that are not UTF-8 arrive as lone surrogates U+DC80..U+DCFF, which no tokenizer can encode."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = prompt[e.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"U+{ord(bad):04X}"
        return (f"--prompt is not valid UTF-8: {byte} at character {e.start} (is the terminal or the "
                "shell's locale in another encoding?)")
    return None


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    check_switches("sample")
    problem = _prompt_problem(args.prompt)
    if problem:
        _fail(problem)
    from distgpt.data import get_tokenizer
    from distgpt.export import load_weights

    try:
        w = load_weights(args.ckpt, args.base)      # a LoRA run's: base and adapters, merged
        cfg, params, tok_name = w.cfg, w.params, w.tokenizer
        tok = get_tokenizer(args.tokenizer or tok_name or "gpt2")
        if tok.vocab_size > cfg.vocab_size:
            raise ValueError(
                f"the {tok.name} tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size}; "
                "pass the right --tokenizer"
            )
        prompt = tok.encode(args.prompt)
    except (ValueError, OSError, KeyError) as e:
        _fail(str(e) if isinstance(e, OSError) or not e.args else str(e.args[0]))  # KeyError quotes str()
    try:
        blas.configure()        # DISTGPT_BLAS=mkl without MKL: one line here, not a traceback mid-gemm
    except blas.BlasError as e:
        _fail(str(e))
    model = GPT(cfg, params=params, trainable=False)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")  # a non-UTF-8 terminal must not end the run

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    rng = np.random.default_rng(args.seed)
    common = dict(eot=tok.eot, vocab_limit=tok.vocab_size)
    t0, produced = time.perf_counter(), 0
    try:
        for i in range(args.num_samples):
            if i:
                write("\n" + "-" * 40 + "\n")
            write(args.prompt)
            if args.beams is not None:
                ids = beam_search(
                    model, prompt, args.max_new_tokens, args.beams, args.length_penalty, **common
                )
                write(tok.decode(ids))
            else:
                stream = StreamDecoder(tok)
                ids = generate(
                    model,
                    prompt,
                    args.max_new_tokens,
                    temperature=args.temperature,
                    top_k=args.top_k,
                    top_p=args.top_p,
                    greedy=args.greedy,
                    rng=rng,
                    on_token=lambda t, s=stream: write(s.push(t)),
                    use_cache=not args.no_cache,
                    **common,
                )
                write(stream.flush())
            produced += len(ids)
        write("\n")
    except ValueError as e:
        _fail(str(e))
    except BrokenPipeError:  # e.g. piped into head
        sys.stderr.close()
        sys.exit(0)
    dt = time.perf_counter() - t0
    print(f"[{produced} tokens in {dt:.2f}s, {produced / max(dt, 1e-9):.1f} tokens/s]", file=sys.stderr)


if __name__ == "__main__":
    main()
