"""What a prefix-cache hit leaves to compute: the engine's time to first token for `new` tokens after `history`
cached tokens, against the same number of new tokens alone, in one run (no HTTP, no other load).

With the history in the prefix cache, a turn's prefill runs its new tokens through the layers (as alone) and
also attends from each of them to the whole history: that attention is what the cache cannot save, and on a
CPU it is fp32 arithmetic (about 2 * 2 * heads * head_dim FLOPs per new token and history token per layer).
The ratio printed is issue 15's "TTFT of turns 3+ within 1.5x of prefilling their new tokens alone" at the
engine, before any queueing: the best a server can do on this machine. Each figure is the best of three.

    .venv/bin/python benchmarks/prefix_prefill.py [--model PATH] [--history 1000,1600] [--new 75,150]
"""

from __future__ import annotations

import argparse
import random
import time

from splitserve import LLM, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--history", default="1000,1600", help="cached tokens before the new ones")
    p.add_argument("--new", default="75,150", help="new tokens to prefill")
    args = p.parse_args()
    llm = LLM(args.model)
    cfg = llm.engine.model_config
    print(f"{llm.engine.config.describe_dtype()}; {cfg.num_layers} layers, {cfg.num_heads} heads of {cfg.head_dim}")
    first = SamplingParams(max_tokens=1, temperature=0)
    rng = random.Random(0)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(1000, cfg.vocab_size - 1000) for _ in range(n)]

    def ms(prompt: list[int]) -> float:
        start = time.perf_counter()
        llm.generate([prompt], first, use_tqdm=False)
        return (time.perf_counter() - start) * 1000

    for history in map(int, args.history.split(",")):
        for new in map(int, args.new.split(",")):
            cached, alone = [], []
            for _ in range(3):
                past = tokens(history)
                ms(past)  # the history into the prefix cache
                cached.append(ms(past + tokens(new)))
                alone.append(ms(tokens(new)))
            attention_gflop = 4 * cfg.num_heads * cfg.head_dim * new * history * cfg.num_layers / 1e9
            extra = min(cached) - min(alone)
            rate = attention_gflop / extra * 1000
            print(f"history {history:5d}, new {new:4d}: {min(cached):6.0f} ms with the history cached, "
                  f"{min(alone):6.0f} ms alone -> {min(cached) / min(alone):.2f}x; attention to the history "
                  f"{attention_gflop:.1f} GFLOP in {extra:.0f} ms ({rate:.0f} GFLOP/s)")  # fmt: skip


if __name__ == "__main__":
    main()
