"""Time of one decode step of the engine in several set-ups, at several batch sizes, in one run: on the CPU,
int8 weights layer by layer (`--enforce-eager`, the baseline), int8 weights with every layer in one native call
(the fused step), the fused step with int8 activations too (`--quantization w8a8`), and with 4-bit weights
(`w4a8`).

Each measurement: `batch` copies of a 128-token prompt, 65 greedy tokens, minus the same with 1 token (the
prefill), over 64 steps; the best of two. Ratios are the baseline's time over each set-up's.

    .venv/bin/python benchmarks/decode_step.py [--model PATH] [--batches 1,16] [--setups eager,int8,w8a8,w4a8]
"""

from __future__ import annotations

import argparse
import time

from splitserve import LLM, SamplingParams

SETUPS = {
    "eager": {"quantization": "int8", "enforce_eager": True},
    "int8": {"quantization": "int8"},
    "w8a8": {"quantization": "w8a8"},
    "w8a7": {"quantization": "w8a7"},
    "w4a8": {"quantization": "w4a8"},
    "fp32": {"quantization": "none"},
}


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
    p.add_argument(
        "--setups", default="eager,int8,w8a8,w4a8", help=f"the first is the baseline; of {', '.join(SETUPS)}"
    )
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    setups = args.setups.split(",")
    times = {}
    for name in setups:
        llm = LLM(args.model, prefix_caching=False, dtype="fp32", **SETUPS[name])
        for b in batches:
            times[name, b] = step_ms(llm, b)
            print(f"{name} batch {b}: {times[name, b]:.1f} ms per decode step", flush=True)
        del llm
    for b in batches:
        base = times[setups[0], b]
        print(f"batch {b}: " + ", ".join(f"{n} {times[n, b]:.1f} ms ({base / times[n, b]:.2f}x)" for n in setups))


if __name__ == "__main__":
    main()
