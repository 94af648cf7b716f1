"""Disaggregated (1 prefill + 1 decode worker) against colocated (1 worker doing both) on the same cores,
the same streaming workload at one or more request rates: TTFT/TPOT/ITL percentiles, throughput and, with
an SLO, goodput and attainment, side by side; results as `splitserve bench` JSON, and charts. Each rate sends
prompts no server has seen (prefix caches never hit); every server gets the same ones.

Each mode gets a fresh `splitserve serve` on this machine. `--also-url` adds any other OpenAI-compatible
server (e.g. llama.cpp's llama-server, see benchmarks/README.md) to the same runs and charts.

    .venv/bin/python benchmarks/serving_modes.py --rates 2 --requests 48
    .venv/bin/python benchmarks/serving_modes.py --rates 0.5,1,1.5,2 --slo ttft=1.5,tpot=0.1 --out out/sweep
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

from splitserve.bench import metrics, plots, workloads
from splitserve.bench.cli import format_summary, tokenizer_for
from splitserve.bench.client import Target, run
from splitserve.launcher import ServeProcess

MODES = {
    "disaggregated 1P+1D": (["--prefill", "1", "--decode", "1"], 2),
    "colocated (both)": (["--prefill", "0", "--decode", "0", "--both", "1"], 1),
}


def sweep(label: str, target: Target, warm_up, per_rate: list, rates: list[float], slo: metrics.SLO, seed: int) -> dict:
    """`per_rate`: the requests of each rate, prompts never sent before (no prefix cache hits)."""
    asyncio.run(run(target, warm_up, progress=False))
    result = {"label": label, "slo_text": slo.describe(), "runs": []}
    for rate, requests in zip(rates, per_rate, strict=True):
        workloads.assign_arrivals(requests, rate, 1.0, random.Random(seed + 1))
        records, duration = asyncio.run(run(target, requests, progress=False))
        summary = metrics.summarize(records, duration, slo)
        print(f"\n{label} @ {rate:g} req/s\n{format_summary(summary)}", flush=True)
        result["runs"].append({"rate": rate, "summary": summary, "records": [r.to_json() for r in records]})
        time.sleep(1)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--requests", type=int, default=48, help="requests per rate")
    p.add_argument("--rates", default="2", help="Poisson request rates, comma-separated")
    p.add_argument("--input-len", default="uniform:64,512")
    p.add_argument("--output-len", default="uniform:32,128")
    p.add_argument("--slo", default=None, help="e.g. ttft=1.5,tpot=0.1: adds goodput and attainment")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--serve-args", default="", help="extra `splitserve serve` flags for both modes")
    p.add_argument("--also-url", default=None, help="another OpenAI-compatible server to run the same workload on")
    p.add_argument("--also-label", default="other server")
    p.add_argument("--out", default=None, help="write PREFIX-LABEL.json results and PREFIX-*.png charts")
    args = p.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    slo = metrics.SLO.parse(args.slo)
    tokenizer = tokenizer_for(args.model)
    lens = workloads.LengthDist(args.input_len), workloads.LengthDist(args.output_len)
    # Fresh prompts at every rate (the same ones for every server): a prompt sent twice would hit a prefix cache.
    requests = workloads.synthetic(tokenizer, 2 + args.requests * len(rates), *lens, random.Random(args.seed))
    warm_up = requests[:2]
    per_rate = [requests[2 + i * args.requests : 2 + (i + 1) * args.requests] for i in range(len(rates))]
    print(f"{args.requests} requests per rate, Poisson {args.rates}/s, input {args.input_len}, "
          f"output {args.output_len} tokens, SLO {slo.describe()}")  # fmt: skip

    results = []
    for mode, (flags, workers) in MODES.items():
        server = ServeProcess(args.model, [*flags, *args.serve_args.split()], num_workers=workers)
        try:
            model = server.http.get("/v1/models").json()["data"][0]["id"]
            results.append(sweep(mode, Target(server.url, model), warm_up, per_rate, rates, slo, args.seed))
        finally:
            server.stop()
    if args.also_url:
        from splitserve.bench.cli import served_model

        target = Target(args.also_url, served_model(args.also_url, None))
        results.append(sweep(args.also_label, target, warm_up, per_rate, rates, slo, args.seed))

    keys = [("req/s", "request_throughput", 1), ("out tok/s", "output_throughput", 1),
            ("p50 TTFT ms", "p50_ttft", 1000), ("p90 TTFT ms", "p90_ttft", 1000), ("p99 TTFT ms", "p99_ttft", 1000),
            ("p50 TPOT ms", "p50_tpot", 1000), ("p90 TPOT ms", "p90_tpot", 1000), ("p99 TPOT ms", "p99_tpot", 1000),
            ("p99 ITL ms", "p99_itl", 1000)]  # fmt: skip
    if slo:
        keys += [("goodput req/s", "goodput", 1), ("attainment %", "slo_attainment", 100)]
    for i, rate in enumerate(rates):
        print(f"\n--- {rate:g} req/s" + "".join(f"{r['label'][:22]:>24}" for r in results))
        for name, key, scale in keys:
            print(f"{name:>16}" + "".join(f"{r['runs'][i]['summary'][key] * scale:24.1f}" for r in results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        for r in results:
            slug = "".join(c if c.isalnum() else "-" for c in r["label"]).strip("-")
            Path(f"{args.out}-{slug}.json").write_text(json.dumps(r))
        if slo and len(rates) > 1:
            print(f"chart: {plots.attainment_vs_rate(results, Path(f'{args.out}-attainment.png'))}")
        print(f"chart: {plots.latency_cdfs(results, Path(f'{args.out}-cdf.png'))}")


if __name__ == "__main__":
    main()
