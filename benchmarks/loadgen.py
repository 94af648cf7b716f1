"""A streaming load generator for OpenAI-compatible servers, and the latency statistics of what it measured.

Each request is sent at its arrival time (at most `concurrency` in flight) to `/v1/completions` with
`stream: true`; the client records when it was sent, when each chunk with text or tokens arrived, and when
it ended. Definitions (as vLLM's `bench serve`):
  TTFT  time to first token: send -> first chunk carrying output
  TPOT  time per output token, excluding the first: (end - first token) / (output tokens - 1)
  ITL   inter-token latency: the gaps between consecutive chunks carrying output
  E2E   send -> last chunk
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Request:
    prompt: list[int] | str
    max_tokens: int
    arrival_s: float = 0.0  # when to send it, from the start of the run


@dataclass
class Timing:
    sent: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    end: float = 0.0
    output_tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.sent

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.end - self.chunk_times[0]) / (self.output_tokens - 1)

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]

    @property
    def e2e(self) -> float:
        return self.end - self.sent


async def _one(client: httpx.AsyncClient, model: str, request: Request, extra: dict) -> Timing:
    body = {"model": model, "prompt": request.prompt, "max_tokens": request.max_tokens, "stream": True,
            "temperature": 0, "ignore_eos": True, "stream_options": {"include_usage": True}, **extra}  # fmt: skip
    t = Timing(sent=time.perf_counter())
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                t.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return t
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    t.error = event["error"]["message"]
                    break
                if event.get("usage"):
                    t.output_tokens = event["usage"]["completion_tokens"]
                if any(c.get("text") for c in event.get("choices", [])):
                    t.chunk_times.append(time.perf_counter())
    except httpx.HTTPError as e:
        t.error = f"{type(e).__name__}: {e}"
    t.end = time.perf_counter()
    if not t.chunk_times and t.error is None:
        t.error = "no output"
    return t


async def run(url: str, model: str, requests: list[Request], concurrency: int | None = None,
              extra: dict | None = None) -> tuple[list[Timing], float]:  # fmt: skip
    """Send every request at its arrival time; returns their timings (in order) and the run's duration."""
    limit = asyncio.Semaphore(concurrency or len(requests))
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=httpx.Limits(max_connections=None)) as client:
        start = time.perf_counter()

        async def scheduled(request: Request) -> Timing:
            await asyncio.sleep(max(0.0, start + request.arrival_s - time.perf_counter()))
            async with limit:
                return await _one(client, model, request, extra or {})

        timings = await asyncio.gather(*(scheduled(r) for r in requests))
        return list(timings), time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(timings: list[Timing], duration_s: float) -> dict:
    ok = [t for t in timings if t.error is None]
    tpots = [t.tpot for t in ok if t.tpot is not None]
    itls = [x for t in ok for x in t.itl]
    out = {
        "requests": len(timings),
        "failed": len(timings) - len(ok),
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": sum(t.output_tokens for t in ok) / duration_s,
    }
    for name, values in (("ttft", [t.ttft for t in ok]), ("tpot", tpots), ("itl", itls), ("e2e", [t.e2e for t in ok])):
        out[f"{name}_mean"] = statistics.fmean(values) if values else float("nan")
        for q in (50, 90, 99):
            out[f"{name}_p{q}"] = percentile(values, q)
    return out
