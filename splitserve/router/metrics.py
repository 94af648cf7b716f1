"""`RouterMetrics`: what `/metrics` shows, in Prometheus text: request latency histograms (TTFT, TPOT,
end to end) recorded as requests finish, and live gauges read from the cluster at scrape time (queue
depth, requests by state, each worker's pages and load, KV bytes and seconds transferred)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from splitserve.router.cluster import Cluster

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2)


class RouterMetrics:
    def __init__(self, cluster: Cluster):
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
        self.registry.register(_ClusterCollector(cluster))

    def record(self, ttft_s: float, e2e_s: float, num_tokens: int) -> None:
        self.ttft.observe(ttft_s)
        self.e2e.observe(e2e_s)
        if num_tokens > 1:
            self.tpot.observe((e2e_s - ttft_s) / (num_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ClusterCollector(Collector):
    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    def collect(self):
        snap = self.cluster.snapshot()
        yield GaugeMetricFamily("splitserve_queue_depth", "Requests waiting in the router for room", snap["queue"])
        jobs = GaugeMetricFamily("splitserve_requests_in_flight", "Requests by state", labels=["state"])
        for state, n in snap["jobs"].items():
            jobs.add_metric([state], n)
        yield jobs
        stats = self.cluster.stats
        yield CounterMetricFamily("splitserve_request_retries", "Request attempts retried", stats.retries)
        yield CounterMetricFamily("splitserve_workers_lost", "Workers removed as dead or stuck", stats.workers_lost)
        yield CounterMetricFamily(
            "splitserve_malformed_messages", "Worker messages dropped as malformed", stats.malformed_messages
        )
        gauges = {
            key: GaugeMetricFamily(f"splitserve_worker_{key}", doc, labels=["worker", "role"])
            for key, doc in [
                ("num_pages", "KV pages in the worker's cache"),
                ("free_pages", "KV pages free"),
                ("running", "Requests running (decoding, or being prefilled)"),
                ("waiting", "Requests queued in the worker or waiting for their KV"),
                ("pending_prefill_tokens", "Prompt tokens queued or in progress"),
            ]
        }
        counters = {
            key: CounterMetricFamily(f"splitserve_{key}", doc, labels=["worker", "role"])
            for key, doc in [
                ("kv_bytes_sent", "KV bytes sent"),
                ("kv_bytes_received", "KV bytes received"),
                ("kv_seconds_sending", "Seconds from send to completion, summed over transfers"),
                ("kv_seconds_receiving", "Seconds from reservation to arrival, summed over transfers"),
                ("kv_failures", "KV transfers that failed"),
            ]
        }
        for w in snap["workers"]:
            labels = [w["id"], w["role"]]
            for key, family in (*gauges.items(), *counters.items()):
                family.add_metric(labels, w[key])
        yield from gauges.values()
        yield from counters.values()
