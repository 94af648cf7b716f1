"""The workers the router knows (`Membership`): who joined, with a compatible model and KV cache, what each
reports and holds, and which of them each pool's new work may go to.

A worker joins with its first heartbeat (or is refused, with the reason) and leaves with a goodbye or when the
router takes it for dead. Each `Worker` keeps what the router gave it (`take`, `settle`, `drop`: the only
writers), and their totals alongside, so that placing a request costs the same however many it holds. Only
the router's event loop touches this state, except `num_joined`, which other threads may read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgspec

from splitserve.engine.prefix_cache import root_hash
from splitserve.kv_transfer.messages import CompatKey
from splitserve.protocol import CacheStats, Heartbeat, KvStats, Load, Role, SpeculationStats, WorkerInfo
from splitserve.router.cluster.policy import Decision
from splitserve.router.cluster.prefix_index import PrefixIndex


@dataclass
class _Hold:
    """What one attempt has asked of a worker that its load reports do not show yet."""

    reserving_pages: int = 0  # pages of a Reserve not answered yet
    prefill_tokens: int = 0  # prompt tokens of a Prefill not reported done
    pages: int = 0  # pages the attempt's tokens take on a decode (or colocated) worker: the router's own count


@dataclass(eq=False)
class Worker:
    info: WorkerInfo
    load: Load
    kv: KvStats
    last_heartbeat: float
    loop_age_s: float = 0.0
    # The attempts it holds state for, by wire id: the one record of what the router gave it (`take`,
    # `settle`, `drop`), and their sums (kept by the same three).
    jobs: dict[int, _Hold] = field(default_factory=dict)
    held: _Hold = field(default_factory=_Hold)
    refused_reserve: bool = False  # it refused a reservation; skipped until its next heartbeat
    cache: CacheStats = field(default_factory=CacheStats)
    speculation: SpeculationStats = field(default_factory=SpeculationStats)
    root_hash: int = 0  # where its page hash chains start (from its KV compatibility key)
    role_reason: str = "started with it"  # why it has its role
    switch: Decision | None = None  # it is being drained to switch roles
    leaving: bool = False  # it is being drained to be stopped (a pool made smaller)
    switch_started: float = 0.0
    switch_sent: bool = False  # SwitchRole sent (once it held no work)
    busy_ticks: int = 0  # watch-loop ticks of the current window in which it had work

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    def take(self, wire_id: int, reserving_pages: int = 0, prefill_tokens: int = 0, pages: int = 0) -> None:
        self.drop(wire_id)
        self.jobs[wire_id] = _Hold(reserving_pages, prefill_tokens, pages)
        self._add(self.jobs[wire_id], 1)

    def settle(self, wire_id: int) -> None:
        """Its answer to the attempt's Reserve arrived: the pages show in its load from now on."""
        hold = self.jobs.get(wire_id)
        if hold is not None:
            self.held.reserving_pages -= hold.reserving_pages
            hold.reserving_pages = 0

    def drop(self, wire_id: int) -> bool:
        """It holds nothing of the attempt any more; False when it held nothing already."""
        hold = self.jobs.pop(wire_id, None)
        if hold is not None:
            self._add(hold, -1)
        return hold is not None

    def _add(self, hold: _Hold, sign: int) -> None:
        self.held.reserving_pages += sign * hold.reserving_pages
        self.held.prefill_tokens += sign * hold.prefill_tokens
        self.held.pages += sign * hold.pages

    @property
    def reserving_pages(self) -> int:
        return self.held.reserving_pages

    @property
    def prefill_tokens(self) -> int:
        return self.held.prefill_tokens

    @property
    def role(self) -> Role:
        return self.info.role

    @property
    def takes_work(self) -> bool:
        """In its pool: not draining to switch roles or to leave."""
        return self.switch is None and not self.leaving

    def free_pages(self) -> int:
        return self.load.free_pages - self.reserving_pages

    def pages_in_use(self) -> float:
        """Pages it holds, its share of batch slots taken in pages, or the pages of the attempts the router gave
        it, whichever is more: the router's own counts change the moment it places a request, while the
        worker's page count only changes with its next message (a burst placed on its last report would all
        go to one worker)."""
        slots = len(self.jobs) / self.info.max_num_seqs * self.info.num_pages
        return max(self.info.num_pages - self.free_pages(), slots, self.held.pages)


class Membership:
    def __init__(self, model: str):
        self.model = model  # the served model's name: workers of another are refused
        self.workers: dict[str, Worker] = {}
        self.kv_key: CompatKey | None = None  # every prefill and decode worker must share it
        self.prefix_index = PrefixIndex()  # which worker caches which page hash
        self.num_joined = 0  # workers that ever joined (written on the loop, read by any thread)
        self._pools: dict[Role, list[Worker]] | None = None  # each role's pool, until `changed`

    def admission_problem(self, info: WorkerInfo) -> str | None:
        """Why a worker may not join, or None."""
        if info.model != self.model:
            return f"it serves model {info.model!r}, this router serves {self.model!r}"
        if info.role is not Role.BOTH and self.kv_key is not None:
            mismatch = self.kv_key.mismatch(info.kv_key)
            if mismatch:
                return f"its KV cache is incompatible with the cluster's: {mismatch}"
        return None

    def join(self, hb: Heartbeat) -> Worker:
        """Admit the worker of a first heartbeat (its `admission_problem` is None)."""
        info = hb.info
        if info.role is not Role.BOTH:
            self.kv_key = self.kv_key or info.kv_key
        worker = Worker(info, hb.load, hb.kv, time.monotonic())
        worker.root_hash = root_hash(msgspec.msgpack.encode(info.kv_key))
        self.workers[info.worker_id] = worker
        self.num_joined += 1
        # It may name every page of its pool and of its offload tier (which keeps what the pool overwrites).
        self.prefix_index.add_worker(info.worker_id, info.num_pages + info.offload_pages)
        self.changed()
        return worker

    def remove(self, worker_id: str) -> Worker:
        self.prefix_index.remove_worker(worker_id)
        self.changed()
        return self.workers.pop(worker_id)

    def changed(self) -> None:
        """A worker joined or left, changed roles, or started or stopped draining (its `switch` or `leaving`):
        whoever changes those says so here, and the pools are listed again when next asked for."""
        self._pools = None

    def pool(self, role: Role) -> list[Worker]:
        """The workers taking new work of this role (not those draining to switch roles or to leave); the list is
        shared until `changed`: read it, do not change it."""
        if self._pools is None:
            self._pools = {r: [w for w in self.workers.values() if w.role is r and w.takes_work] for r in Role}
        return self._pools[role]

    @property
    def max_model_len(self) -> int | None:
        lens = [w.info.max_model_len for w in self.workers.values()]
        return min(lens) if lens else None

    def can_serve(self) -> bool:
        return any(w.role is not Role.PREFILL for w in self.workers.values())
