"""Latency, throughput and goodput of a benchmark run, defined as vLLM's `bench serve` defines them:

  TTFT    time to first token: request sent -> first chunk that carries output
  TPOT    time per output token after the first: (E2EL - TTFT) / (output tokens - 1), requests with > 1 token
  ITL     inter-token latency: the gap between consecutive output chunks, over all requests
  E2EL    end-to-end latency: request sent -> last byte of the answer
  request throughput  completed requests / run duration; output throughput  output tokens / duration;
  total token throughput  (prompt + output tokens) / duration
  goodput  completed requests meeting every SLO (TTFT, TPOT, E2EL limits given) / duration
  SLO attainment  the share of all requests (failed ones count as misses) meeting every SLO
Percentiles interpolate linearly between closest ranks (numpy's default, as vLLM uses).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from splitserve.bench.client import Record

PERCENTILES = (50, 90, 99)
METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass(frozen=True)
class SLO:
    """Limits in seconds; None: not part of the objective."""

    ttft: float | None = None
    tpot: float | None = None
    e2el: float | None = None

    @classmethod
    def parse(cls, spec: str | None) -> SLO:
        """'ttft=0.5,tpot=0.05' (seconds; a value may end in ms: 'tpot=50ms')."""
        limits = {}
        for part in filter(None, (spec or "").split(",")):
            name, _, value = part.partition("=")
            name = name.strip().lower()
            if name not in ("ttft", "tpot", "e2el") or not value:
                raise ValueError(f"not an SLO: {part!r} (use ttft=, tpot=, e2el= with seconds, or ms)")
            value = value.strip()
            limits[name] = float(value[:-2]) / 1000 if value.endswith("ms") else float(value)
        return cls(**limits)

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.ttft, self.tpot, self.e2el))

    def missed(self, ttft_s: float, tpot_s: float | None, e2el_s: float) -> list[str]:
        """The limits a request with these latencies misses (TPOT None: a one-token answer has none)."""
        checks = (("ttft", self.ttft, ttft_s), ("tpot", self.tpot, tpot_s), ("e2el", self.e2el, e2el_s))
        return [name for name, limit, value in checks if limit is not None and value is not None and value > limit]

    def met(self, r: Record) -> bool:
        return r.ok and not self.missed(ttft(r), tpot(r), e2el(r))

    def describe(self) -> str:
        parts = [f"{n}<={v * 1000:g}ms" for n, v in (("TTFT", self.ttft), ("TPOT", self.tpot), ("E2EL", self.e2el))
                 if v is not None]  # fmt: skip
        return ", ".join(parts) or "none"


def ttft(r: Record) -> float:
    return r.chunk_times[0] - r.sent


def tpot(r: Record) -> float | None:
    return (r.end - r.chunk_times[0]) / (r.output_tokens - 1) if r.output_tokens > 1 else None


def itl(r: Record) -> list[float]:
    return [b - a for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]


def e2el(r: Record) -> float:
    return r.end - r.sent


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(records: list[Record], duration_s: float, slo: SLO | None = None) -> dict[str, float]:
    ok = [r for r in records if r.ok]
    series = {
        "ttft": [ttft(r) for r in ok],
        "tpot": [x for x in (tpot(r) for r in ok) if x is not None],
        "itl": [x for r in ok for x in itl(r)],
        "e2el": [e2el(r) for r in ok],
    }
    out: dict[str, float] = {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": sum(r.output_tokens for r in ok) / duration_s,
        "total_token_throughput": sum(r.output_tokens + r.prompt_tokens for r in ok) / duration_s,
    }
    for name, values in series.items():
        out[f"mean_{name}"] = statistics.fmean(values) if values else math.nan
        for q in PERCENTILES:
            out[f"p{q}_{name}"] = percentile(values, q)
    if slo:
        good = sum(slo.met(r) for r in records)
        out["goodput"] = good / duration_s
        out["slo_attainment"] = good / len(records) if records else math.nan
    return out
