"""`RouterOptions`: how the router treats its workers and requests (the `splitserve router` options of the
cluster side), in a module of its own so that the cluster's parts (`cluster`, `placement`, `roles`) read it
without importing each other."""

from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.options import option
from splitserve.router.cluster.policy import PolicyOptions
from splitserve.slo import SLO


def _slo(spec: str) -> SLO | None:
    return SLO.parse(spec) or None


@dataclass(frozen=True)
class RouterOptions:
    """How the router treats its workers and requests; the fields with help are `splitserve router` options."""

    model: str  # the served model's name; workers of another model are refused
    heartbeat_timeout_s: float = option(
        2.5, "seconds without a heartbeat after which a worker is taken for dead (default {default})",
        flag="--heartbeat-timeout",
    )  # fmt: skip
    stuck_timeout_s: float = 120.0  # a worker whose loop has not turned this long is taken for stuck
    max_queue: int = option(512, "requests waiting for room before 429s (default {default})")
    queue_timeout_s: float = option(
        60.0, "seconds a request may wait for room, then 503 (default {default:g})", flag="--queue-timeout"
    )
    local_prefill_tokens: int | None = option(
        None,
        "a decode worker prefills a prompt itself instead of the prefill pool when it lacks at most this many "
        "of its tokens and that is no more work: without --slo only a prompt it holds partly cached (a "
        "conversation's next turn; default 256), with --slo any prompt (default: the prompt tokens a worker "
        "computes in one TPOT budget, as measured); 0: none by length (decode workers still prefill for "
        "themselves when no prefill worker is left, and with --slo when the prefill pool's queue is too long)",
        type=int,
    )
    slo: SLO | None = option(
        None,
        "e.g. ttft=0.5,tpot=0.05 (seconds; or 50ms): the router meets it by itself: decode workers prefill "
        "short prompts, and prompts the prefill pool could not start in time, themselves (conditional "
        "disaggregation), and workers move between the pools when one is the bottleneck (see --fixed-roles); "
        "/health and /metrics show the last minute's attainment and misses",
        type=_slo,
    )
    role_switching: bool = option(
        True,
        "with --slo: never move workers between the prefill and decode pools (a fixed split)",
        flag="--fixed-roles",
    )
    replica: int = option(
        0,
        "this router's index among --routers N in front of the same workers (0 to N-1): its job ids are its own "
        "(they leave this remainder modulo N), and only replica 0 moves workers between the pools "
        "(default {default})",
    )
    replicas: int = option(
        1,
        "routers in front of the same workers, sharing the HTTP port (SO_REUSEPORT: the kernel spreads the "
        "connections): `serve` starts them all; a router alone is given its --replica, and every worker all "
        "their worker sockets, replica i's i-th in its --router list (default {default})",
        flag="--routers",
    )
    policy: PolicyOptions = field(default_factory=PolicyOptions)
    switch_timeout_s: float = 300.0  # a worker not switched this long after the decision goes back to its pool
    drain_timeout_s: float = option(
        30.0,
        "seconds a decode worker drained for a role switch may take to finish its requests; then they migrate to "
        "other decode workers (default {default:g})",
        flag="--drain-timeout",
    )
    migration_limit: int = option(
        3,
        "times a request whose decode worker fails mid-stream moves to another one (its prompt and the tokens "
        "already sent prefilled again, the stream going on); beyond it the client gets an error event; 0: never "
        "(default {default})",
    )

    def __post_init__(self) -> None:
        if not 0 <= self.replica < self.replicas:
            raise ValueError(f"--replica must be in 0..{self.replicas - 1} (of --routers {self.replicas}), "
                             f"got {self.replica}")  # fmt: skip
