"""Time of one decode step of the engine in several set-ups, at several batch sizes, in one run: on the CPU,
int8 weights layer by layer (`--enforce-eager`, the baseline), int8 weights with every layer in one native call
(the fused step), the fused step with int8 activations too (`--quantization w8a8`), and with 4-bit weights
(`w4a8`); and the KV cache stored narrower (`--kv-dtype`: `w4a8-kv16`, `w4a8-kv8`), which the native decode
attention reads as stored (it matters at long contexts: `--prompt-len`).

Each measurement: `batch` prompts of `--prompt-len` tokens (default 128) prefilled, then 64 decode steps of
the whole batch timed; the best of two. Ratios are the baseline's time over each set-up's.

    .venv/bin/python benchmarks/decode_step.py [--model PATH] [--batches 1,16] [--setups eager,int8,w8a8,w4a8]
    .venv/bin/python benchmarks/decode_step.py --setups w4a8,w4a8-kv16,w4a8-kv8 --batches 1,8 --prompt-len 1024
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
    "w4a8-kv16": {"quantization": "w4a8", "kv_dtype": "fp16"},
    "w4a8-kv8": {"quantization": "w4a8", "kv_dtype": "int8"},
}


def step_ms(llm: LLM, batch: int, prompt_len: int, steps: int = 64) -> float:
    engine = llm.engine
    params = SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)

    def run(tag: str) -> float:
        for i in range(batch):
            engine.add_request(f"{tag}-{i}", [100 + (i + j) % 30000 for j in range(prompt_len)], params)
        started: set[str] = set()
        while len(started) < batch:  # the prefills (and any decode steps mixed with them)
            started.update(u.request_id for u in engine.step())
        begin = time.perf_counter()
        for _ in range(steps):
            engine.step()
        seconds = time.perf_counter() - begin
        while engine.has_unfinished():
            engine.step()
        return seconds / steps * 1000

    return min(run(f"r{k}") for k in range(2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt-len", type=int, default=128, help="context before the timed steps (default 128)")
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
            times[name, b] = step_ms(llm, b, args.prompt_len)
            print(f"{name} batch {b}: {times[name, b]:.1f} ms per decode step", flush=True)
        del llm
    for b in batches:
        base = times[setups[0], b]
        print(f"batch {b}: " + ", ".join(f"{n} {times[n, b]:.1f} ms ({base / times[n, b]:.2f}x)" for n in setups))


if __name__ == "__main__":
    main()
