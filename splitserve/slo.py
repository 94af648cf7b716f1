"""Latency objectives (`SLO`: TTFT, TPOT and end-to-end limits) and percentiles: what the router, the planner
and the benchmark judge latencies by. A leaf: it imports nothing of splitserve."""

from __future__ import annotations

import math
from dataclasses import dataclass


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

    def __str__(self) -> str:
        """The spec `parse` reads back: 'ttft=0.5,tpot=0.05'."""
        return ",".join(f"{n}={v:g}" for n, v in (("ttft", self.ttft), ("tpot", self.tpot), ("e2el", self.e2el))
                        if v is not None)  # fmt: skip

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.ttft, self.tpot, self.e2el))

    def missed(self, ttft_s: float, tpot_s: float | None, e2el_s: float) -> list[str]:
        """The limits a request with these latencies misses (TPOT None: a one-token answer has none)."""
        checks = (("ttft", self.ttft, ttft_s), ("tpot", self.tpot, tpot_s), ("e2el", self.e2el, e2el_s))
        return [name for name, limit, value in checks if limit is not None and value is not None and value > limit]

    def describe(self) -> str:
        parts = [f"{n}<={v * 1000:g}ms" for n, v in (("TTFT", self.ttft), ("TPOT", self.tpot), ("E2EL", self.e2el))
                 if v is not None]  # fmt: skip
        return ", ".join(parts) or "none"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)
