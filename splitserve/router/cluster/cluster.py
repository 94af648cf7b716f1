"""`Cluster`: every request in flight and the ZeroMQ socket to the workers.

It owns the bounded queue of requests waiting for room, each request's attempts (`jobs.Job`) and their
placement: reserve pages on a decode worker first, then send the prefill, then relay the decode worker's
tokens. Which workers there are, and what each holds, is `membership.Membership`'s (a worker joins with its
first heartbeat and leaves with a goodbye, or when its heartbeats stop); the cluster reads it to place work.

Placement is KV-aware: the `PrefixIndex` says how much of a prompt each worker holds cached, and a worker's
cost is the prompt pages it would have to compute plus the pages and prompt tokens it already has in work.
A decode worker that holds all but a short suffix of a prompt (a conversation's next turn: its previous
prompt and answer are there) prefills that suffix itself, when that is less work than the prefill pool's.
With an SLO the router also meets it by itself (policies in `policy.py`): short prompts, and prompts the
prefill pool could not start in time, are prefilled by their decode worker (conditional disaggregation);
and when a window's misses say one pool is the bottleneck while the other idles, a worker of the idle pool
is drained (no new work) and switched in place to the other role (`SwitchRole`; its heartbeats then show
the new role). Decode workers prefill for themselves whenever no prefill worker is left.
A request that fails before its first token is retried from the start (new job id) on the workers left;
one that fails later (its decode worker died, a transfer failed, or its worker was drained for a role switch
and did not finish in time) is *migrated*: the next attempt prefills the prompt and the tokens already sent
and resumes after them (a seeded request's sampler too), so the client's stream goes on without a gap; after
`--migration-limit` migrations it ends with an error event. Everything runs on the router's asyncio loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import secrets
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from splitserve.engine.params import SamplingParams
from splitserve.protocol import (
    Abort,
    CacheEvents,
    Generate,
    Goodbye,
    Heartbeat,
    JobFailed,
    Prefill,
    PrefillDone,
    ProtocolError,
    Refused,
    Reserve,
    Reserved,
    Role,
    Tokens,
    ToWorker,
    decode_to_router,
    encode,
)
from splitserve.router.cluster.jobs import ErrorEvent, Job, JobState, Overloaded, TokenEvent
from splitserve.router.cluster.membership import Membership, Worker
from splitserve.router.cluster.options import RouterOptions
from splitserve.router.cluster.placement import Placement
from splitserve.router.cluster.prefix_index import PrefixIndex
from splitserve.router.cluster.roles import RoleController
from splitserve.router.cluster.snapshot import ClusterView, PoolView, RoleSwitches, RoutingView, WorkerView

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3


@dataclass
class ClusterStats:
    malformed_messages: int = 0
    retries: int = 0
    workers_lost: int = 0
    worker_restarts: dict[str, int] = field(default_factory=dict)  # by role: dead workers `serve` started again
    prefix_routed: int = 0  # requests placed on a worker holding part of their prompt (by the index)
    prefix_routed_tokens: int = 0  # prompt tokens those workers held
    local_prefills: int = 0  # prompts a decode worker prefilled itself (conditional disaggregation)
    migrations: Counter[str] = field(default_factory=Counter)  # requests moved mid-stream, by reason


class Cluster:
    def __init__(self, options: RouterOptions):
        self.options = options
        self.members = Membership(options.model)
        self.jobs: dict[int, Job] = {}  # by wire id of the current attempt
        self.queue: deque[Job] = deque()
        self.stats = ClusterStats()
        # Job ids start at a random point: a worker that outlived an earlier router never sees one reused. Among
        # replicas, replica i's ids are i modulo their number: a worker answers each job to the router it names.
        start, n = secrets.randbits(56), options.replicas
        self._wire_ids = (k * n + options.replica for k in itertools.count(start))
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished worker raises, not drops
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, 64 * 1024 * 1024)
        self._tasks: list[asyncio.Task] = []
        self.placement = Placement(options, self.members)
        self.roles = RoleController(options, self.members, self._send, self._evacuate)
        self._restarts: queue.SimpleQueue[str] = queue.SimpleQueue()  # reported by `serve`'s supervisor thread

    # --- lifecycle -----------------------------------------------------------------------------------

    def bind(self, address: str) -> str:
        """Bind the worker socket (`tcp://HOST:PORT`, port 0 for any free one); returns the bound address."""
        self._socket.bind(address)
        return self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._receive_loop()), asyncio.create_task(self._watch_loop())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for job in list(self.jobs.values()):
            self._fail(job, "the router is shutting down", 503)
        self._socket.close()
        self._context.term()

    # --- what the HTTP layer calls -------------------------------------------------------------------

    @property
    def workers(self) -> dict[str, Worker]:
        return self.members.workers

    @property
    def prefix_index(self) -> PrefixIndex:
        return self.members.prefix_index

    @property
    def num_joined(self) -> int:
        return self.members.num_joined

    @property
    def max_model_len(self) -> int | None:
        return self.members.max_model_len

    def can_serve(self) -> bool:
        return self.members.can_serve()

    def submit(self, prompt_token_ids: list[int], params: SamplingParams, cache_key: str | None = None) -> Job:
        """Queue a request; its events (tokens, or an error) arrive on `job.events`. Requests of one
        conversation share a `cache_key`: the workers keep its pages for its next turn."""
        self.check_admission()
        page_size = min(w.info.page_size for w in self.workers.values())
        now = time.monotonic()
        job = Job(list(prompt_token_ids), params, now, page_size, queued_at=now, cache_key=cache_key)
        self._enqueue(job, front=False)
        self._dispatch()
        return job

    def check_admission(self) -> None:
        """Raise Overloaded when a new request could not be queued now (no worker can serve, or the queue is
        full): what `submit` checks, and the HTTP layer before it parses a request's body."""
        if not self.can_serve():
            raise Overloaded("no workers can serve requests right now", 503, retry_after_s=5)
        if len(self.queue) >= self.options.max_queue:
            raise Overloaded(f"too many requests waiting ({len(self.queue)}); retry later", 429)

    def abort(self, job: Job) -> None:
        """The client is gone (or a stop string ended the request): free it everywhere."""
        if job.state is JobState.DONE:
            return
        if job in self.queue:
            self.queue.remove(job)
        self.roles.observe(job, time.monotonic())
        self._release(job)
        job.state = JobState.DONE

    # --- placement -----------------------------------------------------------------------------------

    def _enqueue(self, job: Job, front: bool) -> None:
        job.wire_id, job.enqueued_at = next(self._wire_ids), time.monotonic()
        job.state, job.prefill, job.decode = JobState.QUEUED, None, None
        self.jobs[job.wire_id] = job
        if front:
            self.queue.appendleft(job)
        else:
            self.queue.append(job)

    def _dispatch(self) -> None:
        """Place queued requests, oldest first, while there is room (no overtaking the head)."""
        while self.queue:
            job = self.queue[0]
            try:
                placed = self._place(job)
            except Exception as e:  # a bug met by one request fails that request, never the queue behind it
                log.exception("could not place a request")
                self.queue.popleft()
                self._fail(job, f"internal error placing this request: {type(e).__name__}: {e}", 500)
                continue
            if not placed:
                return
            self.queue.popleft()
            job.waited_s += time.monotonic() - job.enqueued_at

    def _place(self, job: Job) -> bool:
        """Give the job to the worker `Placement` chooses; False when none has room now."""
        choice = self.placement.choose(job, self.jobs)
        if choice is None:
            return False
        w = choice.worker
        if choice.local:
            self.stats.local_prefills += w.role is Role.DECODE
            self._generate(w, job)
            return True
        job.state, job.decode, job.attempts = JobState.RESERVING, w.worker_id, job.attempts + 1
        w.take(job.wire_id, reserving_pages=job.pages_needed, pages=job.pages_needed)
        self._send(w, Reserve(job.wire_id, job.prompt_token_ids, job.params, job.cache_key, job.resumed_token_ids))
        return True

    def _generate(self, w: Worker, job: Job) -> None:
        """The worker prefills the prompt itself and generates (role both, or a decode worker's local prefill)."""
        self._note_routing(w, job)
        job.state, job.decode, job.attempts = JobState.GENERATING, w.worker_id, job.attempts + 1
        w.take(job.wire_id, pages=job.pages_needed)
        self._send(w, Generate(job.wire_id, job.prompt_token_ids, job.params, job.cache_key, job.resumed_token_ids))

    def _note_routing(self, w: Worker, job: Job) -> None:
        """Count a placement on the worker that will compute the prompt, when it holds part of it."""
        cached = self.placement.cached_tokens(w, job)
        if cached:
            self.stats.prefix_routed += 1
            self.stats.prefix_routed_tokens += cached

    # --- the SLO loop (roles.RoleController) and operators' requests -----------------------------------

    def switch_role(self, worker_id: str, role: Role, reason: str) -> None:
        """Move a worker to the other pool (an operator's request): KeyError for an unknown worker,
        ValueError when it cannot move (the last decode worker: nothing could serve)."""
        self.roles.switch_role(worker_id, role, reason)

    def report_restart(self, role: str) -> None:
        """A dead worker of `role` was started again (thread-safe: `serve`'s supervisor calls it)."""
        self._restarts.put(role)

    def drain(self, worker_id: str) -> None:
        """Send a worker no new work, so that it can be stopped once it holds none (`/health` shows its
        jobs); KeyError for an unknown worker."""
        self.workers[worker_id].leaving = True
        self.members.changed()
        log.info("draining worker %s: it gets no new work", worker_id)

    def _balance(self, now: float) -> None:
        """Each watch tick: the SLO loop judges running requests, closes windows and moves switches along."""
        self.roles.tick(now, self.jobs.values())

    # --- messages from workers -----------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            parts = await self._socket.recv_multipart()
            try:
                if len(parts) != 2:
                    raise ProtocolError(f"expected 2 frames (sender, message), got {len(parts)}")
                message = decode_to_router(parts[1])
            except ProtocolError as e:
                self.stats.malformed_messages += 1
                log.warning("dropped a malformed message from a worker: %s", e)
                continue
            try:
                self._handle(message, parts[0].decode(errors="replace"))
            except Exception:  # a bug here must not take the router down with it
                log.exception("error handling %s", type(message).__name__)
            self._dispatch()

    def _handle(self, message, sender: str) -> None:
        """`sender` is the ZMQ identity: the worker id, except for heartbeats (their own socket, their own id)."""
        if isinstance(message, Heartbeat):
            self._heartbeat(message)
            return
        if isinstance(message, Goodbye):
            if message.worker_id in self.workers:
                self._remove_worker(message.worker_id, "it shut down")
            return
        worker_id = sender if sender in self.workers else None
        if isinstance(message, Reserved):
            self._reserved(message, worker_id)
        elif isinstance(message, PrefillDone):
            self._prefill_done(message, worker_id)
        elif isinstance(message, Tokens):
            self._tokens(message, worker_id)
        elif isinstance(message, JobFailed):
            self._job_failed(message, worker_id)
        elif isinstance(message, CacheEvents) and worker_id is not None:
            self.prefix_index.apply(worker_id, message.stored, message.removed)

    def _heartbeat(self, hb: Heartbeat) -> None:
        info = hb.info
        worker = self.workers.get(info.worker_id)
        if worker is None:
            problem = self.members.admission_problem(info)
            if problem:
                log.warning("refused worker %s: %s", info.worker_id, problem)
                with contextlib.suppress(zmq.ZMQError):
                    self._socket.send_multipart([info.worker_id.encode(), encode(Refused(problem))], zmq.NOBLOCK)
                return
            worker = self.members.join(hb)
            log.info("worker %s joined (%s, %d pages, pid %d on %s)", info.worker_id, info.role.value,
                     info.num_pages, info.pid, info.host)  # fmt: skip
        if info.role is not worker.role:
            self.roles.role_changed(worker, info)
        worker.load, worker.kv, worker.loop_age_s, worker.cache = hb.load, hb.kv, hb.loop_age_s, hb.cache
        worker.speculation = hb.speculation
        worker.last_heartbeat = time.monotonic()
        worker.refused_reserve = False

    def _reserved(self, message: Reserved, worker_id: str | None) -> None:
        job = self.jobs.get(message.job)
        d = self.workers.get(worker_id) if worker_id else None
        if d is not None:
            d.load = message.load
            d.settle(message.job)
        if job is None or job.state is not JobState.RESERVING or d is None:
            return
        if message.ticket is None and message.invalid:  # the request itself: no worker would take it
            self._fail(job, message.error, 400)
            return
        if message.ticket is None:  # refused: it is fuller than we knew; back to the head of the queue
            d.refused_reserve = True
            d.drop(job.wire_id)
            del self.jobs[job.wire_id]
            job.attempts -= 1  # a refusal is not a failed attempt
            self._enqueue(job, front=True)
            return
        p = self.placement.prefill_worker(job)
        if p is None:
            self._recover(job, "no prefill worker is left", "no_prefill_worker")
            return
        self._note_routing(p, job)
        job.state, job.prefill = JobState.PREFILLING, p.worker_id
        p.take(job.wire_id, prefill_tokens=job.num_prefill_tokens)
        prefill = Prefill(job.wire_id, job.prompt_token_ids, job.params, message.ticket, job.cache_key,
                          job.resumed_token_ids)  # fmt: skip
        self._send(p, prefill)

    def _prefill_done(self, message: PrefillDone, worker_id: str | None) -> None:
        job = self.jobs.get(message.job)
        p = self.workers.get(worker_id) if worker_id else None
        if p is not None:
            p.load = message.load
            p.drop(message.job)
        if job is not None and job.prefill == worker_id:
            job.prefill = None
            if not message.ok and not job.attempt_started:
                if message.retryable:
                    self._recover(job, f"prefill failed: {message.error}", "prefill_failed")
                else:
                    self._fail(job, message.error, 400 if message.invalid else 500)

    def _tokens(self, message: Tokens, worker_id: str | None) -> None:
        d = self.workers.get(worker_id) if worker_id else None
        if d is not None:
            d.load = message.load
        now = time.monotonic()
        stale: set[int] = set()
        for item in message.items:
            job = self.jobs.get(item.job)
            if job is None or job.state is JobState.DONE:
                if item.finish_reason is None:
                    stale.add(item.job)
                continue
            if job.first_token_at is None:
                job.first_token_at = now
            job.state = JobState.GENERATING
            job.output_token_ids.append(item.token_id)
            job.events.put_nowait(TokenEvent(item.token_id, item.logprob, item.finish_reason))
            if item.finish_reason is not None:
                self._finish(job)
        if d is not None:  # a worker still generating for a request we dropped (e.g. it was taken for dead)
            for job_id in stale:
                self._send(d, Abort(job_id))

    def _job_failed(self, message: JobFailed, worker_id: str | None) -> None:
        job = self.jobs.get(message.job)
        w = self.workers.get(worker_id) if worker_id else None
        if w is not None:
            w.drop(message.job)
        if job is None or job.state is JobState.DONE:
            return
        if job.decode == worker_id:
            job.decode = None
        if message.retryable:  # the worker, not the request, failed (a KV transfer, say)
            self._recover(job, message.error, "transfer_failed")
        else:
            self._fail(job, message.error, 400 if message.invalid else 500)

    # --- endings -------------------------------------------------------------------------------------

    def _recover(self, job: Job, why: str, reason: str) -> None:
        """The current attempt failed through no fault of the request: start it over if no token reached the
        client yet, else migrate it (`reason`: the label it is counted under)."""
        if job.num_tokens == 0:
            self._retry(job, why)
        else:
            self._migrate(job, why, reason)

    def _migrate(self, job: Job, why: str, reason: str) -> None:
        """Continue a request whose tokens were flowing on other workers: the next attempt prefills its prompt and
        the tokens sent so far and resumes after them. Beyond `migration_limit` the client gets an error event."""
        done = len(job.migrations)
        if done >= self.options.migration_limit:
            after = f"; it had moved {done} times already" if done else ""
            self._fail(job, f"the worker generating this request stopped ({why}){after}", 502)
            return
        log.warning("migrating a request after %d tokens (%s)", job.num_tokens, why)
        job.migrations.append(reason)
        self.stats.migrations[reason] += 1
        self._release(job)
        job.resumed, job.queued_at = job.num_tokens, time.monotonic()
        self._enqueue(job, front=True)

    def _retry(self, job: Job, reason: str) -> None:
        """Start the request over (before any token reached the client), or fail it after MAX_ATTEMPTS."""
        if job.attempts >= MAX_ATTEMPTS:
            self._fail(job, f"gave up after {job.attempts} attempts: {reason}", 503)
            return
        log.info("retrying request (attempt %d failed: %s)", job.attempts, reason)
        self.stats.retries += 1
        self._release(job)
        self._enqueue(job, front=True)

    def _fail(self, job: Job, message: str, status: int) -> None:
        if job.state is JobState.DONE:
            return
        self._release(job)
        job.state = JobState.DONE
        job.events.put_nowait(ErrorEvent(message, status))

    def _finish(self, job: Job) -> None:
        self.roles.observe(job, time.monotonic())
        self.jobs.pop(job.wire_id, None)
        for worker_id in (job.prefill, job.decode):
            w = self.workers.get(worker_id) if worker_id else None
            if w is not None:
                w.drop(job.wire_id)
        job.state = JobState.DONE

    def _release(self, job: Job) -> None:
        """Tell the workers holding the current attempt to drop it, and forget the attempt."""
        self.jobs.pop(job.wire_id, None)
        for worker_id in (job.prefill, job.decode):
            w = self.workers.get(worker_id) if worker_id else None
            if w is not None and w.drop(job.wire_id):
                self._send(w, Abort(job.wire_id))
        job.prefill = job.decode = None

    def _remove_worker(self, worker_id: str, why: str) -> None:
        worker = self.members.remove(worker_id)
        self.stats.workers_lost += why != "it shut down"
        level = logging.INFO if why == "it shut down" else logging.WARNING
        log.log(level, "worker %s (%s) removed: %s", worker_id, worker.role.value, why)
        self._evacuate(worker, f"stopped: {why}", "worker_lost")
        if not self.workers:
            while self.queue:
                self._fail(self.queue.popleft(), "no workers are left to serve this request", 503)

    def _evacuate(self, worker: Worker, why: str, reason: str) -> None:
        """Move every request `worker` holds elsewhere (it died, or it is drained and out of time): requests it
        decodes, or that have no token from this attempt yet, are retried or migrated (`_recover`); one whose
        prompt it computed but whose tokens flow from a decode worker already needs nothing of it."""
        for wire_id in list(worker.jobs):
            job = self.jobs.get(wire_id)
            if job is None or job.state is JobState.DONE:
                continue
            if job.decode == worker.worker_id or not job.attempt_started:
                self._recover(job, f"{worker.role.value} worker {worker.worker_id} {why}", reason)
            else:
                job.prefill = None
                worker.drop(wire_id)

    def _send(self, worker: Worker, message: ToWorker) -> None:
        try:
            self._socket.send_multipart([worker.worker_id.encode(), encode(message)], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # unroutable (gone) or its queue is full: either way it is lost to us
            asyncio.get_running_loop().call_soon(self._lost, worker.worker_id, f"unreachable ({e})")

    def _lost(self, worker_id: str, why: str) -> None:
        if worker_id in self.workers:
            self._remove_worker(worker_id, why)
            self._dispatch()

    async def _watch_loop(self) -> None:
        """Deadlines: silent or stuck workers, requests waiting too long for room."""
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            for w in list(self.workers.values()):
                silent = now - w.last_heartbeat
                if silent > self.options.heartbeat_timeout_s:
                    self._remove_worker(w.worker_id, f"no heartbeat for {silent:.1f}s")
                elif w.loop_age_s > self.options.stuck_timeout_s:
                    self._remove_worker(w.worker_id, f"its loop has not turned for {w.loop_age_s:.0f}s")
            while not self._restarts.empty():
                role = self._restarts.get()
                self.stats.worker_restarts[role] = self.stats.worker_restarts.get(role, 0) + 1
            for job in [j for j in self.queue if now - j.queued_at > self.options.queue_timeout_s]:
                self.queue.remove(job)
                self._fail(job, f"no worker had room for this request within {self.options.queue_timeout_s:.0f}s", 503)
            self._balance(now)
            self._dispatch()

    def snapshot(self) -> ClusterView:
        """Live state for /health and /metrics."""
        states = {s.value: 0 for s in JobState if s is not JobState.DONE}
        for job in self.jobs.values():
            if job.state is not JobState.DONE:
                states[job.state.value] += 1
        workers = [_describe(w) for w in self.workers.values()]
        pools = {}
        for role in Role:
            members = [w for w in workers if w.role == role.value]
            if members:
                totals = {k: sum(getattr(w, k) for w in members) for k in PoolView.__struct_fields__ if k != "workers"}
                pools[role.value] = PoolView(workers=len(members), **totals)
        switches = [RoleSwitches(a, b, n) for (a, b), n in sorted(self.roles.switches.items())]
        policy = {}
        if self.roles.policy is not None:
            behind = self.roles.policy.last_behind
            policy = dict(last_window=self.roles.last_window, last_verdict=self.roles.last_verdict,
                          behind=None if behind is None else behind.value)  # fmt: skip
        routing = RoutingView(self.stats.prefix_routed, self.stats.prefix_routed_tokens, self.stats.local_prefills,
                              self.placement.local_prefill_rule().max_tokens,
                              round(self.placement.prefill_tokens_per_s(), 1), switches,
                              **policy)  # fmt: skip
        return ClusterView(len(self.queue), states, pools, workers, dict(self.stats.worker_restarts), routing,
                           dict(self.stats.migrations))  # fmt: skip


def _describe(w: Worker) -> WorkerView:
    cache = w.cache
    return WorkerView(
        id=w.worker_id,
        role=w.role.value,
        role_reason=w.role_reason,
        switching_to=w.switch.target.value if w.switch is not None else None,
        leaving=w.leaving,
        pid=w.info.pid,
        host=w.info.host,
        num_pages=w.info.num_pages,
        free_pages=w.load.free_pages,
        running=w.load.num_running,
        waiting=w.load.num_waiting,
        pending_prefill_tokens=w.load.pending_prefill_tokens,
        jobs=len(w.jobs),
        **{f"kv_{name}": value for name, value in msgspec.structs.asdict(w.kv).items()},
        prefix_cache_queries=cache.queries,
        prefix_cache_hits=cache.hits,
        prefix_cache_evictions=cache.evictions,
        **{k: v for k, v in msgspec.structs.asdict(cache).items() if k.endswith("_pages") or k.startswith("offload")},
        speculation=w.speculation,
    )
