"""Disaggregated (1 prefill + 1 decode worker) against colocated (1 worker doing both), same cores, same
streaming workload: TTFT/TPOT percentiles and throughput side by side.

Each mode gets a fresh `splitserve serve` on this machine; the same requests (synthetic token prompts of
exact lengths, forced output lengths) arrive as a Poisson process at `--rate` requests/s.

    .venv/bin/python benchmarks/serving_modes.py [--model PATH] [--requests 48] [--rate 2]
"""

from __future__ import annotations

import argparse
import asyncio
import random

from loadgen import Request, run, summarize

from splitserve.launcher import ServeProcess

MODES = {
    "disaggregated 1P+1D": (["--prefill", "1", "--decode", "1"], 2),
    "colocated (both)": (["--prefill", "0", "--decode", "0", "--both", "1"], 1),
}


def workload(n: int, rate: float, input_len: tuple[int, int], output_len: tuple[int, int], seed: int):
    rng = random.Random(seed)
    t, requests = 0.0, []
    for _ in range(n):
        prompt = [rng.randrange(100, 49000) for _ in range(rng.randint(*input_len))]
        requests.append(Request(prompt, rng.randint(*output_len), arrival_s=t))
        t += rng.expovariate(rate)
    return requests


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals, requests/s")
    p.add_argument("--input-len", default="64:512", help="prompt tokens, uniform MIN:MAX")
    p.add_argument("--output-len", default="32:128", help="output tokens, uniform MIN:MAX")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-args", default="", help="extra `splitserve serve` flags for both modes")
    args = p.parse_args()
    lens = [tuple(int(x) for x in s.split(":")) for s in (args.input_len, args.output_len)]
    requests = workload(args.requests, args.rate, lens[0], lens[1], args.seed)
    print(f"{args.requests} requests, Poisson {args.rate}/s, input {args.input_len}, output {args.output_len} tokens")

    results = {}
    for mode, (flags, workers) in MODES.items():
        server = ServeProcess(args.model, [*flags, *args.serve_args.split()], num_workers=workers)
        try:
            model = server.http.get("/v1/models").json()["data"][0]["id"]
            asyncio.run(run(server.url, model, workload(2, 100, (16, 32), (4, 8), seed=99)))  # warm-up
            timings, duration = asyncio.run(run(server.url, model, requests))
            results[mode] = summarize(timings, duration)
        finally:
            server.stop()

    rows = [("requests/s", "request_throughput", 1, "{:.2f}"), ("output tok/s", "output_throughput", 1, "{:.1f}")]
    for metric in ("ttft", "tpot", "itl", "e2e"):
        for stat in ("mean", "p50", "p90", "p99"):
            rows.append((f"{metric.upper()} {stat} (ms)", f"{metric}_{stat}", 1000, "{:.0f}"))
    rows.append(("failed", "failed", 1, "{:.0f}"))
    modes = list(results)
    print(f"\n{'':22}" + "".join(f"{m:>24}" for m in modes))
    for label, key, scale, fmt in rows:
        print(f"{label:22}" + "".join(f"{fmt.format(results[m][key] * scale):>24}" for m in modes))
    base = results[modes[1]]
    for m in modes[:1]:
        r = results[m]
        print(
            f"\n{m} / {modes[1]}: output throughput {r['output_throughput'] / base['output_throughput']:.2f}x, "
            f"TTFT p90 {r['ttft_p90'] / base['ttft_p90']:.2f}x, TPOT p90 {r['tpot_p90'] / base['tpot_p90']:.2f}x"
        )


if __name__ == "__main__":
    main()
