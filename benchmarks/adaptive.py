"""Traffic that shifts, against a fixed split and against the router that adapts, on the same two workers.

A phased workload (default, as in issue 14: long prompts with short answers, then short prompts with long
answers, then long prompts again) runs against fresh `splitserve serve` clusters of the same two workers:

- fixed 1P+1D: today's router without an SLO (placement by load, a fixed split);
- colocated 2x both: the other split of two workers (each prefills its own prompts);
- adaptive 1P+1D: the router given the SLO (`--slo`): conditional disaggregation and role switching.

It prints the SLO attainment of each over the whole run and in each phase, the adaptive cluster's ratio to
the fixed split's (target: >= 1.3x over the run) and its gap to the best fixed split in each phase (target:
within 10%), and charts attainment over time with the adaptive cluster's role switches marked.

    .venv/bin/python benchmarks/adaptive.py --out benchmarks/results/DATE-MACHINE/adaptive
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import threading
import time
from pathlib import Path

from splitserve.bench import metrics, plots, workloads
from splitserve.bench.cli import phase_summaries, tokenizer_for
from splitserve.bench.client import Record, Target, run
from splitserve.launcher import ServeProcess

# Long prompts at 0.12 req/s keep one prefill worker (1 thread) about 80% busy; 200-token answers at 1.2 req/s
# are more than one decode worker (1 thread) can stream within the TPOT limit, and less than two can.
_A = "150/0.12/uniform:1000,2000/uniform:16,32"
PHASES = f"{_A};150/1.2/fixed:64/fixed:200;{_A}"
SLO = "ttft=12,tpot=0.15"
FIXED = "fixed 1P+1D"
ADAPTIVE = "adaptive 1P+1D (--slo)"


def clusters(slo: str) -> dict[str, tuple[list[str], int]]:
    return {
        FIXED: (["--prefill", "1", "--decode", "1"], 2),
        "colocated 2x both": (["--prefill", "0", "--decode", "0", "--both", "2"], 2),
        ADAPTIVE: (["--prefill", "1", "--decode", "1", "--slo", slo], 2),
    }


class RoleWatcher:
    """Polls /health once a second: when each worker's role changed, in seconds from `origin`."""

    def __init__(self, server: ServeProcess, origin: float):
        self.server, self.origin = server, origin
        self.changes: list[tuple[float, str]] = []
        self._roles: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            try:
                workers = self.server.health()["workers"]
            except Exception:  # the server is busy or stopping: try again
                continue
            for w in workers:
                old = self._roles.get(w["id"])
                if old is not None and old != w["role"]:
                    self.changes.append((time.perf_counter() - self.origin, f"{old}->{w['role']}"))
                self._roles[w["id"]] = w["role"]

    def stop(self) -> list[tuple[float, str]]:
        self._stop.set()
        self._thread.join(5)
        return self.changes


def over_time(records: list[Record], slo: metrics.SLO, bin_s: float) -> list[tuple[float, float]]:
    """Attainment of the requests sent in each `bin_s`-second bin (at the bin's middle)."""
    bins: dict[int, list[bool]] = {}
    for r in records:
        bins.setdefault(int(r.sent // bin_s), []).append(metrics.met(slo, r))
    return [((k + 0.5) * bin_s, sum(v) / len(v)) for k, v in sorted(bins.items())]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--phases", default=PHASES, help=f"as `splitserve bench --phases` (default {PHASES})")
    p.add_argument("--slo", default=SLO, help=f"the SLO judged, and given to the adaptive router (default {SLO})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bin", type=float, default=15.0, help="seconds per point of the attainment-over-time chart")
    p.add_argument("--serve-args", default="", help="extra `splitserve serve` flags for every cluster")
    p.add_argument("--out", default=None, help="write PREFIX.json results and PREFIX-over-time.png")
    args = p.parse_args()
    slo = metrics.SLO.parse(args.slo)
    phases = workloads.Phase.parse_all(args.phases)
    tokenizer = tokenizer_for(args.model)
    requests = workloads.phased(tokenizer, phases, random.Random(args.seed))
    starts = [sum(ph.duration_s for ph in phases[:i]) for i in range(len(phases))]
    print(f"{len(requests)} requests in {len(phases)} phases ({args.phases}), SLO {slo.describe()}", flush=True)

    results = {}
    for label, (flags, workers) in clusters(args.slo).items():
        server = ServeProcess(args.model, [*flags, *args.serve_args.split()], num_workers=workers)
        try:
            model = server.http.get("/v1/models").json()["data"][0]["id"]
            target = Target(server.url, model)
            warm = [workloads.BenchRequest(r.prompt, 4, r.prompt_tokens) for r in requests[:2]]
            asyncio.run(run(target, warm, progress=False))
            print(f"\n=== {label}", flush=True)
            watcher = RoleWatcher(server, time.perf_counter())
            records, duration = asyncio.run(run(target, requests, progress=False))
            switches = watcher.stop()
            routing = server.health()["routing"]
        finally:
            server.stop()
        summary = metrics.summarize(records, duration, slo)
        results[label] = {"summary": summary, "phases": phase_summaries(records, phases, slo),
                          "switches": switches, "routing": routing,
                          "records": [r.to_json() for r in records]}  # fmt: skip
        print(f"{label}: attainment {100 * summary['slo_attainment']:.1f}% over the run; switches {switches}; "
              f"local prefills {routing['local_prefills']}", flush=True)  # fmt: skip

    names = [f"phase {i + 1}" for i in range(len(phases))]
    print(f"\n{'SLO attainment %':>26}{'whole run':>11}" + "".join(f"{n:>10}" for n in names))
    for label, r in results.items():
        row = [r["summary"]["slo_attainment"], *(s.get("slo_attainment", float("nan")) for s in r["phases"])]
        print(f"{label:>26}" + "".join(f"{100 * v:{11 if i == 0 else 10}.1f}" for i, v in enumerate(row)))
    adaptive, fixed = results[ADAPTIVE], results[FIXED]
    ratio = adaptive["summary"]["slo_attainment"] / max(fixed["summary"]["slo_attainment"], 1e-9)
    print(f"\nadaptive / fixed 1P+1D over the run: {ratio:.2f}x (target >= 1.3x; the fixed split attains "
          f"{100 * fixed['summary']['slo_attainment']:.1f}%, below 80%: "
          f"{'yes' if fixed['summary']['slo_attainment'] < 0.8 else 'no'})")  # fmt: skip
    for i, name in enumerate(names):
        best_label, best = max(((k, v["phases"][i].get("slo_attainment", 0.0)) for k, v in results.items()
                                if k != ADAPTIVE), key=lambda kv: kv[1])  # fmt: skip
        mine = adaptive["phases"][i].get("slo_attainment", 0.0)
        print(f"{name}: adaptive {100 * mine:.1f}% vs best fixed ({best_label}) {100 * best:.1f}%: "
              f"{100 * (mine - best):+.1f} points, {mine / max(best, 1e-9):.2f}x (target: within 10%)")  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps({"phases": args.phases, "slo": args.slo, "results": results}))
        series = {k: over_time([Record(**x) for x in v["records"]], slo, args.bin) for k, v in results.items()}
        marks = [(s, f"phase {i + 1}: {ph.input_len.spec} -> {ph.output_len.spec} @ {ph.rate:g}/s")
                 for i, (s, ph) in enumerate(zip(starts, phases, strict=True))]  # fmt: skip
        chart = plots.attainment_over_time(series, Path(f"{args.out}-over-time.png"),
                                           f"SLO attainment over time ({slo.describe()})", marks,
                                           {k: v["switches"] for k, v in results.items()})  # fmt: skip
        print(f"results: {args.out}.json\nchart: {chart}")


if __name__ == "__main__":
    main()
