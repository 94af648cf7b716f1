"""`RoleController`: the router's SLO loop. It judges requests against the SLO in windows (each request once:
when it ends, or while it runs once it has plainly missed), asks the `RolePolicy` at each window's end which
pool is the bottleneck, and moves a worker of the other pool: drained first (no new work), sent `SwitchRole`
once it holds none, back to its pool if it has not switched in time. A decode worker whose requests outlast
the drain timeout has them migrated to other decode workers (`evacuate`), so that its switch goes on. It owns
the window, the policy's state and the count of switches; the workers' switch fields are its to set. Runs on
the router's event loop.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from splitserve.protocol import Role, SwitchRole, ToWorker, WorkerInfo
from splitserve.router.cluster.jobs import Job, JobState
from splitserve.router.cluster.membership import Membership, Worker
from splitserve.router.cluster.policy import Decision, RolePolicy, Window, WindowCounts, judge

if TYPE_CHECKING:
    from splitserve.router.cluster.options import RouterOptions

log = logging.getLogger(__name__)


class RoleController:
    def __init__(
        self,
        options: RouterOptions,
        members: Membership,
        send: Callable[[Worker, ToWorker], None],
        evacuate: Callable[[Worker, str, str], None],
    ):
        """`evacuate(worker, why, reason)`: move the worker's requests to others (the cluster's)."""
        self.options, self.members, self._send, self._evacuate = options, members, send, evacuate
        # One router decides role switches: among replicas, replica 0 (the others' workers are the same).
        deciding = options.role_switching and options.replica == 0
        self.policy = RolePolicy(options.policy) if options.slo and deciding else None
        self.window = WindowCounts(time.monotonic())  # the one under way
        self.last_window: Window | None = None
        self.last_verdict = ""
        self.switches: Counter[tuple[str, str]] = Counter()  # done, by (old role, new role)

    def observe(self, job: Job, now: float, final: bool = True) -> None:
        """Count a request in the current window: when it ends, or while it runs once it has plainly missed
        the SLO (`policy.judge`); each request once."""
        if self.options.slo is None or job.judged:
            return
        waited = job.waited_s + (now - job.enqueued_at if job.state is JobState.QUEUED else 0.0)
        verdict = judge(self.options.slo, now, job.created, job.first_token_at, job.num_tokens, waited, final)
        if verdict is None:
            return
        job.judged = True
        self.window.count(verdict)

    def switch_role(self, worker_id: str, role: Role, reason: str) -> None:
        """Move a worker to the other pool: KeyError for an unknown worker, ValueError when it cannot move."""
        w = self.members.workers.get(worker_id)
        if w is None:
            raise KeyError(worker_id)
        if Role.BOTH in (role, w.role):
            raise ValueError("only prefill and decode workers switch roles, between those two")
        if w.role is role or w.switch is not None:
            raise ValueError(f"it is a {w.role.value} worker" + (" switching already" if w.switch else " already"))
        if w.role is Role.DECODE and len(self.members.pool(Role.DECODE)) == 1:
            raise ValueError("it is the last decode worker: nothing could serve requests without it")
        self._drain(w, Decision(w.role, role, reason), time.monotonic())

    def tick(self, now: float, jobs: Iterable[Job]) -> None:
        """Each watch tick: count who is busy; at each window's end ask the policy; move switches along."""
        workers = self.members.workers
        if self.policy is not None:
            self.window.ticks += 1
            for w in workers.values():
                w.busy_ticks += bool(w.jobs)
            for job in jobs:
                self.observe(job, now, final=False)
            if self.options.policy.window_over(now - self.window.start, self.window.requests):
                window = self._close_window(now)
                decision = self.policy.decide(window, now)
                self.last_window, self.last_verdict = window, self.policy.last_reason
                log.info("SLO window: %s", self.last_verdict)
                candidates = self.members.pool(decision.source) if decision is not None else []
                if candidates:  # the least busy worker of the source pool
                    self._drain(min(candidates, key=lambda w: len(w.jobs)), decision, now)
        for w in list(workers.values()):
            if w.switch is not None:
                self._advance_switch(w, now)

    def role_changed(self, w: Worker, info: WorkerInfo) -> None:
        """A worker's heartbeat shows a new role: the switch is done; it takes work of that role now."""
        old = w.role
        why = w.switch.reason if w.switch is not None and w.switch.target is info.role else "switched by itself"
        w.info, w.switch, w.switch_sent = info, None, False
        self.members.changed()
        w.role_reason = f"switched from {old.value} {time.strftime('%H:%M:%S')}: {why}"
        self.switches[(old.value, info.role.value)] += 1
        log.warning("worker %s is now a %s worker", w.worker_id, info.role.value)

    def _drain(self, w: Worker, decision: Decision, now: float) -> None:
        """Stop giving `w` new work; it gets `SwitchRole` once it holds none."""
        w.switch, w.switch_started, w.switch_sent = decision, now, False
        self.members.changed()
        log.warning("moving worker %s from the %s pool to the %s pool: %s", w.worker_id, decision.source.value,
                    decision.target.value, decision.reason)  # fmt: skip
        self._advance_switch(w, now)

    def _advance_switch(self, w: Worker, now: float) -> None:
        waited = now - w.switch_started
        if w.jobs and w.role is Role.DECODE and waited > self.options.drain_timeout_s:
            log.warning("worker %s still holds %d requests %.0fs after it was drained for a switch: they migrate",
                        w.worker_id, len(w.jobs), waited)  # fmt: skip
            self._evacuate(w, f"was drained to switch roles and did not finish within {waited:.0f}s", "drain_timeout")
        if not w.switch_sent and not w.jobs:
            w.switch_sent = True
            self._send(w, SwitchRole(w.switch.target, w.switch.reason))
        elif waited > self.options.switch_timeout_s:
            log.warning("worker %s did not switch to %s within %.0fs: back to its pool", w.worker_id,
                        w.switch.target.value, self.options.switch_timeout_s)  # fmt: skip
            w.switch, w.switch_sent = None, False
            self.members.changed()

    def _close_window(self, now: float) -> Window:
        counts, self.window = self.window, WindowCounts(now)
        busy = [[w.busy_ticks for w in self.members.pool(role)] for role in (Role.PREFILL, Role.DECODE)]
        window = counts.window(*busy)
        for w in self.members.workers.values():
            w.busy_ticks = 0
        return window
