"""Tensor parallelism on this machine: the engine's decode step at batch 1 and 16 and its prompt tokens/s at 1
rank (the baseline, same run) and at `--widths` ranks, and the weight bytes each rank holds.

The model is a random Llama-shaped checkpoint written once (`--layers`, `--hidden`, ...; the embedded model's 9
heads split 3 ways only); `--mode` picks the weights: fp32 (exact) or w8a8 (serve's default for a safetensors
checkpoint on the CPU). The ranks share the machine's cores (each gets its share of threads, as `serve` gives
them), so on a small CPU more ranks cannot be faster: the figures say what the all-reduces and the plans cost,
not what a device per rank gains.

    .venv/bin/python benchmarks/tensor_parallel.py [--widths 2] [--mode fp32|w8a8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from decode_step import step_ms  # the decode step timed as benchmarks/decode_step.py times it
from transformers import LlamaConfig, LlamaForCausalLM

from splitserve import LLM
from splitserve.engine.params import SamplingParams
from splitserve.engine.request import EngineRequest


def checkpoint(folder: Path, args: argparse.Namespace) -> Path:
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=4096, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def prefill_tokens_per_s(engine, prompt_len: int = 512) -> float:
    params = SamplingParams(max_tokens=1, temperature=0)
    begin = time.perf_counter()
    for k in range(2):
        engine.add_request(EngineRequest(f"p{k}", [200 + (k + j) % 1000 for j in range(prompt_len)], params))
        while engine.has_unfinished():
            engine.step()
    return 2 * prompt_len / (time.perf_counter() - begin)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="2", help="ranks to compare with 1 (default 2)")
    p.add_argument("--mode", default="fp32", choices=("fp32", "w8a8"))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    args = p.parse_args()
    options = {"dtype": "fp32", "quantization": "none"} if args.mode == "fp32" else {"quantization": "w8a8"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = checkpoint(Path(tmp), args)
        cores = torch.get_num_threads()
        for width in [1, *(int(w) for w in args.widths.split(","))]:
            torch.set_num_threads(max(1, cores // width))  # the ranks share the cores, as `serve` splits them
            llm = LLM(str(folder), device="cpu", prefix_caching=False, tensor_parallel=width, **options)
            engine = llm.engine
            try:
                weights = sum(t.numel() * t.element_size() for t in engine.runner.model.state_dict().values())
                kv_token = engine.runner.kv_cache[0].numel() * engine.runner.kv_cache.element_size() / 16
                row = (width, weights / 1e6, kv_token / 1e3, step_ms(llm, 1, 128), step_ms(llm, 16, 128),
                       prefill_tokens_per_s(engine))  # fmt: skip
            finally:
                engine.runner.close()
            rows.append(row)
            print(f"{width} rank(s): rank 0 holds {row[1]:.1f} MB of weights, {row[2]:.1f} KB of KV a token; decode "
                  f"step {row[3]:.1f} ms at batch 1, {row[4]:.1f} ms at 16; prefill {row[5]:.0f} tokens/s",
                  flush=True)  # fmt: skip
    base = rows[0]
    print(f"\n{args.mode} weights, {cores} cores shared by the ranks, against 1 rank (same run):")
    for width, mb, kv, b1, b16, pf in rows[1:]:
        print(f"  {width} ranks: weights per rank {mb / base[1]:.2f}x, KV per token per rank {kv / base[2]:.2f}x, "
              f"step time {b1 / base[3]:.2f}x at batch 1 and {b16 / base[4]:.2f}x at 16, prefill tokens/s "
              f"{pf / base[5]:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
