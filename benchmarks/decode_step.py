"""Time of one decode step of the engine in several set-ups, at several batch sizes, in one run: on the CPU,
int8 weights layer by layer (`--enforce-eager`, the baseline), int8 weights with every layer in one native call
(the fused step), the fused step with int8 activations too (`--quantization w8a8`), and with 4-bit weights
(`w4a8`); and the KV cache stored narrower (`--kv-dtype`: `w4a8-kv16`, `w4a8-kv8`), which the native decode
attention reads as stored (it matters at long contexts: `--prompt-len`).

Each measurement: `batch` prompts of `--prompt-len` tokens (default 128) prefilled, then 64 decode steps of
the whole batch timed; the best of two. Ratios are the baseline's time over each set-up's. At batch 1 each
set-up's step is also printed against its weight-read floor, measured in the same run: the bytes of every weight
a step reads, read once with the same threads (`default` is serve's defaults: w4a8 for the embedded model).

    .venv/bin/python benchmarks/decode_step.py [--model PATH] [--batches 1,16] [--setups default,eager,int8,w8a8,w4a8]
    .venv/bin/python benchmarks/decode_step.py --setups w4a8,w4a8-kv16,w4a8-kv8 --batches 1,8 --prompt-len 1024
"""

from __future__ import annotations

import argparse
import time

from torch import nn

from splitserve import LLM, SamplingParams
from splitserve.engine.request import EngineRequest
from splitserve.kernels import cpu_kernels, cpu_quant
from splitserve.model.llama import RMSNorm

SETUPS = {
    "default": {},  # serve's defaults: --dtype auto --quantization auto (w4a8 for the embedded model on the CPU)
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
            engine.add_request(EngineRequest(f"{tag}-{i}", [100 + (i + j) % 30000 for j in range(prompt_len)], params))
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
    times, floor = {}, {}
    for name in setups:
        options = {"dtype": "fp32", **SETUPS[name]} if SETUPS[name] else {}
        llm = LLM(args.model, prefix_caching=False, **options)
        print(f"{name}: {llm.engine.config.describe_dtype()}", flush=True)
        floor[name] = weight_read_ms(llm)
        for b in batches:
            times[name, b] = step_ms(llm, b, args.prompt_len)
            print(f"{name} batch {b}: {times[name, b]:.1f} ms per decode step", flush=True)
        del llm
    for b in batches:
        base = times[setups[0], b]
        print(f"batch {b}: " + ", ".join(f"{n} {times[n, b]:.1f} ms ({base / times[n, b]:.2f}x)" for n in setups))
    if 1 in batches:
        print("batch 1 against the weight-read floor (the step's weight bytes read once, same threads, same run):")
        for n in setups:
            ms, gb = floor[n]
            print(
                f"  {n}: floor {ms:.2f} ms ({gb * 1e3 / ms:.1f} GB/s over {gb * 1e3:.0f} MB); step "
                f"{times[n, 1]:.2f} ms = {times[n, 1] / ms:.2f}x the floor"
            )


def weight_read_ms(llm: LLM) -> tuple[float, float]:
    """(ms, GB): the floor of a decode step at batch 1, the time to read once, with the same threads, the bytes of
    every weight a step reads: the linear layers' (quantized or not; the LM head's, a tied one's table included),
    the norms'; of the embedding table only a row, left out."""
    tensors = {}
    for module in llm.engine.runner.model.modules():
        if isinstance(module, cpu_quant.QuantizedLinear):
            found = [module.qweight, module.scale, module.offset, module.bias]
        elif isinstance(module, (nn.Linear, RMSNorm)):
            found = [module.weight, getattr(module, "bias", None)]
        else:
            continue
        tensors.update((t.data_ptr(), t) for t in found if t is not None)
    seconds = cpu_kernels.read_seconds(list(tensors.values()))
    return seconds * 1000, sum(t.numel() * t.element_size() for t in tensors.values()) / 1e9


if __name__ == "__main__":
    main()
