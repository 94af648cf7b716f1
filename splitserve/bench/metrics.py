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
import re
import statistics

from splitserve.bench.client import Record
from splitserve.slo import SLO, percentile

PERCENTILES = (50, 90, 99)
METRICS = ("ttft", "tpot", "itl", "e2el")


def met(slo: SLO, r: Record) -> bool:
    """Whether request `r` finished and met every limit of `slo`."""
    return r.ok and not slo.missed(ttft(r), tpot(r), e2el(r))


def ttft(r: Record) -> float:
    return r.chunk_times[0] - r.sent


def tpot(r: Record) -> float | None:
    return (r.end - r.chunk_times[0]) / (r.output_tokens - 1) if r.output_tokens > 1 else None


def itl(r: Record) -> list[float]:
    return [b - a for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]


def e2el(r: Record) -> float:
    return r.end - r.sent


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
        good = sum(met(slo, r) for r in records)
        out["goodput"] = good / duration_s
        out["slo_attainment"] = good / len(records) if records else math.nan
    return out


def prometheus_total(text: str, name: str, labels: str = "") -> float:
    """The sum of metric `name` over its series in a /metrics page `text` (those whose labels hold `labels`)."""
    return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*{labels}[^}}]*}})? (\S+)$", text, re.M))
