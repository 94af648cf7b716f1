"""A worker process: loads an engine for its role, connects to the router over ZeroMQ, and loops.

Each turn of the loop takes the router's messages, makes progress on KV transfers, and runs one engine step
when there is work. Asked to switch roles (`SwitchRole`), it does so once its role holds no work: the new
role's engine takes over the old one's weights, KV cache and cached pages, and keeps its transfer agent
(peers' handshakes and mappings stay valid), so the switch costs milliseconds, not a reload.
A thread of its own sends heartbeats (who the worker is, and its latest load), so a long
forward pass does not make the worker look dead, and a dead worker goes quiet within one interval.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import torch
import zmq

from splitserve.engine.config import EngineConfig
from splitserve.model.checkpoint import model_name
from splitserve.protocol import (
    ACCEPTANCE_BUCKETS,
    CacheEvents,
    CacheStats,
    Goodbye,
    Heartbeat,
    KvStats,
    ProtocolError,
    Refused,
    Role,
    SpeculationStats,
    SwitchRole,
    TokenOut,
    Tokens,
    ToRouter,
    WorkerInfo,
    decode_to_worker,
    encode,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerOptions:
    router: str  # tcp://HOST:PORT of the router's worker socket; replicas' comma-separated, replica i i-th
    role: Role
    engine: EngineConfig
    kv_timeout_s: float = 120.0  # how long reserved pages wait for their KV (covers the prefill queue)
    heartbeat_interval_s: float = 0.25
    threads: int | None = None  # torch threads; None: torch's default


class WorkerRefused(RuntimeError):
    pass


def run_worker(options: WorkerOptions) -> None:
    """Serve until SIGTERM/SIGINT (then say goodbye) or until the router refuses this worker (raises)."""
    if options.threads:
        torch.set_num_threads(options.threads)
    outbox: list[ToRouter] = []  # what the role has to say; the loop sends it after each turn
    started = time.monotonic()
    role = _build(options, options.role, outbox.append)
    info = WorkerInfo(
        worker_id=f"{options.role.value}-{uuid.uuid4().hex[:8]}",
        role=options.role,
        model=model_name(options.engine.model),
        max_model_len=role.engine.max_model_len,
        page_size=options.engine.page_size,
        num_pages=role.allocator.capacity,
        max_num_seqs=options.engine.max_num_seqs,
        kv_key=role.engine.compat_key,
        pid=os.getpid(),
        host=socket.gethostname(),
        offload_pages=0 if role.engine.pages.offload is None else role.engine.pages.offload.capacity,
    )
    engine = role.engine.config
    print(f"splitserve {info.worker_id}: model {info.model} on {engine.torch_device} in {engine.describe_dtype()}, "
          f"{info.num_pages} KV pages of {info.page_size} tokens, ready in {time.monotonic() - started:.1f}s, "
          f"joining the router at {options.router}", flush=True)  # fmt: skip
    _Loop(options, info, role, outbox).run()


def _build(options: WorkerOptions, role: Role, send: Callable[[ToRouter], None], previous=None):
    """The role's engine and its protocol handler. `previous`: the idle handler of the role this worker is
    leaving; the new one keeps its weights, its KV cache (with its cached pages) and its transfer agent."""
    from splitserve.decode.engine import DecodeEngine
    from splitserve.decode.worker import DecodeWorker

    if role is Role.BOTH:
        return DecodeWorker(DecodeEngine(options.engine), None, send, options.kv_timeout_s)
    if options.engine.tensor_parallel > 1:
        raise ValueError(
            "--tensor-parallel above 1 is for colocated workers for now: a prefill or decode pool's "
            "ranks would each need their heads' KV moved (issue 40.3, not done yet)"
        )

    from splitserve.kernels import kv_format
    from splitserve.kv_transfer.agent import TransferAgent, TransferContext
    from splitserve.prefill.engine import PrefillEngine
    from splitserve.prefill.worker import PrefillWorker

    kind, handler = (PrefillEngine, PrefillWorker) if role is Role.PREFILL else (DecodeEngine, DecodeWorker)
    if previous is not None:
        engine = kind(options.engine, take_over=previous.engine)
        return handler(engine, previous.agent, send, options.kv_timeout_s)
    # The KV cache lives in UCX memory: a decode worker on this host maps a prefill worker's and copies pages
    # out in one pass (and a worker that switches roles keeps it, so peers' mappings stay valid).
    context = TransferContext(progress_thread=True)
    engine = kind(options.engine, context.memory.zeros)
    agent = TransferAgent(kv_format.pages(engine.runner.kv_cache), engine.compat_key, context=context)
    return handler(engine, agent, send, options.kv_timeout_s)


def routers(option: str) -> list[str]:
    """The routers' worker sockets in a `--router` value: one, or replicas' comma-separated (replica i i-th)."""
    return [address.strip() for address in option.split(",") if address.strip()]


def addressed(message: ToRouter, replicas: int) -> list[tuple[int, ToRouter]]:
    """Which routers get `message`, and what each gets: a job's messages go to the replica that issued the job
    (its ids are its index modulo the replicas: `Cluster`), a `Tokens` message split by job; the rest (heartbeats,
    cache events, goodbyes) to every router."""
    if replicas == 1:
        return [(0, message)]
    if isinstance(message, Tokens):
        parts: dict[int, list[TokenOut]] = {}
        for item in message.items:
            parts.setdefault(item.job % replicas, []).append(item)
        return [(index, msgspec.structs.replace(message, items=items)) for index, items in parts.items()]
    job = getattr(message, "job", None)
    if job is not None:
        return [(job % replicas, message)]
    return [(index, message) for index in range(replicas)]


class _Loop:
    def __init__(self, options: WorkerOptions, info: WorkerInfo, role, outbox: list[ToRouter]):
        self.options = options
        self.info = info
        self.role = role
        self.context = zmq.Context()
        self.routers = routers(options.router)
        self.sockets = [self._connect(address) for address in self.routers]
        self.outbox = outbox
        self.stopping = threading.Event()
        self.refused: str | None = None
        self.load = role.load()  # the latest snapshots, read by the heartbeat thread
        self.cache = CacheStats()
        self.speculation = SpeculationStats()
        self.loop_time = time.monotonic()
        self.malformed_messages = 0
        self.switch: SwitchRole | None = None  # asked for; done once the role has no work left

    def _connect(self, address: str) -> zmq.Socket:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.info.worker_id.encode())
        sock.setsockopt(zmq.LINGER, 1000)
        # While the router is away nothing queues for it (what a dead router's jobs produce is worth nothing),
        # and the loop never blocks on a send; ZeroMQ reconnects by itself, and the next heartbeat rejoins.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.connect(address)
        return sock

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        beat = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        beat.start()
        log.info("%s ready: %d KV pages, talking to %s", self.info.worker_id, self.info.num_pages, self.options.router)
        poller = zmq.Poller()
        for sock in self.sockets:
            poller.register(sock, zmq.POLLIN)
        try:
            while not self.stopping.is_set():
                timeout_ms = 0 if self.role.busy() else (1 if self.role.in_flight() else 20)
                for sock, _ in poller.poll(timeout_ms):
                    self._receive(sock)
                self.role.step()
                if self.switch is not None and self.role.idle():
                    self._switch_role(self.switch)
                self._tell_cache()
                self._flush()
                self.load = self.role.load()
                self.loop_time = time.monotonic()
        finally:
            self.stopping.set()
            beat.join(2)
            agent = getattr(self.role, "agent", None)
            if agent is not None:
                agent.close()
            for sock in self.sockets:
                if self.refused is None:
                    with contextlib.suppress(zmq.Again):
                        sock.send(encode(Goodbye(self.info.worker_id)), zmq.NOBLOCK)
                sock.close()
            self.context.term()
        if self.refused is not None:
            raise WorkerRefused(f"the router refused this worker: {self.refused}")

    def _switch_role(self, switch: SwitchRole) -> None:
        """Become a worker of the other pool in place: same weights, KV cache, agent and identity."""
        self.switch = None
        if switch.role is self.info.role or Role.BOTH in (switch.role, self.info.role):
            log.warning("asked to switch from %s to %s: ignored", self.info.role.value, switch.role.value)
            return
        started = time.monotonic()
        self.role = _build(self.options, switch.role, self.outbox.append, previous=self.role)
        self.info = msgspec.structs.replace(self.info, role=switch.role)  # the next heartbeat announces it
        self.load = self.role.load()
        print(f"splitserve {self.info.worker_id}: now a {switch.role.value} worker ({switch.reason}), switched in "
              f"{(time.monotonic() - started) * 1000:.0f} ms", flush=True)  # fmt: skip

    def _tell_cache(self) -> None:
        """What the prefix cache gained and lost goes to the router (it routes by it); counters to heartbeats."""
        allocator = self.role.allocator
        stored, removed = allocator.events.drain()
        if stored or removed:
            self.outbox.append(CacheEvents(stored, removed))
        stats = allocator.stats
        offload = self.role.engine.pages.offload
        tier = {} if offload is None else dict(
            offloaded_pages=offload.num_pages, offload_pages_stored=offload.stats.stored,
            offload_pages_loaded=offload.stats.loaded, offload_bytes_written=offload.stats.bytes_written,
            offload_bytes_read=offload.stats.bytes_read, offload_seconds_writing=offload.stats.seconds_writing,
            offload_seconds_reading=offload.stats.seconds_reading)  # fmt: skip
        self.cache = CacheStats(stats.queries, stats.hits, stats.evictions, allocator.num_cached,
                                allocator.num_retained, **tier)  # fmt: skip
        speculator = getattr(self.role.engine, "speculator", None)
        if speculator is not None:
            s = speculator.stats
            acceptance = [s.acceptance[bound] for bound in ACCEPTANCE_BUCKETS]
            self.speculation = SpeculationStats(speculator.method, s.drafted, s.accepted, s.steps, acceptance)

    def _flush(self) -> None:
        dropped = 0
        for message in self.outbox:
            for index, part in addressed(message, len(self.sockets)):
                try:
                    self.sockets[index].send(encode(part), zmq.NOBLOCK)
                except zmq.Again:
                    dropped += 1
        if dropped:
            log.warning("the router is unreachable: dropped %d message(s) for it", dropped)
        self.outbox.clear()

    def _receive(self, sock: zmq.Socket) -> None:
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = decode_to_worker(frame)
            except ProtocolError as e:
                self.malformed_messages += 1
                log.warning("dropped a malformed message from the router: %s", e)
                continue
            if isinstance(message, Refused):
                self.refused = message.reason
                self.stopping.set()
                return
            if isinstance(message, SwitchRole):
                self.switch = message
                continue
            self.role.on_message(message)

    def _heartbeats(self) -> None:
        socks = []
        for address in self.routers:  # every router learns the worker's load, cache and role from the worker
            sock = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # no stale heartbeats piling up while the router is away
            sock.setsockopt(zmq.SNDHWM, 4)
            sock.connect(address)
            socks.append(sock)
        try:
            while not self.stopping.wait(self.options.heartbeat_interval_s):
                agent = getattr(self.role, "agent", None)
                m = agent.metrics if agent is not None else None
                kv = (
                    KvStats()
                    if m is None
                    else KvStats(
                        m.bytes_sent,
                        m.bytes_received,
                        m.seconds_sending,
                        m.seconds_receiving,
                        m.failures,
                        m.transfers_pulled,
                        m.checksum_failures,
                        m.messages_streamed,
                    )
                )
                age = time.monotonic() - self.loop_time
                beat = encode(Heartbeat(self.info, self.load, kv, age, self.cache, self.speculation))
                for sock in socks:
                    with contextlib.suppress(zmq.Again):  # a router is away: keep trying until it is back
                        sock.send(beat, zmq.NOBLOCK)
        finally:
            for sock in socks:
                sock.close()
