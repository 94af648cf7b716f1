"""`splitserve plan`: for each number of workers, simulate every prefill:decode split on the profiled
hardware, and the same workers colocated (each prefilling and decoding its own requests: no KV crosses the
link), and recommend the shape with the highest goodput per worker. Disaggregation is advised only where it
beats colocation with the profile's link's transfer time counted in every request's TTFT.

Goodput of a split is the highest request rate at which it still meets the SLO for `target` of the
requests (DistServe's definition), found by bisection on the simulator; the table also shows what each
split achieves at the requested rate. With `adaptive`, each split is also simulated as the starting point of
a router given the SLO (conditional disaggregation and role switching, the router's own policies); with
phases (traffic that shifts), rates scale every phase's rate alike and name the mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from splitserve.bench.metrics import summarize
from splitserve.bench.plots import attainment_chart
from splitserve.bench.workloads import LengthDist, Phase
from splitserve.planner.profile import Profile
from splitserve.planner.simulator import Hardware, SimRouter, sample_phases, sample_workload, simulate
from splitserve.slo import SLO


@dataclass(frozen=True)
class Workload:
    input_len: LengthDist
    output_len: LengthDist
    burstiness: float = 1.0
    num_requests: int = 400
    seed: int = 0
    phases: tuple[Phase, ...] = ()  # traffic that shifts (then the lengths above are not used)

    @property
    def mean_rate(self) -> float:
        return sum(p.rate * p.duration_s for p in self.phases) / sum(p.duration_s for p in self.phases)


@dataclass
class SplitResult:
    prefill: int
    decode: int
    at_rate: dict  # metrics.summarize() of the simulated run at the requested rate
    max_rate: float  # highest rate meeting the SLO for `target` of requests (0: none does)
    adaptive: bool = False  # the router was given the SLO: it moves workers between the pools

    @property
    def workers(self) -> int:
        return self.prefill + self.decode

    @property
    def goodput_per_worker(self) -> float:
        return self.max_rate / self.workers

    @property
    def colocated(self) -> bool:
        return self.prefill == 0

    @property
    def name(self) -> str:
        if self.colocated:
            return f"{self.decode}xboth"
        return f"{self.prefill}P:{self.decode}D" + ("+a" if self.adaptive else "")


def evaluate(profile: Profile, hw: Hardware, prefill: int, decode: int, rate: float, workload: Workload,
             slo: SLO, adaptive: bool = False) -> dict:  # fmt: skip
    w = workload
    if w.phases:
        scale = rate / w.mean_rate
        phases = [Phase(p.duration_s, p.rate * scale, p.input_len, p.output_len) for p in w.phases]
        requests = sample_phases(phases, w.burstiness, w.seed)
    else:
        requests = sample_workload(w.num_requests, rate, w.input_len, w.output_len, w.burstiness, w.seed)
    records = simulate(profile, hw, prefill, decode, requests, SimRouter(slo) if adaptive else None)
    return summarize(records, max(r.end for r in records) - requests[0].arrival, slo)


def max_rate(profile: Profile, hw: Hardware, prefill: int, decode: int, workload: Workload, slo: SLO,
             target: float, adaptive: bool = False) -> float:  # fmt: skip
    """Bisection for the highest rate whose attainment is >= target (0 when even a trickle misses)."""

    def ok(rate: float) -> bool:
        return evaluate(profile, hw, prefill, decode, rate, workload, slo, adaptive)["slo_attainment"] >= target

    lo, hi = 0.0, 0.05
    if not ok(hi):
        return 0.0
    while ok(hi * 2) and hi < 1e4:
        hi *= 2
    lo, hi = hi, hi * 2
    for _ in range(10):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def plan(profiles: dict[int, Profile], cores: int, rate: float, workload: Workload, slo: SLO,
         target: float = 0.9, adaptive: bool = False) -> list[SplitResult]:  # fmt: skip
    """`profiles`: for each number of workers, the profile measured with that many workers' share of cores.
    Each number of workers colocated, then split every way (`adaptive`: also each split as the start of an
    adaptive cluster)."""
    results = []
    for n, profile in sorted(profiles.items()):
        hw = Hardware(cores)
        splits = [(p, n - p, a) for a in ((False, True) if adaptive else (False,)) for p in range(1, n)]
        for p, d, a in [(0, n, False), *splits]:  # colocated first
            results.append(SplitResult(p, d, evaluate(profile, hw, p, d, rate, workload, slo, a),
                                       max_rate(profile, hw, p, d, workload, slo, target, a), a))  # fmt: skip
    return results


def link_verdict(results: list[SplitResult], link: str) -> str:
    """Whether disaggregation pays over the link: the best split against the best colocated shape."""
    colocated = [r for r in results if r.colocated]
    split = [r for r in results if not r.colocated]
    if not colocated or not split:
        return ""
    c = max(colocated, key=lambda r: r.goodput_per_worker)
    d = max(split, key=lambda r: r.goodput_per_worker)
    pays = d.goodput_per_worker > c.goodput_per_worker
    return (f"Over the link ({link}) disaggregation {'pays' if pays else 'does not pay'}: the best split, "
            f"{d.name}, {d.goodput_per_worker:.3f} req/s per worker; colocated, {c.name}, "
            f"{c.goodput_per_worker:.3f}.")  # fmt: skip


def recommend(results: list[SplitResult], rate: float, target: float) -> tuple[SplitResult | None, str]:
    meeting = [r for r in results if r.at_rate["slo_attainment"] >= target]
    best = max(results, key=lambda r: r.goodput_per_worker)
    if not meeting:
        closest = max(results, key=lambda r: r.at_rate["slo_attainment"])
        text = (f"No split meets the SLO for {100 * target:.0f}% of requests at {rate:g} req/s: the best, "
                f"{closest.name}, meets it for {100 * closest.at_rate['slo_attainment']:.0f}%. ")  # fmt: skip
        if best.max_rate > 0:
            text += f"{best.name} meets it up to {best.max_rate:.2f} req/s; more workers or a looser SLO are needed."
        else:
            text += "None meets it even at a trickle: the SLO is tighter than one request alone can be served."
        return None, text
    chosen = max(meeting, key=lambda r: (r.goodput_per_worker, -r.workers))
    return chosen, (f"Recommended: {chosen.name} ({chosen.workers} workers): meets the SLO for "
                    f"{100 * chosen.at_rate['slo_attainment']:.0f}% of requests at {rate:g} req/s, and up to "
                    f"{chosen.max_rate:.2f} req/s ({chosen.goodput_per_worker:.2f} req/s per worker).")  # fmt: skip


def format_table(results: list[SplitResult], rate: float) -> str:
    head = (f"{'split':>9}{'workers':>8}{'attain %':>10}{'p50 TTFT':>10}{'p90 TTFT':>10}{'p50 TPOT':>10}"
            f"{'p90 TPOT':>10}{'max rate':>10}{'per worker':>11}")  # fmt: skip
    lines = [
        f"simulated at {rate:g} req/s (times in ms; max rate: highest req/s meeting the SLO; Nxboth: N colocated "
        "workers, no KV transfer; +a: adaptive, the router moves workers between the pools)",
        head,
    ]
    for r in results:
        s = r.at_rate
        lines.append(f"{r.name:>9}{r.workers:8d}{100 * s['slo_attainment']:10.1f}{1000 * s['p50_ttft']:10.0f}"
                     f"{1000 * s['p90_ttft']:10.0f}{1000 * s['p50_tpot']:10.1f}{1000 * s['p90_tpot']:10.1f}"
                     f"{r.max_rate:10.2f}{r.goodput_per_worker:11.2f}")  # fmt: skip
    return "\n".join(lines)


def plot(profiles: dict[int, Profile], cores: int, results: list[SplitResult], rate: float, workload: Workload,
         slo: SLO, target: float, path: Path) -> Path:  # fmt: skip
    """Predicted SLO attainment against request rate for each split."""
    top = max(rate, *(r.max_rate for r in results)) * 1.6
    rates = [top * i / 12 for i in range(1, 13)]
    series = {}
    for r in results:
        profile = profiles[r.workers]
        hw = Hardware(cores)
        series[r.name] = [
            (x, evaluate(profile, hw, r.prefill, r.decode, x, workload, slo, r.adaptive)["slo_attainment"])
            for x in rates
        ]
    return attainment_chart(series, path, f"predicted, per split ({slo.describe()})", target, at_rate=rate)


def threads_for(workers: int, cores: int) -> int:
    """Torch threads each worker gets when `workers` share `cores` (as `splitserve serve` splits them)."""
    return max(1, cores // workers)
