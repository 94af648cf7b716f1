"""A discrete-event simulation of a disaggregated cluster: P prefill and D decode workers behind the router,
with the policies the real ones use, timed by a measured `Profile`.

- The router sends each arriving request to the decode worker with the fewest requests (at most
  `max_num_seqs` each; otherwise it waits in the router's queue) and to the prefill worker with the fewest
  pending prompt tokens.
- A prefill worker runs passes of at most `max_num_batched_tokens` prompt tokens, first come first served,
  long prompts in chunks. When a prompt's last chunk is done its KV travels to the decode worker.
- A decode worker streams the first token as the KV lands, and runs steps of its whole running batch; a
  request that lands during a step joins the next one.
- Workers slow each other down: a pass started while k workers are busy takes `Profile.slowdown(k)`
  longer (the measured slowdown of two workers side by side, and cores shared beyond cores / threads).

It returns the same `Record`s the benchmark client produces, so the same metrics apply to both.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from dataclasses import dataclass, field

from splitserve.bench.client import Record
from splitserve.bench.workloads import LengthDist, arrival_times
from splitserve.planner.profile import Profile


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


@dataclass(frozen=True)
class Hardware:
    cores: int
    kv_bandwidth: float = 4e9  # bytes/s between workers (UCX TCP on loopback measured 4.4-5.3 GB/s)
    hop_s: float = 0.002  # one router <-> worker message (ZeroMQ and the router's event loop)


@dataclass(eq=False)
class _Req:
    spec: SimRequest
    computed: int = 0
    token_times: list[float] = field(default_factory=list)
    decode: _Decode | None = None


@dataclass(eq=False)
class _Prefill:
    queue: deque = field(default_factory=deque)  # requests not finished, oldest first
    busy: bool = False

    @property
    def pending(self) -> int:
        return sum(r.spec.prompt_tokens - r.computed for r in self.queue)


@dataclass(eq=False)
class _Decode:
    running: list = field(default_factory=list)
    landed: list = field(default_factory=list)  # KV arrived during a step: joins the next one
    assigned: int = 0
    busy: bool = False


class _Sim:
    def __init__(self, profile: Profile, hw: Hardware, num_prefill: int, num_decode: int):
        self.profile, self.hw = profile, hw
        self.prefill = [_Prefill() for _ in range(num_prefill)]
        self.decode = [_Decode() for _ in range(num_decode)]
        self.waiting: deque[_Req] = deque()  # no decode worker had room
        self.events: list = []
        self._seq = itertools.count()

    def at(self, t: float, action, *args) -> None:
        heapq.heappush(self.events, (t, next(self._seq), action, args))

    def run(self, requests: list[SimRequest]) -> list[_Req]:
        reqs = [_Req(s) for s in requests]
        for r in reqs:
            self.at(r.spec.arrival + self.hw.hop_s, self.arrive, r)
        while self.events:
            t, _, action, args = heapq.heappop(self.events)
            action(t, *args)
        return reqs

    def slowdown(self) -> float:
        busy = sum(w.busy for w in (*self.prefill, *self.decode))
        return self.profile.slowdown(busy, self.hw.cores)

    def arrive(self, t: float, r: _Req) -> None:
        room = [d for d in self.decode if d.assigned < self.profile.max_num_seqs]
        if not room:
            self.waiting.append(r)
            return
        d = min(room, key=lambda d: d.assigned)
        d.assigned += 1
        r.decode = d
        p = min(self.prefill, key=lambda p: p.pending)
        p.queue.append(r)
        # Reserve on the decode worker, then the prefill message: two more hops.
        self.at(t + 2 * self.hw.hop_s, self.kick_prefill, p)

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
        for r, n in chunks:
            r.computed += n
            if r.computed == r.spec.prompt_tokens:
                p.queue.remove(r)
                kv = r.spec.prompt_tokens * self.profile.kv_bytes_per_token / self.hw.kv_bandwidth
                self.at(t + kv + self.hw.hop_s, self.land, r)
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
        if not d.running:
            return
        d.busy = True
        context = sum(r.spec.prompt_tokens + len(r.token_times) for r in d.running) / len(d.running)
        step = self.profile.decode_time(len(d.running), context) * self.slowdown()
        self.at(t + step, self.decode_done, d)

    def decode_done(self, t: float, d: _Decode) -> None:
        d.busy = False
        for r in list(d.running):
            r.token_times.append(t + self.hw.hop_s)
            if len(r.token_times) == r.spec.output_tokens:
                d.running.remove(r)
                self.finish(t, r)
        self.kick_decode(t, d)

    def finish(self, t: float, r: _Req) -> None:
        r.decode.assigned -= 1
        if self.waiting:
            self.arrive(t, self.waiting.popleft())


def simulate(profile: Profile, hw: Hardware, num_prefill: int, num_decode: int,
             requests: list[SimRequest]) -> list[Record]:  # fmt: skip
    """Every request's timings (seconds from the start), as the benchmark client would have seen them."""
    done = _Sim(profile, hw, num_prefill, num_decode).run(requests)
    records = []
    for r in done:
        times = r.token_times
        records.append(Record(r.spec.prompt_tokens, r.spec.output_tokens, sent=r.spec.arrival, chunk_times=times,
                              end=times[-1], output_tokens=len(times)))  # fmt: skip
    return records
