"""What the router shows of itself: one typed snapshot of the cluster (and of the SLO window) that `/health`
serialises as JSON and `/metrics` reads field by field."""

from __future__ import annotations

import msgspec

from splitserve.protocol import SpeculationStats
from splitserve.router.cluster.policy import Window


class WorkerView(msgspec.Struct, frozen=True):
    id: str
    role: str
    role_reason: str  # why it has its role
    switching_to: str | None  # the pool it is being drained for
    leaving: bool  # being drained to be stopped
    pid: int
    host: str
    num_pages: int
    free_pages: int
    running: int
    waiting: int
    pending_prefill_tokens: int
    jobs: int  # attempts the router gave it that are not over
    kv_bytes_sent: int
    kv_bytes_received: int
    kv_seconds_sending: float
    kv_seconds_receiving: float
    kv_failures: int
    kv_transfers_pulled: int
    kv_checksum_failures: int
    kv_messages_streamed: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prefix_cache_evictions: int
    cached_pages: int
    retained_pages: int
    offloaded_pages: int
    offload_pages_stored: int
    offload_pages_loaded: int
    offload_bytes_written: int
    offload_bytes_read: int
    offload_seconds_writing: float
    offload_seconds_reading: float
    speculation: SpeculationStats  # --speculative: tokens drafted and accepted


class PoolView(msgspec.Struct, frozen=True):
    """A role's workers, summed."""

    workers: int
    jobs: int
    running: int
    waiting: int
    pending_prefill_tokens: int
    free_pages: int
    num_pages: int


class RoleSwitches(msgspec.Struct, frozen=True):
    source: str = msgspec.field(name="from")
    target: str = msgspec.field(name="to")
    count: int = 0


class RoutingView(msgspec.Struct, frozen=True, omit_defaults=True):
    prefix_routed: int
    prefix_routed_tokens: int
    local_prefills: int
    local_prefill_tokens: int
    prefill_tokens_per_s: float
    role_switches: list[RoleSwitches]
    # With an SLO policy only (left out otherwise): its last window, verdict, and the pool it found behind.
    last_window: Window | msgspec.UnsetType | None = msgspec.UNSET
    last_verdict: str | msgspec.UnsetType = msgspec.UNSET
    behind: str | msgspec.UnsetType | None = msgspec.UNSET


class ClusterView(msgspec.Struct, frozen=True):
    queue: int  # requests waiting in the router for room
    jobs: dict[str, int]  # requests in flight, by state
    pools: dict[str, PoolView]  # by role, for the roles that have workers
    workers: list[WorkerView]
    worker_restarts: dict[str, int]  # by role
    routing: RoutingView
    migrations: dict[str, int] = {}  # requests moved to other workers mid-stream, by reason


class SloView(msgspec.Struct, frozen=True):
    """The requests finished in the last `window_s` seconds, judged against the SLO."""

    slo: str
    window_s: float
    requests: int
    attainment: float | None
    misses: dict[str, int]  # by limit
    p90_ttft: float | None
    p90_tpot: float | None
