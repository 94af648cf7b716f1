"""The planner against reality: for each cluster shape and rate, the simulator's p90 TTFT and TPOT next to
what a real `splitserve serve` of that shape measures, on the very same requests (lengths and arrivals).

    .venv/bin/python benchmarks/planner_check.py --shapes 1:1,2:1 --rates 0.5,1 [--profile prof-t1.json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from pathlib import Path

from splitserve.bench import metrics, workloads
from splitserve.bench.cli import tokenizer_for
from splitserve.bench.client import Target, run
from splitserve.engine.config import EngineConfig
from splitserve.launcher import ServeProcess
from splitserve.planner.plan import threads_for
from splitserve.planner.profile import Profile, measure
from splitserve.planner.simulator import Hardware, SimRequest, simulate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1:1,2:1", help="prefill:decode worker counts, comma-separated")
    p.add_argument("--rates", default="0.5,1", help="Poisson request rates")
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--input-len", default="uniform:64,512")
    p.add_argument("--output-len", default="uniform:32,128")
    p.add_argument("--profile", nargs="*", default=[], help="saved profiles (else profiled now)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    cores = os.cpu_count() or 1
    shapes = [tuple(int(x) for x in s.split(":")) for s in args.shapes.split(",")]
    rates = [float(r) for r in args.rates.split(",")]
    profiles = {Profile.load(Path(f)).threads: Profile.load(Path(f)) for f in args.profile}
    for prefill, decode in shapes:
        t = threads_for(prefill + decode, cores)
        if t not in profiles:
            print(f"profiling with {t} thread(s) per worker")
            profiles[t] = measure(EngineConfig(), t)
            profiles[t].save(Path(f"/tmp/splitserve-profile-t{t}.json"))

    tokenizer = tokenizer_for(None)
    lens = workloads.LengthDist(args.input_len), workloads.LengthDist(args.output_len)
    requests = workloads.synthetic(tokenizer, args.requests, *lens, random.Random(args.seed))
    rows = []
    for prefill, decode in shapes:
        profile = profiles[threads_for(prefill + decode, cores)]
        server = ServeProcess(None, ["--prefill", str(prefill), "--decode", str(decode)], prefill + decode)
        try:
            model = server.http.get("/v1/models").json()["data"][0]["id"]
            target = Target(server.url, model)
            asyncio.run(run(target, requests[:2], progress=False))  # warm-up
            for rate in rates:
                workloads.assign_arrivals(requests, rate, 1.0, random.Random(args.seed + 1))
                records, duration = asyncio.run(run(target, requests, progress=False))
                measured = metrics.summarize(records, duration)
                sim = [SimRequest(r.arrival_s, r.prompt_tokens, r.max_tokens) for r in requests]
                simulated = simulate(profile, Hardware(cores), prefill, decode, sim)
                predicted = metrics.summarize(simulated, max(r.end for r in simulated))
                rows.append((f"{prefill}P:{decode}D", rate, predicted, measured))
                print(f"{prefill}P:{decode}D @ {rate:g}: p90 TTFT {predicted['p90_ttft']:.3f} vs "
                      f"{measured['p90_ttft']:.3f}, p90 TPOT {predicted['p90_tpot']:.4f} vs {measured['p90_tpot']:.4f}",
                      flush=True)  # fmt: skip
                time.sleep(1)
        finally:
            server.stop()

    print(f"\n{'shape':>7}{'rate':>6}{'p90 TTFT ms: predicted':>24}{'measured':>10}{'error':>8}"
          f"{'p90 TPOT ms: predicted':>24}{'measured':>10}{'error':>8}")  # fmt: skip
    for shape, rate, pred, meas in rows:
        cells = []
        for key in ("p90_ttft", "p90_tpot"):
            cells.append(f"{1000 * pred[key]:24.0f}{1000 * meas[key]:10.0f}{100 * (pred[key] / meas[key] - 1):+7.0f}%")
        print(f"{shape:>7}{rate:6g}" + "".join(cells))


if __name__ == "__main__":
    main()
