"""`splitserve plan`: profile (or load a profile), simulate every split, print the table, recommend."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from splitserve.bench.workloads import LengthDist, Phase
from splitserve.engine.config import EngineConfig
from splitserve.slo import SLO

if TYPE_CHECKING:
    from splitserve.planner.profile import Profile


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", default="2,3", help="numbers of workers to split, comma-separated (default 2,3)")
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="the request rate to plan for (requests/s; with --phases, their mean rate by default)",
    )
    p.add_argument("--slo", required=True, help="e.g. ttft=1,tpot=0.1 (seconds, or ms: tpot=100ms)")
    p.add_argument("--target", type=float, default=0.9, help="share of requests that must meet the SLO (0.9)")
    p.add_argument("--input-len", default="uniform:64,512", help="prompt tokens (as `splitserve bench`)")
    p.add_argument("--output-len", default="uniform:32,128", help="output tokens (as `splitserve bench`)")
    p.add_argument(
        "--phases",
        default=None,
        help="traffic that shifts, as `splitserve bench --phases` (instead of --input-len/--output-len)",
    )
    p.add_argument(
        "--adaptive",
        action="store_true",
        help="also predict each split as the start of an adaptive cluster (`serve --slo`: decode "
        "workers prefill short prompts, workers move between the pools)",
    )
    p.add_argument("--link", default=None, metavar="RATE|URL",
                   help="the link KV crosses between the pools: a rate (1gbit, 10gbit, 2.5GB/s) or a running "
                   "splitserve's URL to learn it from its transfers (default: the saved profile's, else UCX over "
                   "loopback, about 4 GB/s). A slow link can make colocated workers the better plan")  # fmt: skip
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps (1: Poisson)")
    p.add_argument("--num-requests", type=int, default=400, help="simulated requests per point (default 400)")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="cores the workers share (default: all)")
    p.add_argument("--profile", nargs="+", default=None, metavar="JSON",
                   help="saved profiles (one per threads-per-worker) instead of profiling now")  # fmt: skip
    p.add_argument("--save-profile", default=None, metavar="PREFIX", help="save profiles as PREFIX-tN.json")
    p.add_argument("--plot", default=None, help="write the predicted attainment-vs-rate chart to this PNG")
    p.add_argument(
        "--quick", action="store_true", help="profile fewer points, each timed once (about a minute on 2 cores)"
    )
    p.add_argument("--apply", nargs="?", const="auto", default=None, metavar="RAY_ADDRESS",
                   help="resize the pools of the cluster `serve --ray` runs on that Ray cluster (default auto: this "
                   "node's) to the recommended split, as `splitserve scale` does")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace, engine: EngineConfig) -> int:
    # Here, not at the top: the profiler imports torch, and every command's parser (the router's too) imports
    # this module for `add_arguments`.
    from splitserve.planner import plan as planner
    from splitserve.planner.link import resolve as resolve_link
    from splitserve.planner.profile import Profile, measure

    slo = SLO.parse(args.slo)
    if not slo:
        raise ValueError("--slo needs at least one limit, e.g. ttft=1,tpot=0.1")
    counts = sorted({int(n) for n in args.workers.split(",")})
    if any(n < 2 for n in counts):
        raise ValueError("a split needs at least 2 workers")
    phases = tuple(Phase.parse_all(args.phases)) if args.phases else ()
    workload = planner.Workload(LengthDist(args.input_len), LengthDist(args.output_len), args.burstiness,
                                args.num_requests, args.seed, phases)  # fmt: skip
    if args.rate is None and not phases:
        raise ValueError("--rate is needed (or --phases, whose mean rate it then is)")
    args.rate = args.rate or workload.mean_rate
    link = resolve_link(args.link) if args.link else None  # before profiling: a bad --link fails at once
    by_threads: dict[int, Profile] = {}
    for path in args.profile or []:
        loaded = Profile.load(Path(path))
        by_threads[loaded.threads] = loaded
    profiles = {}
    for n in counts:
        threads = planner.threads_for(n, args.cores)
        if threads not in by_threads:
            if args.profile:
                raise ValueError(f"no saved profile for {threads} thread(s) per worker ({n} workers)")
            print(f"profiling {engine.model or 'the default model'} on {engine.torch_device} in "
                  f"{engine.resolved_dtype} with {threads} thread(s) per worker ({n} workers on {args.cores} cores)"
                  f"{', quick' if args.quick else ''}", flush=True)  # fmt: skip
            by_threads[threads] = measure(engine, threads, quick=args.quick)
        profiles[n] = by_threads[threads]
    if link is not None:
        profiles = {n: profile.over(link) for n, profile in profiles.items()}
    results = planner.plan(profiles, args.cores, args.rate, workload, slo, args.target, args.adaptive)
    if args.save_profile:
        for profile in profiles.values():
            profile.save(Path(f"{args.save_profile}-t{profile.threads}.json"))
    for n in counts:
        print(f"{n} workers: {profiles[n].threads} thread(s) each; two busy workers slow each other "
              f"{profiles[n].pair_slowdown:.2f}x here")  # fmt: skip
    link_text = profiles[counts[0]].link.describe()
    print(f"link between the pools: {link_text}")
    shape = f"phases {args.phases}" if phases else f"input {args.input_len}, output {args.output_len} tokens"
    print(f"\nworkload: {shape}; SLO {slo.describe()} for {100 * args.target:.0f}% of requests")
    print(planner.format_table(results, args.rate))
    print()
    chosen, text = planner.recommend(results, args.rate, args.target)
    print(text)
    print(planner.link_verdict(results, link_text))
    if args.apply is not None and chosen is not None:
        from splitserve.ray_cluster import scale

        pools = {"prefill": chosen.prefill, "decode": chosen.decode, "both": 0}
        if chosen.colocated:
            pools = {"prefill": 0, "decode": 0, "both": chosen.workers}
        sizes = scale(args.apply, pools)
        print("applied: the cluster's pools are now " + ", ".join(f"{n} {r}" for r, n in sizes.items() if n))
    if args.plot:
        path = planner.plot(profiles, args.cores, results, args.rate, workload, slo, args.target, Path(args.plot))
        print(f"chart: {path}")
    return 0
