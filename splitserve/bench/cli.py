"""`splitserve bench`: run a workload against an OpenAI-compatible server at one or more request rates,
print the metrics, save every request's timings as JSON, and draw the charts."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from pathlib import Path

import httpx

from splitserve.bench import metrics, plots, workloads
from splitserve.bench.client import Record, Target, run
from splitserve.errors import SplitserveError
from splitserve.slo import SLO


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL (default %(default)s)")
    p.add_argument("--model", default=None, help="model name to request (default: the server's first /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder or .gguf for exact prompt lengths (default: splitserve's default model)",
    )
    p.add_argument("--workload", choices=["synthetic", "sharegpt", "shared-prefix", "multi-turn", "phased"],
                   default="synthetic")  # fmt: skip
    p.add_argument("--phases", default=None,
                   help="--workload phased: traffic that shifts, phases separated by ';', each DURATION/RATE/INPUT/"
                   "OUTPUT, e.g. '60/0.25/uniform:1000,2000/uniform:16,32;60/1.5/fixed:64/fixed:200' (seconds, "
                   "req/s, prompt and output lengths as --input-len takes them); the report adds each phase's "
                   "figures")  # fmt: skip
    p.add_argument("--dataset", default=None, help="ShareGPT-format JSON file (--workload sharegpt)")
    p.add_argument("--num-requests", type=int, default=100, help="requests (sessions, for multi-turn) per rate")
    p.add_argument("--input-len", default="uniform:64,512", help="prompt tokens: fixed:N, uniform:A,B, normal:M,S, "
                   "lognormal:MEDIAN,SIGMA (default %(default)s)")  # fmt: skip
    p.add_argument("--output-len", default="uniform:32,128", help="output tokens, same forms (default %(default)s)")
    p.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: system prompt tokens")
    p.add_argument("--groups", type=int, default=4, help="shared-prefix: how many system prompts")
    p.add_argument("--turns", type=int, default=3, help="multi-turn: user messages per session")
    p.add_argument("--system-len", type=int, default=0,
                   help="multi-turn: tokens of a system prompt every session shares (default none)")  # fmt: skip
    p.add_argument(
        "--cache-keys",
        action="store_true",
        help="multi-turn: send each session's id as its prompt_cache_key (its KV is kept between turns)",
    )
    p.add_argument("--token-ids", action="store_true", help="completions: send prompts as token ids, not text")
    p.add_argument("--rate", default="inf",
                   help="request rate(s) per second, comma-separated for a sweep; inf sends all at once")  # fmt: skip
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps: 1 Poisson, <1 bursty")
    p.add_argument("--concurrency", type=int, default=None, help="most requests in flight (default: no limit)")
    p.add_argument("--slo", default=None, help="e.g. ttft=0.5,tpot=0.05 (seconds, or ms: tpot=50ms); sets goodput")
    p.add_argument("--no-ignore-eos", action="store_true", help="let the model stop early (default: forced lengths)")
    p.add_argument("--min-tokens", action="store_true",
                   help="force the lengths with min_tokens instead of ignore_eos: the model's own words, so that "
                   "multi-turn answers tokenize in the next turn as they were generated")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default=None, help="this run's name on charts (default: the model)")
    p.add_argument("--output", default=None, help="write results (every request's timings) to this JSON file")
    p.add_argument("--plot", default=None, help="write charts to PREFIX-attainment.png and PREFIX-cdf.png")
    p.add_argument("--compare", nargs="+", default=None, metavar="JSON",
                   help="compare saved results (tables, and charts with --plot; --slo judges them anew)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    if args.compare:
        results = [json.loads(Path(f).read_text()) for f in args.compare]
        if args.slo:  # judge the saved requests against another SLO
            slo = SLO.parse(args.slo)
            for result in results:
                result["slo_text"] = slo.describe()
                for r in result["runs"]:
                    records = [Record(**x) for x in r["records"]]
                    r["summary"] = metrics.summarize(records, r["summary"]["duration_s"], slo)
        for result in results:
            print(f"\n{result['label']}{format_sweep(result)}")
        _plot(results, args.plot or "bench")
        return 0
    slo = SLO.parse(args.slo)
    phases = workloads.Phase.parse_all(args.phases or "") if args.workload == "phased" else None
    if phases and str(args.rate) != "inf":
        raise ValueError("--workload phased takes its rates from --phases, not --rate")
    rates = [phased_rate(phases)] if phases else [float(r) for r in str(args.rate).split(",")]
    if any(not r > 0 for r in rates):
        raise ValueError("rates must be > 0 (inf: all at once)")
    model = served_model(args.url, args.api_key, args.model)
    target = Target(args.url.rstrip("/"), model, args.endpoint, args.api_key, not args.no_ignore_eos,
                    args.min_tokens, args.cache_keys)  # fmt: skip
    tokenizer = tokenizer_for(args.tokenizer)
    requests = _workload(args, tokenizer)
    print(f"splitserve bench: {len(requests)} {args.workload} requests to {args.url} ({args.endpoint}, model {model}) "
          f"at {', '.join(f'{r:g}' for r in rates)} req/s", flush=True)  # fmt: skip
    result = {"label": args.label or model, "model": model, "url": args.url, "endpoint": args.endpoint,
              "workload": _describe(args), "slo": vars(slo), "slo_text": slo.describe(), "runs": []}  # fmt: skip
    for rate in rates:
        if phases is None:
            workloads.assign_arrivals(requests, rate, args.burstiness, random.Random(args.seed + 1))
        unit = "sessions" if args.workload == "multi-turn" else "requests"
        print(f"\n--- rate {rate:g} req/s ({len(requests)} {unit})")
        records, duration = asyncio.run(run(target, requests, args.concurrency, progress=not args.no_progress))
        summary = metrics.summarize(records, duration, slo)
        print(format_summary(summary))
        if phases is not None:
            summary["phases"] = phase_summaries(records, phases, slo)
        if not summary["completed"]:
            first = next((r.error for r in records if r.error), "no output")
            raise SplitserveError(f"no request completed at {args.url} (the first failed with: {first})")
        result["runs"].append({"rate": rate, "summary": summary, "records": [r.to_json() for r in records]})
        time.sleep(1)  # let the server drain between rates
    if len(rates) > 1:
        print(format_sweep(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
        print(f"results: {args.output}")
    if args.plot:
        _plot([result], args.plot)
    return 0


def phased_rate(phases: list[workloads.Phase]) -> float:
    """A phased workload's mean arrival rate."""
    return sum(p.rate * p.duration_s for p in phases) / sum(p.duration_s for p in phases)


def phase_summaries(records: list[Record], phases: list[workloads.Phase], slo: SLO) -> list[dict]:
    """Each phase's figures (its requests, over its duration), printed as they are made."""
    out = []
    for i, phase in enumerate(phases):
        mine = [r for r in records if r.phase == i]
        if not mine:
            out.append({})
            continue
        summary = metrics.summarize(mine, phase.duration_s, slo)
        print(f"\nphase {i + 1}: {phase.rate:g} req/s for {phase.duration_s:g}s, prompts {phase.input_len.spec}, "
              f"outputs {phase.output_len.spec}\n{format_summary(summary)}")  # fmt: skip
        out.append(summary)
    return out


def format_summary(s: dict) -> str:
    lines = [f"completed {s['completed']:.0f}/{s['requests']:.0f} in {s['duration_s']:.1f}s   "
             f"{s['request_throughput']:.2f} req/s   {s['output_throughput']:.1f} output tok/s   "
             f"{s['total_token_throughput']:.1f} total tok/s"]  # fmt: skip
    if "goodput" in s:
        lines.append(f"goodput {s['goodput']:.2f} req/s   SLO attainment {100 * s['slo_attainment']:.1f}%")
    lines.append(f"{'(ms)':8}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}")
    for m in metrics.METRICS:
        values = [s[f"mean_{m}"], *(s[f"p{q}_{m}"] for q in metrics.PERCENTILES)]
        lines.append(f"{m.upper():8}" + "".join(f"{1000 * v:9.1f}" for v in values))
    return "\n".join(lines)


def format_sweep(result: dict) -> str:
    lines = [f"\n{'rate':>8}{'req/s':>9}{'goodput':>9}{'attain %':>10}{'p90 TTFT':>10}{'p90 TPOT':>10}"]
    for run_ in result["runs"]:
        s = run_["summary"]
        attain = 100 * s["slo_attainment"] if "slo_attainment" in s else math.nan
        lines.append(f"{run_['rate']:8g}{s['request_throughput']:9.2f}{s.get('goodput', math.nan):9.2f}{attain:10.1f}"
                     f"{1000 * s['p90_ttft']:10.1f}{1000 * s['p90_tpot']:10.1f}")  # fmt: skip
    return "\n".join(lines)


def _plot(results: list[dict], prefix: str) -> None:
    if any(r["runs"] and "slo_attainment" in r["runs"][0]["summary"] for r in results):
        print(f"chart: {plots.attainment_vs_rate(results, Path(f'{prefix}-attainment.png'))}")
    print(f"chart: {plots.latency_cdfs(results, Path(f'{prefix}-cdf.png'))}")


def served_model(url: str, api_key: str | None, model: str | None = None) -> str:
    """`model`, or the server's first model; a server that does not answer is a one-line error."""
    try:
        first = _first_model(url, api_key)  # asked even when `model` is given: is anyone there?
    except httpx.HTTPError as e:
        raise SplitserveError(f"no OpenAI-compatible server answers at {url} ({type(e).__name__}: {e})") from None
    except (KeyError, IndexError, ValueError) as e:
        raise SplitserveError(f"{url}/v1/models did not list a model ({e})") from None
    return model or first


def _first_model(url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(f"{url.rstrip('/')}/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def tokenizer_for(spec: str | None):
    from splitserve.model.checkpoint import resolve_model
    from splitserve.model.tokenizer import load_tokenizer

    folder = resolve_model(spec)
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise ValueError(f"{folder} has no tokenizer (pass --tokenizer)")
    return tokenizer


def _workload(args: argparse.Namespace, tokenizer) -> list[workloads.BenchRequest]:
    rng = random.Random(args.seed)
    chat = args.endpoint == "chat"
    inp, out = workloads.LengthDist(args.input_len), workloads.LengthDist(args.output_len)
    if args.workload == "synthetic":
        return workloads.synthetic(tokenizer, args.num_requests, inp, out, rng, chat, args.token_ids)
    if args.workload == "sharegpt":
        if not args.dataset:
            raise ValueError("--workload sharegpt needs --dataset FILE.json")
        return workloads.sharegpt(Path(args.dataset), tokenizer, args.num_requests, rng, chat=chat)
    if args.workload == "phased":
        if not args.phases:
            raise ValueError("--workload phased needs --phases")
        phases = workloads.Phase.parse_all(args.phases)
        return workloads.phased(tokenizer, phases, rng, args.burstiness, chat, args.token_ids)
    if args.workload == "shared-prefix":
        per_group = max(1, args.num_requests // args.groups)
        return workloads.shared_prefix(tokenizer, args.groups, per_group, args.prefix_len, inp, out, rng, chat)
    if not chat:
        raise ValueError("--workload multi-turn needs --endpoint chat")
    return workloads.multi_turn(tokenizer, args.num_requests, args.turns, inp, out, rng, args.system_len)


def _describe(args: argparse.Namespace) -> dict:
    keys = ("workload", "dataset", "num_requests", "input_len", "output_len", "prefix_len", "groups", "turns",
            "phases", "burstiness", "concurrency", "seed")  # fmt: skip
    return {k: getattr(args, k) for k in keys}
