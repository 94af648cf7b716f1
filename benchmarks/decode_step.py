"""Time of one decode step of the engine, layer by layer (`--enforce-eager`) against the default (on the CPU with
int8 weights: every layer in one native call), at several batch sizes, in one run.

Each measurement: `batch` copies of a 128-token prompt, 65 greedy tokens, minus the same with 1 token (the
prefill), over 64 steps; the best of two.

    .venv/bin/python benchmarks/decode_step.py [--model PATH] [--batches 1,16]
"""

from __future__ import annotations

import argparse
import time

from splitserve import LLM, SamplingParams


def step_ms(llm: LLM, batch: int) -> float:
    prompts = [list(range(100 + i, 228 + i)) for i in range(batch)]

    def run(n: int) -> float:
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - start

    return min((run(65) - run(1)) / 64 * 1000 for _ in range(2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--batches", default="1,16")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    times = {}
    for eager in (True, False):
        llm = LLM(args.model, enforce_eager=eager, prefix_caching=False)
        for b in batches:
            times[eager, b] = step_ms(llm, b)
            print(f"{'eager' if eager else 'default'} batch {b}: {times[eager, b]:.1f} ms per decode step", flush=True)
        del llm
    for b in batches:
        print(f"batch {b}: {times[True, b]:.1f} -> {times[False, b]:.1f} ms ({times[True, b] / times[False, b]:.2f}x)")


if __name__ == "__main__":
    main()
