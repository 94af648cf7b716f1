"""Multi-turn chat behind a shared system prompt: prefix caching, conversation retention and KV-aware routing,
against the same cluster without them, on the same cluster shapes, in one run.

Every conversation starts with the same system prompt and sends each next turn (the whole conversation so
far, with the server's real answers) as soon as the previous answer is complete, all conversations at once.
Three runs per cluster shape, each on a fresh `splitserve serve`:

  cache              prefix caching on, each conversation's id as its prompt_cache_key
  no cache           `--no-prefix-caching`: every turn prefills the whole conversation
  new tokens alone   the same turns with only their own user message (no system prompt, no history):
                     what a turn's TTFT would be if only its new tokens had to be prefilled (on a lighter
                     load: without the history, every decode step is cheaper too)

A fourth variant, `offload`, is the cache run with a KV offload tier (`--kv-offload-memory`): run it at a page
pool too small for every conversation, with fewer requests in flight than conversations, so that waiting
conversations' pages are given up between turns (and, with the tier, copied out and back):

    .venv/bin/python benchmarks/multiturn.py --variants cache,offload --shapes 1P+1D --concurrency 4 \
        --serve-args "--kv-cache-memory 280MiB"

During the cache run, a probe every few seconds sends a request made of one user message of the same length
as the turns' (max_tokens 1, no cache key): the TTFT of prefilling new tokens alone under the same load.

Reported: median TTFT of turns 3 and later, the ratios the targets speak of (cache / new tokens alone, in
its own run and by the probes; no cache / cache), the workers' prefix cache hit rate, and the router's local
prefills. Answers are forced to their lengths with min_tokens (the model's own words), so that they tokenize
in the next turn as they were generated.

    .venv/bin/python benchmarks/multiturn.py                      # 16 conversations x 6 turns, 1,000-token system
    .venv/bin/python benchmarks/multiturn.py --sessions 4 --turns 3 --system-len 200   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import statistics
import time
from pathlib import Path

import httpx

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
    "offload": (["--kv-offload-memory", "OFFLOAD"], True, True),  # OFFLOAD: --offload-memory
}
DEFAULT_VARIANTS = "cache,no cache,new tokens alone"


async def _with_probes(target: Target, sessions, messages: list[list[dict]], every_s: float, concurrency: int | None,
                       progress: bool):  # fmt: skip
    """Run the sessions; meanwhile send probe requests one at a time, `every_s` apart, until they end.
    Returns (records, duration, probe TTFTs)."""
    probe_ttfts: list[float] = []
    done = asyncio.Event()

    async def probes() -> None:
        async with httpx.AsyncClient(base_url=target.url, timeout=None) as client:
            for i in itertools.count():
                if done.is_set():
                    return
                body = {"model": target.model, "messages": messages[i % len(messages)], "max_tokens": 1,
                        "stream": True, "temperature": 0}  # fmt: skip
                start = time.perf_counter()
                async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if '"content"' in line and '"content":""' not in line:
                            probe_ttfts.append(time.perf_counter() - start)
                            break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(done.wait(), every_s)

    task = asyncio.create_task(probes())
    records, duration = await run(target, sessions, concurrency, progress)
    done.set()
    await task
    return records, duration, probe_ttfts


def run_variant(args, tokenizer, shape: str, variant: str) -> dict:
    flags, workers = SHAPES[shape]
    extra, keys, history = VARIANTS[variant]
    rng = random.Random(args.seed)  # the same conversations in every run
    sessions = workloads.multi_turn(tokenizer, args.sessions, args.turns, workloads.LengthDist(args.user_len),
                                    workloads.LengthDist(args.output_len), rng, args.system_len, history)  # fmt: skip
    extra = [args.offload_memory if flag == "OFFLOAD" else flag for flag in extra]
    server = ServeProcess(args.model, [*flags, *extra, *args.serve_args.split()], num_workers=workers)
    try:
        model = server.http.get("/v1/models").json()["data"][0]["id"]
        target = Target(server.url, model, "chat", min_tokens=True, session_cache_keys=keys)
        if variant == "cache" and args.probe_every > 0:
            alone = workloads.multi_turn(tokenizer, 8, 1, workloads.LengthDist(args.user_len),
                                         workloads.LengthDist("fixed:1"), random.Random(args.seed + 7))  # fmt: skip
            records, duration, probes = asyncio.run(_with_probes(target, sessions, [r.messages for r in alone],
                                                                 args.probe_every, args.concurrency,
                                                                 not args.no_progress))  # fmt: skip
        else:
            records, duration = asyncio.run(run(target, sessions, args.concurrency, not args.no_progress))
            probes = []
        time.sleep(0.6)  # the workers' last heartbeats carry their cache counters
        text = server.http.get("/metrics").text
    finally:
        server.stop()
    later = [metrics.ttft(r) for r in records if r.ok and r.turn >= 2]
    queries, hits = (
        metrics.prometheus_total(text, "splitserve_prefix_cache_queries_total"),
        metrics.prometheus_total(text, "splitserve_prefix_cache_hits_total"),
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
        "probe_median_ttft_s": statistics.median(probes) if probes else None,
        "probes": probes,
        "offload": {
            key: metrics.prometheus_total(text, f"splitserve_offload_{key}_total")
            for key in (
                "pages_stored",
                "pages_loaded",
                "bytes_written",
                "bytes_read",
                "seconds_writing",
                "seconds_reading",
            )
        },
        "local_prefills": metrics.prometheus_total(text, "splitserve_router_local_prefills_total"),
        "prefix_routed": metrics.prometheus_total(text, "splitserve_router_prefix_routed_requests_total"),
        "records": [r.to_json() for r in records],
    }
    print(f"{shape:>10} | {variant:<16} | {duration:6.1f} s | turn 3+ median TTFT "
          f"{result['median_ttft_turn3plus_s'] * 1000:7.0f} ms | hit rate {result['hit_rate']:5.1%} | "
          f"local prefills {result['local_prefills']:.0f} | failed {result['failed']}", flush=True)  # fmt: skip
    tier = result["offload"]
    if tier["pages_stored"]:
        write = tier["bytes_written"] / max(tier["seconds_writing"], 1e-9) / 1e9
        read = tier["bytes_read"] / max(tier["seconds_reading"], 1e-9) / 1e9
        print(f"{'':>10} | {'':<16} | offload: {tier['pages_stored']:.0f} pages stored at {write:.2f} GB/s, "
              f"{tier['pages_loaded']:.0f} loaded back at {read:.2f} GB/s", flush=True)  # fmt: skip
    if probes:
        print(f"{'':>10} | {'':<16} | probes: {len(probes)}, median TTFT of new tokens alone under this load "
              f"{result['probe_median_ttft_s'] * 1000:.0f} ms", flush=True)  # fmt: skip
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
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated, of {', '.join(VARIANTS)} (default %(default)s)")  # fmt: skip
    p.add_argument("--concurrency", type=int, default=None,
                   help="requests in flight at most (default: every session's turn at once); fewer leave the "
                        "other conversations waiting, their KV kept (or given up) between turns")  # fmt: skip
    p.add_argument("--serve-args", default="", help="extra `splitserve serve` flags for every run")
    p.add_argument("--offload-memory", default="2GiB",
                   help="the offload variant's --kv-offload-memory (default %(default)s)")  # fmt: skip
    p.add_argument("--probe-every", type=float, default=4.0,
                   help="seconds between probes during the cache run (0: none) (default 4)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results (every turn's timings) to this JSON file")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    tokenizer = tokenizer_for(args.model)
    print(f"{args.sessions} conversations x {args.turns} turns, system prompt {args.system_len} tokens, user "
          f"{args.user_len}, answers {args.output_len} tokens")  # fmt: skip
    variants = args.variants.split(",")
    results = [run_variant(args, tokenizer, shape, v) for shape in args.shapes.split(",") for v in variants]
    print("\nmedian TTFT of turns 3+ (targets: cache <= 1.5x new tokens alone, >= 3x lower than no cache; with a "
          "pool too small for every conversation, offload >= 3x lower than cache)")  # fmt: skip
    for shape in args.shapes.split(","):
        runs = {r["variant"]: r for r in results if r["shape"] == shape}
        by = {v: r["median_ttft_turn3plus_s"] for v, r in runs.items()}
        nan = float("nan")
        cache, none, alone = (by.get(v, nan) for v in ("cache", "no cache", "new tokens alone"))
        probe = (runs.get("cache") or {}).get("probe_median_ttft_s") or nan
        print(f"{shape:>10}: cache {cache * 1000:.0f} ms; new tokens alone {alone * 1000:.0f} ms in their own run "
              f"-> {cache / alone:.2f}x, {probe * 1000:.0f} ms by the probes under the same load -> "
              f"{cache / probe:.2f}x (target <= 1.5x); no cache {none * 1000:.0f} ms -> {none / cache:.1f}x lower "
              f"with the cache (target >= 3x)")  # fmt: skip
        if "offload" in by:
            print(f"{'':>10}  offload {by['offload'] * 1000:.0f} ms -> {cache / by['offload']:.1f}x lower than the "
                  f"cache alone (target >= 3x where the pool cannot hold every conversation)")  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
