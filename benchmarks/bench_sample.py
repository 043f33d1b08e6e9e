"""Sampling speed with and without the KV cache (random weights, greedy decoding).

    python benchmarks/bench_sample.py [--prompt-len 16] [--new-tokens 64] [--repeats 2]

Without the cache every new token re-runs the whole context; with it, the prompt is one forward
pass (prefill) and each new token is one position through the model.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from distgpt.model import GPT, ModelConfig, init_params
from distgpt.sample import generate

MODELS = {
    "small (4L, 128d)": ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=50257),
    "GPT-2 124M": ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
}


def best_time(fn, repeats: int) -> tuple[float, list[int]]:
    best, out = float("inf"), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def prefill(model: GPT, prompt: list[int]) -> list[int]:
    model.logits(np.asarray([prompt]), model.new_cache(1, len(prompt)))
    return prompt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    args = p.parse_args()
    prompt = np.random.default_rng(0).integers(0, 50257, args.prompt_len).tolist()
    print(f"{os.cpu_count()} cores; prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy")
    header = ["model", "params", "no cache tok/s", "cache tok/s", "prefill ms", "speedup"]
    print(f"{header[0]:<18} {header[1]:>8} {header[2]:>15} {header[3]:>12} {header[4]:>11} {header[5]:>8}")
    n = args.new_tokens
    for name, cfg in MODELS.items():
        model = GPT(cfg)
        init_params(model.layout, model.params, seed=0)
        t_full, a = best_time(
            lambda m=model: generate(m, prompt, n, greedy=True, use_cache=False), args.repeats
        )
        t_cache, b = best_time(lambda m=model: generate(m, prompt, n, greedy=True), args.repeats)
        assert a == b, "cached and uncached decoding disagree"
        t_prefill, _ = best_time(lambda m=model: prefill(m, prompt), args.repeats)
        print(
            f"{name:<18} {model.layout.n_params() / 1e6:7.1f}M {n / t_full:15.1f} {n / t_cache:12.1f} "
            f"{t_prefill * 1e3:11.1f} {t_full / t_cache:7.1f}x"
        )


if __name__ == "__main__":
    main()
