"""`Placement`: which worker takes a request. It reads the workers (`Membership`) and the prefix index, and
changes nothing: the cluster applies its choice.

A worker's cost is pages of work: the prompt pages it would have to compute (less what it holds cached, by the
prefix index) plus the pages and prompt tokens it already has (by its reports, or the router's own count of
what it placed there, whichever is more: a cached prefix wins only while it outweighs the load gap). A request
goes to the decode worker with room (free pages, batch slots, and under an SLO a decode step fast enough for its
TPOT) and the least cost, which either prefills it itself (`policy.prefills_locally`: a conversation's next
turn it holds nearly whole, and under an SLO short prompts and prompts the prefill pool could not start in
time; always when no prefill worker is left) or reserves pages for the prefill worker with the least cost.
Without decode workers it goes to the colocated worker (role both) with the least cost.

In a pool of more than `WEIGH_ALL_UP_TO` workers a request does not weigh every worker: only a shortlist, the
workers that hold the longest cached prefix of its prompt (a few of them, by the prefix index's `holders`) and
`SAMPLED` drawn at random (the power of d choices keeps the load near even), falling back to the whole pool
when none on the list has room. Placing a request then costs the same at 1,024 workers as at 8.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from splitserve.protocol import Role
from splitserve.router.cluster.jobs import Job, JobState
from splitserve.router.cluster.membership import Membership, Worker
from splitserve.router.cluster.policy import LocalPrefill, has_decode_room, local_prefill_threshold, prefills_locally

if TYPE_CHECKING:
    from splitserve.router.cluster.options import RouterOptions


WEIGH_ALL_UP_TO = 8  # pools this small are weighed whole
SAMPLED = 3  # workers drawn at random onto a larger pool's shortlist
PREFIX_HOLDERS = 3  # workers holding the longest cached prefix put on the shortlist


@dataclass(frozen=True)
class Choice:
    worker: Worker
    local: bool  # it prefills the prompt itself (`Generate`); else it reserves pages for a prefill worker


class Placement:
    def __init__(self, options: RouterOptions, members: Membership):
        self.options, self.members = options, members

    def choose(self, job: Job, jobs: dict[int, Job]) -> Choice | None:
        """The worker that takes `job` now, or None when none has room. `jobs`: the attempts in flight."""
        decode_pool = self.members.pool(Role.DECODE)
        if decode_pool:
            tpot = self.options.slo.tpot if self.options.slo is not None else None

            def has_room(w: Worker) -> bool:
                return (not w.refused_reserve and has_decode_room(w.load.decode_step_s, tpot, len(w.jobs))
                        and w.free_pages() >= job.pages_needed and len(w.jobs) < w.info.max_num_seqs
                        and job.num_prefill_tokens < w.info.max_model_len)  # fmt: skip

            d = self._best(decode_pool, job, has_room)
            return None if d is None else Choice(d, self._prefills_locally(d, job, jobs))
        both = self._best(self.members.pool(Role.BOTH), job, lambda w: len(w.jobs) < w.info.max_num_seqs)
        return None if both is None else Choice(both, local=True)

    def prefill_worker(self, job: Job) -> Worker | None:
        """The prefill worker to compute `job`'s prompt into its reserved pages (None: none is left)."""
        return self._best(self.members.pool(Role.PREFILL), job, lambda w: True)

    def _best(self, pool: list[Worker], job: Job, has_room) -> Worker | None:
        """The worker of least cost with room: of the shortlist when the pool is large, else (or when none on
        the list has room) of the whole pool."""
        if len(pool) > WEIGH_ALL_UP_TO:
            listed = [w for w in self._shortlist(pool, job) if has_room(w)]
            if listed:
                return min(listed, key=lambda w: self.cost(w, job))
        return min((w for w in pool if has_room(w)), key=lambda w: self.cost(w, job), default=None)

    def _shortlist(self, pool: list[Worker], job: Job) -> list[Worker]:
        """A few workers of a large pool: those holding the longest cached prefix of the prompt, and some drawn
        at random."""
        listed = random.sample(pool, SAMPLED)
        first = pool[0]  # a pool's workers share a KV layout, so their page hashes agree
        hashes = job.page_hashes(first.root_hash, first.info.page_size)
        index, workers = self.members.prefix_index, self.members.workers
        for h in reversed(hashes):  # the longest prefix anyone holds
            holders = index.holders(h)
            if holders:
                held = (workers.get(i) for i in holders)
                in_pool = (w for w in held if w is not None and w.role is first.role and w.takes_work)
                listed += itertools.islice(in_pool, PREFIX_HOLDERS)
                break
        return listed

    def cached_tokens(self, w: Worker, job: Job) -> int:
        """Prompt tokens `w` holds in its prefix cache, by the index."""
        ps = w.info.page_size
        return self.members.prefix_index.matched_pages(w.worker_id, job.page_hashes(w.root_hash, ps)) * ps

    def cost(self, w: Worker, job: Job) -> float:
        """Pages of work: the prompt's pages it lacks, the pages it has in use, and its queued prompt tokens."""
        uncached = job.num_prefill_tokens - self.cached_tokens(w, job)
        return (uncached + w.load.pending_prefill_tokens + w.prefill_tokens) / w.info.page_size + w.pages_in_use()

    def prefill_tokens_per_s(self) -> float:
        """The workers' measured prompt throughput (their mean; 0 before any measured one)."""
        rates = [w.load.prefill_tokens_per_s for w in self.members.workers.values() if w.load.prefill_tokens_per_s]
        return sum(rates) / len(rates) if rates else 0.0

    def local_prefill_rule(self) -> LocalPrefill:
        slo, configured = self.options.slo, self.options.local_prefill_tokens
        if slo is None:
            return LocalPrefill(256 if configured is None else configured)
        threshold = local_prefill_threshold(self.prefill_tokens_per_s(), slo.tpot, configured)
        return LocalPrefill(threshold, conditional=True)

    def _prefills_locally(self, d: Worker, job: Job, jobs: dict[int, Job]) -> bool:
        """Whether decode worker `d` should prefill the prompt itself (`policy.prefills_locally`): always when
        no prefill worker is left; without an SLO only a prompt it holds partly cached."""
        prefill = self.members.pool(Role.PREFILL)
        cached = self.cached_tokens(d, job)
        if self.options.slo is None and not cached and prefill:
            return False
        pool = min((job.num_prefill_tokens - self.cached_tokens(p, job) + p.prefill_tokens for p in prefill),
                   default=math.inf)  # fmt: skip
        suffix = job.num_prefill_tokens - cached
        # What it runs itself: requests whose KV is still being prefilled elsewhere cost it nothing yet.
        running = sum(jobs[i].state is JobState.GENERATING for i in d.jobs if i in jobs)
        return prefills_locally(suffix, d.load.pending_prefill_tokens, pool, self.local_prefill_rule(), running)
