"""Output tokens/s of splitserve's engine against Hugging Face `generate`, same model, prompts and dtype.

Two scenarios, measured in one run:
  1 stream       requests one after another (time per output token, prefill included)
  N concurrent   all requests submitted at once (continuous batching); transformers runs them one at a
                 time (what a server without batching does) and as one left-padded static batch

The 1-stream scenario also reports time per output token after the first (prefill excluded).
Output lengths are forced (ignore_eos here, min_new_tokens in transformers), so both make the same tokens.

    .venv/bin/python benchmarks/engine_throughput.py [--model PATH] [--dtype bf16] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from transformers import AutoModelForCausalLM

from splitserve import LLM, SamplingParams
from splitserve.engine.config import DTYPES, torch_dtype

WORDS = (
    "the model reads a prompt and writes an answer one token at a time while the scheduler keeps many "
    "requests in flight so that every forward pass does useful work for all of them at once"
).split()


def make_workload(tokenizer, n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """n prompts of 16-256 tokens and output lengths of 32-128 tokens."""
    rng = random.Random(seed)
    prompts, outputs = [], []
    for _ in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(400))
        prompts.append(tokenizer(text).input_ids[: rng.randint(16, 256)])
        outputs.append(rng.randint(32, 128))
    return prompts, outputs


def run_ours(llm: LLM, prompts, outputs) -> float:
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in outputs]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert [len(o.token_ids) for o in outs] == outputs
    return elapsed


def run_hf_one_at_a_time(model, prompts, outputs) -> float:
    start = time.perf_counter()
    for ids, n in zip(prompts, outputs, strict=True):
        x = torch.tensor([ids])
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        assert y.shape[1] - len(ids) == n
    return time.perf_counter() - start


def run_hf_padded_batch(model, prompts, outputs, pad_id: int) -> float:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    n = max(outputs)  # a static batch runs until its longest request is done
    model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad_id)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder or .gguf (default: embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--single-requests", type=int, default=4, help="requests in the 1-stream scenario")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    llm = LLM(args.model, dtype=args.dtype, device="cpu")
    tok = llm.tokenizer
    hf = AutoModelForCausalLM.from_pretrained(llm.engine.model_path, dtype=torch_dtype(args.dtype)).eval()
    prompts, outputs = make_workload(tok, args.concurrency, args.seed)
    print(f"model {llm.engine.model_path.name}  dtype {args.dtype}  torch threads {torch.get_num_threads()}")

    # Warm up both (first calls pay for one-off allocations and kernel selection).
    run_ours(llm, prompts[:2], [4, 4])
    with torch.inference_mode():
        run_hf_one_at_a_time(hf, prompts[:1], [4])

    rows = []
    k = args.single_requests
    single_tokens = sum(outputs[:k])
    # Interleave the two engines request by request, so that both see the same background load.
    t_ours = t_hf = first_ours = first_hf = 0.0
    with torch.inference_mode():
        for p, n in zip(prompts[:k], outputs[:k], strict=True):
            t_ours += run_ours(llm, [p], [n])
            t_hf += run_hf_one_at_a_time(hf, [p], [n])
            # The same request stopped after one token: what remains is time per output token after the first.
            first_ours += run_ours(llm, [p], [1])
            first_hf += run_hf_one_at_a_time(hf, [p], [1])
    tpot_ours = (t_ours - first_ours) / (single_tokens - k)
    tpot_hf = (t_hf - first_hf) / (single_tokens - k)
    rows.append(("1 stream", "splitserve", single_tokens, t_ours, t_hf))
    rows.append(("1 stream", "transformers", single_tokens, t_hf, t_hf))

    total = sum(outputs)
    t_ours = run_ours(llm, prompts, outputs)
    with torch.inference_mode():
        t_hf_seq = run_hf_one_at_a_time(hf, prompts, outputs)
        t_hf_batch = run_hf_padded_batch(hf, prompts, outputs, tok.pad_token_id or 0)
    c = f"{args.concurrency} concurrent"
    rows.append((c, "splitserve", total, t_ours, t_hf_seq))
    rows.append((c, "transformers, one at a time", total, t_hf_seq, t_hf_seq))
    rows.append((c, "transformers, padded batch", total, t_hf_batch, t_hf_seq))

    print(f"\n{'scenario':<16}{'engine':<30}{'out tok/s':>11}{'ms/token':>10}{'vs HF one-at-a-time':>22}")
    for scenario, engine, tokens, seconds, baseline in rows:
        print(
            f"{scenario:<16}{engine:<30}{tokens / seconds:>11.1f}{1000 * seconds / tokens:>10.2f}"
            f"{baseline / seconds:>21.2f}x"
        )
    print(
        f"\n1 stream, time per output token after the first: splitserve {1000 * tpot_ours:.1f} ms, "
        f"transformers {1000 * tpot_hf:.1f} ms ({tpot_hf / tpot_ours:.2f}x)"
    )
    print(f"{c}: splitserve / transformers padded batch = {t_hf_batch / t_ours:.2f}x")


if __name__ == "__main__":
    main()
