"""`RouterMetrics`: what `/metrics` shows, in Prometheus text: request latency histograms (TTFT, TPOT,
end to end) recorded as requests finish, and live gauges read from the cluster at scrape time (queue
depth, requests by state, each pool's and worker's pages and load, KV bytes and seconds transferred, prefix
cache queries, hits and evictions per worker, the router's placements by cached prefix, its local prefills
and its role switches).

With an SLO (`--slo ttft=0.5,tpot=0.05`) it also keeps the last minute's requests: the share that met it,
and how many missed on TTFT (the prefill side is behind) or on TPOT (the decode side is).
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from splitserve.protocol import ACCEPTANCE_BUCKETS
from splitserve.router.cluster.cluster import Cluster
from splitserve.router.cluster.snapshot import SloView
from splitserve.slo import SLO, percentile

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2)


class SloWindow:
    """Requests finished in the last `window_s` seconds, judged against the SLO."""

    def __init__(self, slo: SLO, window_s: float = 60.0):
        self.slo, self.window_s = slo, window_s
        self._finished: deque[tuple[float, float, float | None, float]] = deque()  # (when, ttft, tpot, e2el)

    def add(self, ttft_s: float, tpot_s: float | None, e2e_s: float) -> None:
        self._finished.append((time.monotonic(), ttft_s, tpot_s, e2e_s))

    def snapshot(self) -> SloView:
        cutoff = time.monotonic() - self.window_s
        while self._finished and self._finished[0][0] < cutoff:
            self._finished.popleft()
        rows = list(self._finished)
        missed = [self.slo.missed(*r[1:]) for r in rows]
        misses = {name: sum(name in m for m in missed) for name in ("ttft", "tpot", "e2el")}
        met = sum(not m for m in missed)
        return SloView(
            slo=self.slo.describe(),
            window_s=self.window_s,
            requests=len(rows),
            attainment=met / len(rows) if rows else None,
            misses=misses,
            p90_ttft=percentile([r[1] for r in rows], 90) if rows else None,
            p90_tpot=percentile([r[2] for r in rows if r[2] is not None], 90) if rows else None,
        )


class RouterMetrics:
    def __init__(self, cluster: Cluster, slo: SLO | None = None):
        self.window = SloWindow(slo) if slo else None
        self.registry = CollectorRegistry()
        self.ttft = Histogram(
            "splitserve_time_to_first_token_seconds", "Request arrival to first token", buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.tpot = Histogram(
            "splitserve_time_per_output_token_seconds", "Mean time per output token after the first, per request",
            buckets=_TPOT_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.e2e = Histogram(
            "splitserve_e2e_request_latency_seconds", "Request arrival to last token", buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.requests = Counter(
            "splitserve_requests", "Requests by outcome (ok, error, aborted, rejected)", ["outcome"],
            registry=self.registry,
        )  # fmt: skip
        self.tool_calls = Counter(
            "splitserve_tool_calls", "Tool calls found in answers (parsed), and text that looked like one but was "
            "not (unparsed)", ["outcome"], registry=self.registry,
        )  # fmt: skip
        self.registry.register(_ClusterCollector(cluster, self.window))

    def record(self, ttft_s: float, e2e_s: float, num_tokens: int) -> None:
        self.ttft.observe(ttft_s)
        self.e2e.observe(e2e_s)
        tpot = (e2e_s - ttft_s) / (num_tokens - 1) if num_tokens > 1 else None
        if tpot is not None:
            self.tpot.observe(tpot)
        if self.window is not None:
            self.window.add(ttft_s, tpot, e2e_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ClusterCollector(Collector):
    def __init__(self, cluster: Cluster, window: SloWindow | None):
        self.cluster, self.window = cluster, window

    def collect(self):
        snap = self.cluster.snapshot()
        yield GaugeMetricFamily("splitserve_queue_depth", "Requests waiting in the router for room", snap.queue)
        jobs = GaugeMetricFamily("splitserve_requests_in_flight", "Requests by state", labels=["state"])
        for state, n in snap.jobs.items():
            jobs.add_metric([state], n)
        yield jobs
        stats = self.cluster.stats
        yield CounterMetricFamily("splitserve_request_retries", "Request attempts retried", stats.retries)
        yield CounterMetricFamily("splitserve_workers_lost", "Workers removed as dead or stuck", stats.workers_lost)
        restarts = CounterMetricFamily("splitserve_worker_restarts", "Workers serve restarted after they exited",
                                       labels=["role"])  # fmt: skip
        for role, count in snap.worker_restarts.items():
            restarts.add_metric([role], count)
        yield restarts
        migrations = CounterMetricFamily("splitserve_migrations", "Requests moved to other workers mid-stream "
                                         "(prompt and sent tokens prefilled again), by reason",
                                         labels=["reason"])  # fmt: skip
        for reason, count in snap.migrations.items():
            migrations.add_metric([reason], count)
        yield migrations
        yield CounterMetricFamily(
            "splitserve_malformed_messages", "Worker messages dropped as malformed", stats.malformed_messages
        )
        yield CounterMetricFamily(
            "splitserve_router_prefix_routed_requests",
            "Requests placed on a worker holding part of their prompt",
            stats.prefix_routed,
        )
        yield CounterMetricFamily(
            "splitserve_router_prefix_routed_tokens",
            "Prompt tokens held by the workers those requests were placed on",
            stats.prefix_routed_tokens,
        )
        yield CounterMetricFamily("splitserve_router_local_prefills",
                                  "Prompts a decode worker prefilled itself (conditional disaggregation)",
                                  stats.local_prefills)  # fmt: skip
        switches = CounterMetricFamily("splitserve_role_switches", "Workers moved between the prefill and decode "
                                       "pools, by old and new role", labels=["from", "to"])  # fmt: skip
        for (old, new), count in self.cluster.roles.switches.items():
            switches.add_metric([old, new], count)
        yield switches
        gauges = {
            key: GaugeMetricFamily(f"splitserve_worker_{key}", doc, labels=["worker", "role"])
            for key, doc in [
                ("num_pages", "KV pages in the worker's cache"),
                ("free_pages", "KV pages free"),
                ("running", "Requests running (decoding, or being prefilled)"),
                ("waiting", "Requests queued in the worker or waiting for their KV"),
                ("pending_prefill_tokens", "Prompt tokens queued or in progress"),
                ("cached_pages", "KV pages in the prefix cache (reusable by a request with the same prefix)"),
                ("retained_pages", "KV pages kept for conversations' next turns (prompt_cache_key)"),
                ("offloaded_pages", "KV pages in the offload tier (--kv-offload-memory, --kv-offload-dir)"),
            ]
        }
        counters = {
            key: CounterMetricFamily(f"splitserve_{key}", doc, labels=["worker", "role"])
            for key, doc in [
                ("kv_bytes_sent", "KV bytes sent"),
                ("kv_bytes_received", "KV bytes received"),
                (
                    "kv_seconds_sending",
                    "Seconds from a transfer's first message to its completion (a streamed one's include the "
                    "prefill of its later chunks), summed over transfers",
                ),
                ("kv_seconds_receiving", "Seconds from reservation to arrival, summed over transfers"),
                ("kv_failures", "KV transfers that failed"),
                ("kv_transfers_pulled", "KV transfers received by copying the sender's shared-memory pages"),
                ("kv_messages_streamed", "Tagged KV messages sent while their prompt was still being prefilled"),
                (
                    "kv_checksum_failures",
                    "KV transfers received whose pages did not match the sender's checksum "
                    "(their requests are prefilled again)",
                ),
                ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache"),
                ("prefix_cache_hits", "Prompt tokens found in the prefix cache (not computed again)"),
                ("prefix_cache_evictions", "Cached KV pages overwritten for new requests"),
                ("offload_pages_stored", "Cached KV pages copied to the offload tier before the pool overwrote them"),
                ("offload_pages_loaded", "KV pages copied back from the offload tier instead of being computed"),
                ("offload_bytes_written", "Bytes written to the offload tier (memory, and disk)"),
                ("offload_bytes_read", "Bytes read back from the offload tier"),
                ("offload_seconds_writing", "Seconds spent copying pages to the offload tier"),
                ("offload_seconds_reading", "Seconds spent copying pages back from the offload tier"),
            ]
        }
        for w in snap.workers:
            labels = [w.id, w.role]
            for key, family in (*gauges.items(), *counters.items()):
                family.add_metric(labels, getattr(w, key))
        yield from gauges.values()
        yield from counters.values()
        yield from _speculation(snap.workers)
        pools = {
            key: GaugeMetricFamily(f"splitserve_pool_{key}", doc, labels=["pool"])
            for key, doc in [
                ("jobs", "Requests assigned to the pool's workers"),
                ("waiting", "Requests queued in the pool's workers or waiting for their KV"),
                ("pending_prefill_tokens", "Prompt tokens queued or in progress in the pool"),
                ("free_pages", "KV pages free in the pool"),
            ]
        }
        for pool, state in snap.pools.items():
            for key, family in pools.items():
                family.add_metric([pool], getattr(state, key))
        yield from pools.values()
        if self.window is not None:
            w = self.window.snapshot()
            yield GaugeMetricFamily("splitserve_slo_window_requests", "Requests finished in the SLO window",
                                    w.requests)  # fmt: skip
            if w.attainment is not None:
                yield GaugeMetricFamily("splitserve_slo_attainment", f"Share meeting the SLO ({w.slo})",
                                        w.attainment)  # fmt: skip
            misses = GaugeMetricFamily("splitserve_slo_misses", "Requests in the window missing each limit",
                                       labels=["limit"])  # fmt: skip
            for limit, n in w.misses.items():
                misses.add_metric([limit], n)
            yield misses


def _speculation(workers: list) -> list:
    """Speculative decoding per decode worker and method: tokens drafted and accepted, request-steps that
    verified a draft, and finished requests by their share of drafted tokens accepted (a histogram)."""
    labels = ["worker", "role", "method"]
    drafted = CounterMetricFamily("splitserve_spec_drafted_tokens", "Tokens drafted (--speculative)", labels=labels)
    accepted = CounterMetricFamily("splitserve_spec_accepted_tokens", "Drafted tokens the sampler confirmed",
                                   labels=labels)  # fmt: skip
    steps = CounterMetricFamily("splitserve_spec_verify_steps", "Request-steps that verified a draft", labels=labels)
    rates = HistogramMetricFamily("splitserve_spec_acceptance", "Finished requests by the share of their drafted "
                                  "tokens accepted", labels=labels)  # fmt: skip
    for w in workers:
        s = w.speculation
        if s.method == "off":
            continue
        key = [w.id, w.role, s.method]
        drafted.add_metric(key, s.drafted)
        accepted.add_metric(key, s.accepted)
        steps.add_metric(key, s.verify_steps)
        counts = s.acceptance or [0] * len(ACCEPTANCE_BUCKETS)
        cumulative = [sum(counts[: i + 1]) for i in range(len(counts))]
        buckets = [(f"{b:g}", n) for b, n in zip(ACCEPTANCE_BUCKETS[:-1], cumulative, strict=False)]
        # sum: unknown per request; the bucket bounds' midpoints would invent it, so it is left at 0
        rates.add_metric(key, [*buckets, ("+Inf", cumulative[-1])], 0.0)
    return [drafted, accepted, steps, rates]
