"""Prefill throughput of the mode serve's defaults pick (`--dtype auto --quantization auto`: w4a8 for the
embedded model on the CPU, every prompt row through the quantized kernels and the native paged attention, the
one numerics of decode) against fp32 weights (`--dtype fp32 --quantization none`: torch's GEMMs and SDPA), on the
same prompts, in one run: prompt tokens/s of a batch of prompts of each length, their first token sampled, the
best of three (prefix caching off, so nothing is reused between runs).

    .venv/bin/python benchmarks/prefill.py [--model PATH] [--lengths 128,512,2048] [--prompts 8]
"""

from __future__ import annotations

import argparse
import random
import time

from splitserve import LLM, SamplingParams

SETUPS = {"default": {}, "fp32": {"dtype": "fp32", "quantization": "none"}}


def tokens_per_s(llm: LLM, length: int, prompts: int, seed: int) -> float:
    rng = random.Random(seed)
    batch = [[rng.randrange(100, 30000) for _ in range(length)] for _ in range(prompts)]
    params = SamplingParams(max_tokens=1, temperature=0)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        best = min(best, time.perf_counter() - start)
    return length * prompts / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--lengths", default="128,512,2048")
    p.add_argument("--prompts", type=int, default=8, help="prompts of each length, prefilled together")
    args = p.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    rates: dict[tuple[str, int], float] = {}
    for name, options in SETUPS.items():
        llm = LLM(args.model, prefix_caching=False, kv_cache_memory="1GiB", **options)
        print(f"{name}: {llm.engine.config.describe_dtype()}", flush=True)
        for n in lengths:
            rates[name, n] = tokens_per_s(llm, n, args.prompts, seed=n)
            print(f"  {args.prompts} prompts of {n} tokens: {rates[name, n]:,.0f} prompt tokens/s", flush=True)
        del llm
    for n in lengths:
        ratio = rates["default", n] / rates["fp32", n]
        print(
            f"{n}-token prompts: default {rates['default', n]:,.0f} tok/s, fp32 {rates['fp32', n]:,.0f} tok/s: "
            f"{ratio:.2f}x {'(faster)' if ratio >= 1 else '(SLOWER)'}"
        )


if __name__ == "__main__":
    main()
