"""`Link`: the network between the prefill and the decode pool, as the planner counts it. A prompt's KV crosses
it chunk by chunk as its prefill computes them, at `bandwidth`, the last chunk's then after `delay_s`: over a
slow link that can cost more TTFT than disaggregation saves, and `splitserve plan` then advises colocated
workers.

A link is learned from a rate the operator names (`1gbit`, `10gbit` as tc writes them; `2.5GB/s`) or from a
running cluster's own transfers: its prefill workers' KV bytes sent over the seconds those sends took, from
the first message to the receiver's acknowledgement (`/health`), the rate KV really moves at over that link.
Transfers streamed while their prompt was prefilled in chunks count the later chunks' compute too: a
cluster that streams gives a lower bound.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import httpx

# UCX over TCP on loopback, measured 4.4-5.3 GB/s on this project's 2-core machine: what a profile assumes
# until it is given a link.
LOOPBACK = 4e9

_UNITS = {"gbit": 1e9 / 8, "mbit": 1e6 / 8, "kbit": 1e3 / 8, "bit": 1 / 8, "gb/s": 1e9, "mb/s": 1e6, "kb/s": 1e3,
          "b/s": 1.0}  # fmt: skip


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes/s
    source: str  # where the figure comes from, for the plan's report
    delay_s: float = 0.0  # one way, added to each transfer

    def describe(self) -> str:
        delay = f", {1000 * self.delay_s:g} ms delay" if self.delay_s else ""
        return f"{self.bandwidth * 8 / 1e9:.3g} Gbit/s ({self.bandwidth / 1e9:.3g} GB/s{delay}; {self.source})"


def parse_rate(text: str) -> float:
    """Bytes/s of a rate written as tc writes it (`1gbit`, `100mbit`) or in bytes (`2.5GB/s`, `800MB/s`)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z/]+)\s*", text, re.I)
    unit = match and _UNITS.get(match[2].lower())
    if unit is None or float(match[1]) <= 0:
        raise ValueError(f"a link rate like 1gbit, 10gbit or 2.5GB/s, not {text!r}")
    return float(match[1]) * unit


def learned(workers: list[dict], source: str) -> Link:
    """The link as a cluster's transfers measured it: `workers` as `/health` lists them."""
    sent = sum(w["kv_bytes_sent"] for w in workers)
    seconds = sum(w["kv_seconds_sending"] for w in workers)
    if not sent or seconds <= 0:
        raise ValueError(f"{source} has sent no KV yet: serve some requests through its prefill pool first")
    return Link(sent / seconds, f"learned from {sent / 1e6:.3g} MB sent by {source}")


def resolve(spec: str, timeout_s: float = 10.0) -> Link:
    """`--link`: a rate, or a running router's URL to learn the link from."""
    if spec.startswith(("http://", "https://")):
        try:
            health = httpx.get(spec.rstrip("/") + "/health", timeout=timeout_s).json()
        except (httpx.HTTPError, ValueError) as e:
            raise ValueError(f"cannot read {spec}/health to learn the link: {e}") from None
        return learned(health.get("workers", []), spec)
    return Link(parse_rate(spec), f"given as {spec.strip()}")
