"""A discrete-event simulation of a disaggregated cluster: P prefill and D decode workers behind the router,
with the policies the real ones use, timed by a measured `Profile`.

- The router sends each arriving request to the decode worker with the fewest requests (at most
  `max_num_seqs` each; otherwise it waits in the router's queue) and to the prefill worker with the fewest
  pending prompt tokens.
- A prefill worker runs passes of at most `max_num_batched_tokens` prompt tokens, first come first served,
  long prompts in chunks. Each chunk's KV travels to the decode worker over the profile's link as soon as the
  chunk is done (streamed, as the prefill worker does), one chunk after another, while later chunks compute;
  the last lands its bytes at the link's bandwidth after the link's delay.
- With no prefill worker (colocated workers, `serve --both`), decode workers prefill every prompt
  themselves, in steps that mix prompt chunks with decode rows: no KV crosses a link.
- A decode worker streams the first token as the KV lands, and runs steps of its whole running batch; a
  request that lands during a step joins the next one.
- Workers slow each other down: a pass started while k workers are busy takes `Profile.slowdown(k)`
  longer (the measured slowdown of two workers side by side, and cores shared beyond cores / threads).
- With a `SimRouter` (an SLO) it runs the router's own policies (`router/cluster/policy.py`): a decode worker
  prefills short prompts and those the prefill pool could not start in time itself, in steps that mix its
  prompt chunks with its decode rows; and every policy window the misses and busy times decide whether a
  worker is drained and moved to the other pool.

It returns the same `Record`s the benchmark client produces, so the same metrics apply to both.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from dataclasses import dataclass, field

from splitserve.bench.client import Record
from splitserve.bench.workloads import LengthDist, Phase, arrival_times
from splitserve.planner.profile import Profile
from splitserve.protocol import Role
from splitserve.router.cluster.policy import (
    LocalPrefill,
    PolicyOptions,
    RolePolicy,
    WindowCounts,
    has_decode_room,
    judge,
    local_prefill_threshold,
    prefills_locally,
)
from splitserve.slo import SLO

_TICK_S = 0.1  # how often the router samples who is busy (its watch loop)


@dataclass(frozen=True)
class SimRequest:
    arrival: float
    prompt_tokens: int
    output_tokens: int


def sample_workload(n: int, rate: float, input_len: LengthDist, output_len: LengthDist, burstiness: float = 1.0,
                    seed: int = 0) -> list[SimRequest]:  # fmt: skip
    rng = random.Random(seed)
    times = arrival_times(n, rate, burstiness, rng)
    return [SimRequest(t, input_len.sample(rng), output_len.sample(rng)) for t in times]


def sample_phases(phases: list[Phase], burstiness: float = 1.0, seed: int = 0) -> list[SimRequest]:
    """A phased workload (as `splitserve bench --workload phased`), phase after phase."""
    rng, requests, start = random.Random(seed), [], 0.0
    for phase in phases:
        t = 0.0
        while (t := t + rng.gammavariate(burstiness, 1.0 / (phase.rate * burstiness))) < phase.duration_s:
            requests.append(SimRequest(start + t, phase.input_len.sample(rng), phase.output_len.sample(rng)))
        start += phase.duration_s
    return requests


@dataclass(frozen=True)
class SimRouter:
    """The router's SLO-driven behaviour: conditional disaggregation, and role switching unless fixed."""

    slo: SLO
    local_prefill_tokens: int | None = None  # None: learned, as the router does
    policy: PolicyOptions | None = field(default_factory=PolicyOptions)  # None: a fixed split


@dataclass(frozen=True)
class Hardware:
    cores: int
    hop_s: float = 0.002  # one router <-> worker message (ZeroMQ and the router's event loop)


@dataclass(eq=False)
class _Req:
    spec: SimRequest
    computed: int = 0
    token_times: list[float] = field(default_factory=list)
    decode: _Decode | None = None
    waited: float = 0.0  # in the router's queue: no decode worker had room
    queued_at: float | None = None  # while it waits there
    judged: bool = False  # counted in a policy window
    link_free: float = 0.0  # when the KV of its chunks so far has crossed the link (streamed while prefilling)


@dataclass(eq=False)
class _Prefill:
    queue: deque = field(default_factory=deque)  # requests not finished, oldest first
    busy: bool = False
    draining: bool = False  # moving to the decode pool once idle
    busy_ticks: int = 0

    @property
    def idle(self) -> bool:
        return not self.busy and not self.queue

    @property
    def pending(self) -> int:
        return sum(r.spec.prompt_tokens - r.computed for r in self.queue)


@dataclass(eq=False)
class _Decode:
    running: list = field(default_factory=list)
    landed: list = field(default_factory=list)  # KV arrived during a step: joins the next one
    local: deque = field(default_factory=deque)  # prompts it prefills itself, oldest first
    assigned: int = 0
    busy: bool = False
    draining: bool = False  # moving to the prefill pool once idle
    busy_ticks: int = 0
    step_s: float = 0.0  # its last step of decode rows only, as the worker measures it

    @property
    def pending(self) -> int:
        return sum(r.spec.prompt_tokens - r.computed for r in self.local)

    @property
    def idle(self) -> bool:
        return not self.busy and not self.assigned


class _Sim:
    def __init__(self, profile: Profile, hw: Hardware, num_prefill: int, num_decode: int,
                 router: SimRouter | None = None):  # fmt: skip
        self.profile, self.hw, self.router = profile, hw, router
        self.prefill = [_Prefill() for _ in range(num_prefill)]
        self.decode = [_Decode() for _ in range(num_decode)]
        self.waiting: deque[_Req] = deque()  # no decode worker had room
        self.events: list = []
        self._seq = itertools.count()
        # Prompt throughput, as workers measure it: a pass of a full token budget.
        budget = profile.max_num_batched_tokens
        self.tokens_per_s = budget / profile.prefill_time(budget)
        self.policy = RolePolicy(router.policy) if router is not None and router.policy is not None else None
        self.switches: list[tuple[float, str]] = []  # (time, "prefill->decode")
        self._unfinished = 0
        self._inflight: set[_Req] = set()  # placed on a worker, not finished
        self._window = WindowCounts(0.0)

    def at(self, t: float, action, *args) -> None:
        heapq.heappush(self.events, (t, next(self._seq), action, args))

    def run(self, requests: list[SimRequest]) -> list[_Req]:
        reqs = [_Req(s) for s in requests]
        self._unfinished = len(reqs)
        for r in reqs:
            self.at(r.spec.arrival + self.hw.hop_s, self.arrive, r)
        if self.policy is not None:
            self.at(0.0, self.tick)
        while self.events:
            t, _, action, args = heapq.heappop(self.events)
            action(t, *args)
        return reqs

    def slowdown(self) -> float:
        busy = sum(w.busy for w in (*self.prefill, *self.decode))
        return self.profile.slowdown(busy, self.hw.cores)

    def arrive(self, t: float, r: _Req) -> None:
        tpot = self.router.slo.tpot if self.router is not None else None
        room = [d for d in self.decode if d.assigned < self.profile.max_num_seqs and not d.draining
                and has_decode_room(d.step_s, tpot, d.assigned)]  # fmt: skip
        if not room:
            r.queued_at = t
            self.waiting.append(r)
            return
        self._inflight.add(r)
        d = min(room, key=lambda d: d.assigned)
        prefill = [p for p in self.prefill if not p.draining]
        if self._prefills_locally(d, r, prefill):
            d.assigned += 1
            r.decode = d
            d.local.append(r)
            self.at(t + self.hw.hop_s, self.kick_decode, d)
            return
        d.assigned += 1
        r.decode = d
        p = min(prefill, key=lambda p: p.pending)
        p.queue.append(r)
        # Reserve on the decode worker, then the prefill message: two more hops.
        self.at(t + 2 * self.hw.hop_s, self.kick_prefill, p)

    def _prefills_locally(self, d: _Decode, r: _Req, prefill: list[_Prefill]) -> bool:
        pool = min((p.pending + r.spec.prompt_tokens for p in prefill), default=math.inf)
        if self.router is None:
            return math.isinf(pool)
        slo = self.router.slo
        threshold = local_prefill_threshold(self.tokens_per_s, slo.tpot, self.router.local_prefill_tokens)
        rule = LocalPrefill(threshold, conditional=True)
        running = len(d.running) + len(d.landed) + len(d.local)  # not those still being prefilled elsewhere
        return prefills_locally(r.spec.prompt_tokens, d.pending, pool, rule, running)

    def kick_prefill(self, t: float, p: _Prefill) -> None:
        if p.busy or not p.queue:
            return
        budget, chunks = self.profile.max_num_batched_tokens, []
        for r in p.queue:
            if budget == 0:
                break
            n = min(r.spec.prompt_tokens - r.computed, budget)
            chunks.append((r, n))
            budget -= n
        p.busy = True
        tokens = sum(n for _, n in chunks)
        self.at(t + self.profile.prefill_time(tokens) * self.slowdown(), self.prefill_done, p, chunks)

    def prefill_done(self, t: float, p: _Prefill, chunks: list) -> None:
        p.busy = False
        link, per_token = self.profile.link, self.profile.kv_bytes_per_token
        for r, n in chunks:
            r.computed += n
            r.link_free = max(r.link_free, t) + n * per_token / link.bandwidth
            if r.computed == r.spec.prompt_tokens:
                p.queue.remove(r)
                self.at(r.link_free + link.delay_s + self.hw.hop_s, self.land, r)
        self.kick_prefill(t, p)

    def land(self, t: float, r: _Req) -> None:
        r.token_times.append(t + self.hw.hop_s)  # the first token, on its way to the client
        d = r.decode
        if r.spec.output_tokens == 1:
            self.finish(t, r)
            return
        d.landed.append(r)
        self.at(t, self.kick_decode, d)  # after other landings at this instant: one poll sees them all

    def kick_decode(self, t: float, d: _Decode) -> None:
        if d.busy:
            return
        d.running.extend(d.landed)
        d.landed.clear()
        if not d.running and not d.local:
            return
        d.busy = True
        # A step of its decode rows and, within the token budget, a chunk of the oldest local prompt.
        chunk = None
        step = 0.0
        if d.running:
            context = sum(r.spec.prompt_tokens + len(r.token_times) for r in d.running) / len(d.running)
            step = self.profile.decode_time(len(d.running), context)
            if not d.local:
                d.step_s = step * self.slowdown()
        if d.local:
            r = d.local[0]
            n = min(r.spec.prompt_tokens - r.computed, max(1, self.profile.max_num_batched_tokens - len(d.running)))
            chunk = (r, n)
            step += self.profile.prefill_time(n)
        self.at(t + step * self.slowdown(), self.decode_done, d, chunk)

    def decode_done(self, t: float, d: _Decode, chunk: tuple[_Req, int] | None = None) -> None:
        d.busy = False
        for r in list(d.running):
            r.token_times.append(t + self.hw.hop_s)
            if len(r.token_times) == r.spec.output_tokens:
                d.running.remove(r)
                self.finish(t, r)
        if chunk is not None:
            r, n = chunk
            r.computed += n
            if r.computed == r.spec.prompt_tokens:
                d.local.popleft()
                r.token_times.append(t + self.hw.hop_s)
                if r.spec.output_tokens == 1:
                    self.finish(t, r)
                else:
                    d.running.append(r)
        self.kick_decode(t, d)

    def finish(self, t: float, r: _Req) -> None:
        r.decode.assigned -= 1
        self._unfinished -= 1
        self._inflight.discard(r)
        if self.router is not None:
            self._observe(r, t, final=True)
        if self.waiting:
            nxt = self.waiting.popleft()
            nxt.waited += t - nxt.queued_at
            nxt.queued_at = None
            self.arrive(t, nxt)

    # --- the router's SLO loop, as `router/cluster/cluster.py` runs it ------------------------------------------

    def _observe(self, r: _Req, t: float, final: bool) -> None:
        if r.judged:
            return
        waited = r.waited + (t - r.queued_at if r.queued_at is not None else 0.0)
        first = r.token_times[0] if r.token_times else None
        verdict = judge(self.router.slo, t, r.spec.arrival, first, len(r.token_times), waited, final)
        if verdict is None:
            return
        r.judged = True
        self._window.count(verdict)

    def tick(self, t: float) -> None:
        """The router's watch loop: busy samples; each window the policy; drained workers switch."""
        if self._unfinished == 0:
            return
        self._window.ticks += 1
        for w in (*self.prefill, *self.decode):
            w.busy_ticks += not w.idle
        for r in (*self._inflight, *self.waiting):
            self._observe(r, t, final=False)
        if self.policy.options.window_over(t - self._window.start, self._window.requests):
            prefill = [p for p in self.prefill if not p.draining]
            decode = [d for d in self.decode if not d.draining]
            window = self._window.window([p.busy_ticks for p in prefill], [d.busy_ticks for d in decode])
            self._window = WindowCounts(t)
            for w in (*self.prefill, *self.decode):
                w.busy_ticks = 0
            decision = self.policy.decide(window, t)
            source = prefill if decision is not None and decision.source is Role.PREFILL else decode
            if decision is not None and source:
                pick = min(source, key=lambda w: w.assigned if isinstance(w, _Decode) else len(w.queue))
                pick.draining = True
        for p in [p for p in self.prefill if p.draining and p.idle]:
            self.prefill.remove(p)
            self.decode.append(_Decode())
            self.switches.append((t, "prefill->decode"))
        for d in [d for d in self.decode if d.draining and d.idle]:
            self.decode.remove(d)
            self.prefill.append(_Prefill())
            self.switches.append((t, "decode->prefill"))
        self.at(t + _TICK_S, self.tick)


def simulate(profile: Profile, hw: Hardware, num_prefill: int, num_decode: int, requests: list[SimRequest],
             router: SimRouter | None = None, switches: list | None = None) -> list[Record]:  # fmt: skip
    """Every request's timings (seconds from the start), as the benchmark client would have seen them.
    `switches`: filled with the role switches the router made, as (time, "prefill->decode")."""
    sim = _Sim(profile, hw, num_prefill, num_decode, router)
    done = sim.run(requests)
    if switches is not None:
        switches.extend(sim.switches)
    records = []
    for r in done:
        times = r.token_times
        records.append(Record(r.spec.prompt_tokens, r.spec.output_tokens, sent=r.spec.arrival, chunk_times=times,
                              end=times[-1], output_tokens=len(times)))  # fmt: skip
    return records
