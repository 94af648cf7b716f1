"""Multi-turn chat behind a shared system prompt: prefix caching, conversation retention and KV-aware routing,
against the same cluster without them, on the same cluster shapes, in one run.

Every conversation starts with the same system prompt and sends each next turn (the whole conversation so
far, with the server's real answers) as soon as the previous answer is complete, all conversations at once.
Three runs per cluster shape, each on a fresh `splitserve serve`:

  cache              prefix caching on, each conversation's id as its prompt_cache_key
  no cache           `--no-prefix-caching`: every turn prefills the whole conversation
  new tokens alone   the same turns with only their own user message (no system prompt, no history):
                     what a turn's TTFT would be if only its new tokens had to be prefilled

Reported: median TTFT of turns 3 and later, the ratios the targets speak of (cache / new tokens alone,
no cache / cache), the workers' prefix cache hit rate, and the router's local prefills. Answers are forced to
their lengths with min_tokens (the model's own words), so that they tokenize in the next turn as generated.

    .venv/bin/python benchmarks/multiturn.py                      # 16 conversations x 6 turns, 1,000-token system
    .venv/bin/python benchmarks/multiturn.py --sessions 4 --turns 3 --system-len 200   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import time
from pathlib import Path

from splitserve.bench import metrics, workloads
from splitserve.bench.cli import tokenizer_for
from splitserve.bench.client import Target, run
from splitserve.launcher import ServeProcess

SHAPES = {
    "1P+1D": (["--prefill", "1", "--decode", "1"], 2),
    "colocated": (["--prefill", "0", "--decode", "0", "--both", "1"], 1),
}
VARIANTS = {  # name: (extra serve flags, prompt_cache_key per session, turns carry the conversation)
    "cache": ([], True, True),
    "no cache": (["--no-prefix-caching"], False, True),
    "new tokens alone": ([], False, False),
}


def _counter(text: str, name: str) -> float:
    return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def run_variant(args, tokenizer, shape: str, variant: str) -> dict:
    flags, workers = SHAPES[shape]
    extra, keys, history = VARIANTS[variant]
    rng = random.Random(args.seed)  # the same conversations in every run
    sessions = workloads.multi_turn(tokenizer, args.sessions, args.turns, workloads.LengthDist(args.user_len),
                                    workloads.LengthDist(args.output_len), rng, args.system_len, history)  # fmt: skip
    server = ServeProcess(args.model, [*flags, *extra, *args.serve_args.split()], num_workers=workers)
    try:
        model = server.http.get("/v1/models").json()["data"][0]["id"]
        target = Target(server.url, model, "chat", min_tokens=True, session_cache_keys=keys)
        records, duration = asyncio.run(run(target, sessions, progress=not args.no_progress))
        time.sleep(0.6)  # the workers' last heartbeats carry their cache counters
        text = server.http.get("/metrics").text
    finally:
        server.stop()
    later = [metrics.ttft(r) for r in records if r.ok and r.turn >= 2]
    queries, hits = (
        _counter(text, "splitserve_prefix_cache_queries_total"),
        _counter(text, "splitserve_prefix_cache_hits_total"),
    )
    result = {
        "shape": shape,
        "variant": variant,
        "duration_s": duration,
        "failed": sum(not r.ok for r in records),
        "turns": len(records),
        "median_ttft_turn3plus_s": statistics.median(later) if later else float("nan"),
        "median_ttft_all_s": statistics.median(metrics.ttft(r) for r in records if r.ok),
        "hit_rate": hits / queries if queries else 0.0,
        "local_prefills": _counter(text, "splitserve_router_local_prefills_total"),
        "prefix_routed": _counter(text, "splitserve_router_prefix_routed_requests_total"),
        "records": [r.to_json() for r in records],
    }
    print(f"{shape:>10} | {variant:<16} | {duration:6.1f} s | turn 3+ median TTFT "
          f"{result['median_ttft_turn3plus_s'] * 1000:7.0f} ms | hit rate {result['hit_rate']:5.1%} | "
          f"local prefills {result['local_prefills']:.0f} | failed {result['failed']}", flush=True)  # fmt: skip
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--sessions", type=int, default=16, help="concurrent conversations (default 16)")
    p.add_argument("--turns", type=int, default=6, help="user turns per conversation (default 6)")
    p.add_argument("--system-len", type=int, default=1000, help="shared system prompt tokens (default 1000)")
    p.add_argument("--user-len", default="uniform:50,100", help="tokens per user message (default %(default)s)")
    p.add_argument("--output-len", default="uniform:100,200", help="tokens per answer (default %(default)s)")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--serve-args", default="", help="extra `splitserve serve` flags for every run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results (every turn's timings) to this JSON file")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    tokenizer = tokenizer_for(args.model)
    print(f"{args.sessions} conversations x {args.turns} turns, system prompt {args.system_len} tokens, user "
          f"{args.user_len}, answers {args.output_len} tokens")  # fmt: skip
    variants = args.variants.split(",")
    results = [run_variant(args, tokenizer, shape, v) for shape in args.shapes.split(",") for v in variants]
    print("\nmedian TTFT of turns 3+ (target: cache <= 1.5x new tokens alone, and >= 3x lower than no cache)")
    for shape in args.shapes.split(","):
        by = {r["variant"]: r["median_ttft_turn3plus_s"] for r in results if r["shape"] == shape}
        nan = float("nan")
        cache, none, alone = (by.get(v, nan) for v in ("cache", "no cache", "new tokens alone"))
        print(f"{shape:>10}: cache {cache * 1000:.0f} ms, new tokens alone {alone * 1000:.0f} ms "
              f"-> {cache / alone:.2f}x (target <= 1.5x, {'met' if cache <= 1.5 * alone else 'missed'}); "
              f"no cache {none * 1000:.0f} ms -> {none / cache:.1f}x lower with the cache (target >= 3x, "
              f"{'met' if none >= 3 * cache else 'missed'})")  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
