"""Quality of the CPU's quantized modes against a model's own weights in fp32: top-1 agreement (the share of
positions whose most likely next token is unchanged) and perplexity, over a fixed English text scored in one
pass with every row through the quantized kernels (as decode steps run); then the engine's fp32 greedy tokens
against transformers' on three prompts (the same weights: exactness on a real model). Modes `kv-fp16`,
`kv-bf16` and `kv-int8` store the KV cache so (`--kv-dtype`) under fp32 weights; the KV bytes a token takes in
the cache and on the link between the pools are printed with each.

    .venv/bin/python benchmarks/quality.py [--model PATH] [--modes w8a8,w4a8,w8a7,int8,kv-fp16,kv-bf16,kv-int8,fp8]

`fp8` is a CUDA mode (`--quantization fp8`): here the decoder's weights are rounded through float8_e4m3 with a
scale per output channel, as its kernel reads them, and run in fp32.

--model: a Hugging Face folder or GGUF file (default: the embedded SmolLM2-135M-Instruct Q4_1); a GGUF file's
"fp32 weights" are its own, dequantized.
"""

from __future__ import annotations

import argparse
import time

import torch

from splitserve.bench.quality import compare, greedy_matches
from splitserve.engine.config import CPU_QUANTIZATIONS
from splitserve.engine.kv_cache import page_bytes
from splitserve.model.checkpoint import model_name, resolve_model
from splitserve.model.config import ModelConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder or .gguf file (default: the embedded model)")
    p.add_argument("--modes", default=",".join([*CPU_QUANTIZATIONS, "kv-fp16", "kv-bf16", "kv-int8", "fp8"]),
                   help="weight quantizations, kv-fp16/-bf16/-int8, or both as w8a8+kv-fp16")  # fmt: skip
    args = p.parse_args()
    started = time.monotonic()
    results = compare(args.model, args.modes.split(","))
    first = results[0]
    print(f"{model_name(args.model)}: {first.tokens} tokens, fp32 perplexity {first.reference_perplexity:.3f}")
    print(f"{'mode':>13} {'top-1 agreement':>16} {'perplexity':>11} {'change':>8} {'KV bytes/token':>15}")
    wide = page_bytes(ModelConfig.from_pretrained(resolve_model(args.model)), 1, torch.float32)
    for q in results:
        fewer = f" ({wide / q.kv_bytes_per_token:.0f}x fewer)" if q.kv_bytes_per_token < wide else ""
        print(f"{q.mode:>13} {q.agreement:>16.1%} {q.perplexity:>11.3f} {q.perplexity_change:>+8.1%} "
              f"{q.kv_bytes_per_token:>8}{fewer}")  # fmt: skip
    print("fp32 greedy tokens against transformers' generate on the same weights:")
    for prompt, same, text in greedy_matches(args.model):
        print(f"  {'same' if same else 'DIFFERENT'}: {prompt!r} -> {text!r}")
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
