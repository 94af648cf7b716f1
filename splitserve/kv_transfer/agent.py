"""`TransferAgent`: moves KV pages between workers over UCX (ucxx core API).

Each worker wraps its page tensor in one agent. The decode side *reserves* destination pages: the agent
splits them into runs of consecutive page ids (each run is one contiguous region of the page-major
cache), posts one receive straight into each run (zero-copy) and returns a `Ticket`. The prefill side
*sends* its pages against that ticket, one of two ways (see `messages`):
- tagged: one tagged message per run, read straight from its page tensor when its own pages for that
  run are consecutive too, else gathered into a staging buffer first; then a `Done` message;
- pulled, when the receiver mapped the sender's page memory at the handshake (same host, pages in UCX
  shared memory, see `shared_memory`): an `Offer`; the receiver copies the pages itself in one pass,
  completes its posted receives with empty messages of its own, and answers `Taken`.
A transfer carries only page ids.

Tags: `xid << 20 | i + 1` for run i of transfer `xid` (numbered by the receiver, never reused),
`xid << 20` for its `Done`, and `CONTROL_TAG` for handshakes and cancels.

Every wait has a deadline, and a transfer ends exactly once, as a `Completion` from `poll()`; only then
may the caller free or reuse its pages. Without endpoint error handling (which would rule out shared
memory) UCX does not report a dead peer, so deadlines are how one is found:
- a receiver whose deadline passes *abandons* its posted receives: it completes them itself with 1-byte
  messages from its own endpoint, so no receive can later write into a freed page, and tells its
  senders to cancel; a receive already matched to a dead sender's message cannot complete at all, and
  is given up after a short grace (counted in `metrics.orphaned_receives`);
- messages for an abandoned transfer that arrive later are drained into a scratch buffer, so a live
  but late sender's sends complete too;
- a sender whose deadline passes closes its endpoint to that receiver, which cancels what is in flight.

Progress is driven by the owner's loop calling `poll()`, and optionally by a native thread that sleeps
until the network wakes it (`TransferContext(progress_thread=True)`).
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch

from splitserve.kernels.layers import gather_pages
from splitserve.kv_transfer.messages import (
    MAX_CONTROL_BYTES,
    Cancel,
    CompatKey,
    Control,
    Done,
    Hello,
    HelloReply,
    Offer,
    ProtocolError,
    Taken,
    Ticket,
    decode_control,
    decode_done,
    frame,
)
from splitserve.kv_transfer.shared_memory import RemotePages, SharedPageMemory

# ucxx sets a variable that UCX 1.21 does not know; UCX would print a warning on stdout for it.
os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
# TCP moves 1 MiB segments instead of 8 KiB ones: 4-5 GB/s on loopback instead of about 1.
os.environ.setdefault("UCX_TCP_TX_SEG_SIZE", "1M")
os.environ.setdefault("UCX_TCP_RX_SEG_SIZE", "1M")

import ucxx._lib.libucxx as ucx
from ucxx._lib.arr import Array

log = logging.getLogger(__name__)

_INDEX_BITS = 20
MAX_PAGES_PER_TRANSFER = (1 << _INDEX_BITS) - 1
CONTROL_TAG = 1 << 63
# Runs longer than this travel as several messages: several in flight pipeline better (on TCP above all).
MAX_MESSAGE_BYTES = int(os.environ.get("SPLITSERVE_KV_MAX_MESSAGE_BYTES", 1 << 20))
# The final `Done` frame, with the sender's payload (e.g. the first sampled token), fits in this.
MAX_DONE_BYTES = 16 * 1024
# How long an abandoned transfer's tags are watched for late messages to drain.
ZOMBIE_GRACE_S = 60.0
# How long an abandoned reservation waits for its receives to complete before giving them up (see below).
ABANDON_GRACE_S = 0.5
# How long a canceled send may take to wind down before its receiver is taken for dead (a dead receiver
# would otherwise hold the sender's pages until the transfer's own deadline).
CANCEL_GRACE_S = 1.0
# A receiver told to drop an offer answers within milliseconds; one silent this long is gone (its worker died),
# and the offered pages are the sender's again instead of waiting out the transfer's whole deadline.
OFFER_CANCEL_GRACE_S = 5.0


class TransferError(RuntimeError):
    """A transfer that cannot start (bad arguments, incompatible peer)."""


class IncompatiblePeerError(TransferError):
    pass


class Role(enum.Enum):
    SEND = "send"
    RECV = "recv"


@dataclass(frozen=True)
class Completion:
    """The end of one transfer, as its side saw it. Only now may that side's pages be reused."""

    role: Role
    receiver_id: str
    xid: int
    ok: bool
    error: str = ""
    payload: bytes = b""  # the sender's `payload`, delivered with the pages (receiving side, ok only)


@dataclass
class TransferMetrics:
    bytes_sent: int = 0
    bytes_received: int = 0
    transfers_sent: int = 0
    transfers_received: int = 0
    transfers_pulled: int = 0  # of those received, copied out of the sender's shared memory
    failures: int = 0
    orphaned_receives: int = 0
    malformed_messages: int = 0  # control frames dropped as undecodable
    seconds_sending: float = 0.0
    seconds_receiving: float = 0.0


def _consecutive_runs(pages: list[int], max_len: int) -> list[list[int]]:
    """Runs of consecutive pages, at most `max_len` long: [5, 6, 7, 2, 3, 9] -> [[5, 6, 7], [2, 3], [9]]"""
    runs: list[list[int]] = []
    for page in pages:
        if runs and page == runs[-1][-1] + 1 and len(runs[-1]) < max_len:
            runs[-1].append(page)
        else:
            runs.append([page])
    return runs


def _copy_pages(source: np.ndarray, src: list[int], dest: np.ndarray, dst: list[int]) -> None:
    """Copy rows `src` of `source` into rows `dst` of `dest`: one memcpy per stretch consecutive on both sides."""
    i = 0
    while i < len(src):
        j = i + 1
        while j < len(src) and src[j] == src[j - 1] + 1 and dst[j] == dst[j - 1] + 1:
            j += 1
        np.copyto(dest[dst[i] : dst[i] + j - i], source[src[i] : src[i] + j - i])
        i = j


def _page_tag(xid: int, index: int) -> ucx.UCXXTag:
    return ucx.UCXXTag((xid << _INDEX_BITS) | (index + 1))


def _done_tag(xid: int) -> ucx.UCXXTag:
    return ucx.UCXXTag(xid << _INDEX_BITS)


@dataclass(eq=False)
class _Reservation:
    xid: int
    pages: list[int]
    deadline: float
    started: float
    runs: list[list[int]] = field(default_factory=list)
    recvs: list = field(default_factory=list)
    done_buffer: np.ndarray = field(default_factory=lambda: np.zeros(MAX_DONE_BYTES, dtype=np.uint8))
    done_recv: object = None
    abandoned: str | None = None  # why we stopped waiting for the sender
    abandoned_at: float = 0.0
    pulled: bytes | None = None  # the offer's payload, once its pages are copied in

    @property
    def waiting(self) -> bool:
        """Still waiting for its pages: neither given up nor filled from an offer."""
        return self.abandoned is None and self.pulled is None


class _PeerState(enum.Enum):
    HELLO_SENT = "hello_sent"
    READY = "ready"
    FAILED = "failed"


@dataclass(eq=False)
class _Peer:
    agent_id: str
    address: bytes
    state: _PeerState
    error: str = ""
    pulls: bool = False  # the receiver copies our pages out of shared memory: send it offers


@dataclass(eq=False)
class _Outgoing:
    ticket: Ticket
    pages: list[int]
    deadline: float
    started: float
    sends: list = field(default_factory=list)
    staging: list = field(default_factory=list)  # gathered pages kept alive until their sends complete
    done_send: object = None
    done_payload: np.ndarray | None = None
    payload: bytes = b""
    canceled: str | None = None
    offered: bool = False  # an Offer is out: our pages stay untouched until Taken or the deadline


class TransferContext:
    """A process's UCX context and the page memory allocated in it. Allocate the page tensor here
    (`context.memory.zeros`) before creating the agent, so that receivers on this host can map it. The
    agent created with it owns it: closing the agent closes the context."""

    def __init__(self, progress_thread: bool = False):
        """`progress_thread`: UCX progresses transfers in a native thread that sleeps until the network
        wakes it (no polling), so pages keep flowing while the owner is busy in a long forward pass; without
        it, transfers move only when the owner calls `poll()`."""
        features = (ucx.Feature.TAG, ucx.Feature.WAKEUP) if progress_thread else (ucx.Feature.TAG,)
        self.ucx = ucx.UCXContext(feature_flags=features)
        self.progress_thread = progress_thread
        self.memory = SharedPageMemory(self.ucx.handle)

    def close(self) -> None:
        """Free the page memory (tensors over it must not be touched afterwards)."""
        self.memory.close()


class TransferAgent:
    """One worker's end of KV page transfers. Not thread-safe: one loop owns it and calls `poll()`."""

    def __init__(
        self, pages: torch.Tensor, key: CompatKey, agent_id: str | None = None, context: TransferContext | None = None
    ):
        if not pages.is_contiguous():
            raise ValueError("the page tensor must be contiguous")
        self.key = key
        self.agent_id = agent_id or uuid.uuid4().hex[:12]
        self.metrics = TransferMetrics()
        self._pages = pages.view(torch.uint8).view(pages.shape[0], -1)  # one row of bytes per page
        self.page_bytes = self._pages.shape[1]
        context = context or TransferContext()
        self._context = context
        self._shared = context.memory.describe(pages)  # None: receivers must be sent tagged pages
        self._worker = ucx.UCXWorker(context.ucx)
        self._progress_thread = context.progress_thread
        if self._progress_thread:
            self._worker.init_blocking_progress_mode()
            self._worker.start_progress_thread(polling_mode=False)
        self.address: bytes = self._worker.address.tobytes()
        self._endpoints: dict[bytes, ucx.UCXEndpoint] = {}
        self._receivers: dict[str, _Peer] = {}  # agents we send to, by id, with their handshake state
        self._senders: dict[str, bytes] = {}  # agents that said hello to us: id -> address
        self._mappings: dict[str, RemotePages] = {}  # senders whose pages we pull, by id
        self._offers: list[Offer] = []  # taken once every control message that arrived with them is handled
        self._xids = itertools.count(1)
        self._reservations: dict[int, _Reservation] = {}
        self._outgoing: dict[tuple[str, int], _Outgoing] = {}
        self._canceled_by_receiver: dict[tuple[str, int], float] = {}  # tickets canceled before send()
        self._zombies: dict[int, tuple[int, float]] = {}  # abandoned xid -> (num runs, watch until)
        # tag -> (receive draining a late message, the scratch buffer it writes into)
        self._drains: dict[int, tuple[object, np.ndarray]] = {}
        self._orphans: list = []  # receives given up on (see _poll_reservation); kept alive, never reused
        self._scratch = np.empty(0, dtype=np.uint8)  # grows to the largest run drained
        self._control_sends: list[tuple[object, np.ndarray]] = []
        self._completions: list[Completion] = []
        self._control_buffer = np.zeros(MAX_CONTROL_BYTES, dtype=np.uint8)
        self._control_recv = self._post_control_recv()

    # --- receiving side ------------------------------------------------------------------------------

    def reserve(self, pages: list[int], timeout_s: float) -> Ticket:
        """Post receives into `pages` (in order) and return the ticket a sender needs to fill them."""
        if not 0 < len(pages) <= MAX_PAGES_PER_TRANSFER:
            raise TransferError(f"a transfer holds 1 to {MAX_PAGES_PER_TRANSFER} pages, got {len(pages)}")
        now = time.monotonic()
        res = _Reservation(next(self._xids), list(pages), now + timeout_s, now)
        res.runs = _consecutive_runs(res.pages, max(1, MAX_MESSAGE_BYTES // self.page_bytes))
        for i, run in enumerate(res.runs):
            region = self._pages[run[0] : run[0] + len(run)]
            res.recvs.append(self._worker.tag_recv(self._array(region), tag=_page_tag(res.xid, i)))
        res.done_recv = self._worker.tag_recv(Array(res.done_buffer), tag=_done_tag(res.xid))
        self._reservations[res.xid] = res
        return Ticket(self.agent_id, self.address, res.xid, [len(r) for r in res.runs], self.key)

    # --- sending side --------------------------------------------------------------------------------

    def send(self, ticket: Ticket, pages: list[int], timeout_s: float, payload: bytes = b"") -> None:
        """Start sending `pages` (in order) into the reservation behind `ticket`; ends in a Completion.

        `payload` (a few KiB at most) reaches the receiver's Completion with the pages, and only with all of them.
        """
        if len(payload) > MAX_DONE_BYTES - 256:
            raise TransferError(f"a transfer's payload holds at most {MAX_DONE_BYTES - 256} bytes, got {len(payload)}")
        problem = self.key.mismatch(ticket.key)
        if problem:
            raise IncompatiblePeerError(f"receiver {ticket.receiver_id} has an incompatible KV cache: {problem}")
        if len(pages) != ticket.num_pages:
            raise TransferError(f"the ticket reserves {ticket.num_pages} pages, got {len(pages)} to send")
        slot = (ticket.receiver_id, ticket.xid)
        if slot in self._outgoing:
            raise TransferError(f"transfer {ticket.xid} to {ticket.receiver_id} is already in flight")
        now = time.monotonic()
        out = _Outgoing(ticket, list(pages), now + timeout_s, now, payload=payload)
        self._outgoing[slot] = out
        if self._canceled_by_receiver.pop(slot, None) is not None:
            self._finish_outgoing(out, "canceled by the receiver")
            return
        peer = self._receivers.get(ticket.receiver_id)
        if peer is None:
            peer = _Peer(ticket.receiver_id, ticket.address, _PeerState.HELLO_SENT)
            self._receivers[peer.agent_id] = peer
            self._send_control(ticket.address, Hello(self.agent_id, self.address, self.key, self._shared))
        if peer.state is _PeerState.READY:
            self._issue(out)
        elif peer.state is _PeerState.FAILED:
            self._finish_outgoing(out, peer.error)

    # --- either side ---------------------------------------------------------------------------------

    def cancel(self, xid: int, receiver_id: str | None = None) -> None:
        """Give up a transfer: ours as receiver (`receiver_id` None or ours), else ours as sender to it."""
        if receiver_id in (None, self.agent_id):
            res = self._reservations.get(xid)
            if res is not None and res.waiting:
                self._abandon(res, "canceled by the receiver", tell_peers=True)
            return
        out = self._outgoing.get((receiver_id, xid))
        if out is None or out.canceled:
            return
        out.canceled = "canceled by the sender"
        if out.offered:  # the receiver may be copying our pages: they are ours again once it answers
            self._send_control(out.ticket.address, Cancel(receiver_id, xid, out.canceled))
            out.deadline = min(out.deadline, time.monotonic() + OFFER_CANCEL_GRACE_S)
            return
        out.deadline = min(out.deadline, time.monotonic() + CANCEL_GRACE_S)
        if not out.sends:  # nothing issued yet: tell the receiver, which abandons its receives
            peer = self._receivers.get(receiver_id)
            if peer is not None and peer.state is _PeerState.READY:
                self._send_control(peer.address, Cancel(receiver_id, xid, out.canceled))
            self._finish_outgoing(out, out.canceled)

    def poll(self) -> list[Completion]:
        """Make progress on every transfer; return those that ended since the last call."""
        if not self._progress_thread:
            self._worker.progress()
        self._handle_control()
        now = time.monotonic()
        for res in list(self._reservations.values()):
            self._poll_reservation(res, now)
        for out in list(self._outgoing.values()):
            self._poll_outgoing(out, now)
        self._drain_zombies(now)
        self._control_sends = [(r, b) for r, b in self._control_sends if not r.completed]
        done, self._completions = self._completions, []
        return done

    @property
    def num_in_flight(self) -> int:
        """Reservations, sends, control messages and drains not yet finished (0 when idle)."""
        return len(self._reservations) + len(self._outgoing) + len(self._control_sends) + len(self._drains)

    def close(self) -> None:
        """Cancel what is in flight, drop every endpoint and mapping, and close the context: the page
        tensor, if the context allocated it, must not be touched afterwards."""
        if self._progress_thread:
            self._worker.stop_progress_thread()
        self._worker.cancel_inflight_requests()
        for mapping in self._mappings.values():
            mapping.close()
        self._mappings.clear()
        self._endpoints.clear()
        self._reservations.clear()
        self._outgoing.clear()
        self._drains.clear()
        self._control_sends.clear()
        self._context.close()

    # --- internals -----------------------------------------------------------------------------------

    def _array(self, region: torch.Tensor) -> Array:
        return Array(region if region.is_cuda else region.numpy())

    def _endpoint(self, address: bytes) -> ucx.UCXEndpoint:
        ep = self._endpoints.get(address)
        if ep is None:
            # Endpoint error handling off: with it on, UCX silently drops the shared-memory transports.
            ep = ucx.UCXEndpoint.create_from_worker_address(
                self._worker, ucx.UCXAddress.create_from_buffer(address), False
            )
            self._endpoints[address] = ep
        return ep

    def _send_control(self, address: bytes, message: Control) -> None:
        payload = np.frombuffer(frame(message), dtype=np.uint8).copy()
        req = self._endpoint(address).tag_send(Array(payload), tag=ucx.UCXXTag(CONTROL_TAG))
        self._control_sends.append((req, payload))

    def _post_control_recv(self):
        return self._worker.tag_recv(Array(self._control_buffer), tag=ucx.UCXXTag(CONTROL_TAG))

    def _handle_control(self) -> None:
        while self._control_recv.completed:
            try:
                self._control_recv.check_error()
                message = decode_control(self._control_buffer.tobytes())
            except (ProtocolError, ucx.UCXError) as e:
                message = None
                self.metrics.malformed_messages += 1
                log.warning("dropped a malformed KV-transfer control message: %s", e)
            self._control_buffer[:] = 0
            self._control_recv = self._post_control_recv()
            if message is not None:
                self._on_control(message)
        offers, self._offers = self._offers, []
        for offer in offers:
            self._take(offer)

    def _on_control(self, message: Control) -> None:
        if isinstance(message, Hello):
            problem = self.key.mismatch(message.key)
            pulls = False
            if problem is None:
                self._senders[message.agent_id] = message.address
                pulls = self._map_sender(message)
            reply = HelloReply(self.agent_id, ok=problem is None, error=problem or "", pulls=pulls)
            self._send_control(message.address, reply)
        elif isinstance(message, HelloReply):
            peer = self._receivers.get(message.agent_id)
            if peer is None or peer.state is not _PeerState.HELLO_SENT:
                return
            if message.ok:
                peer.state, peer.pulls = _PeerState.READY, message.pulls
            else:
                peer.state, peer.error = _PeerState.FAILED, f"receiver refused the handshake: {message.error}"
            for out in [o for o in self._outgoing.values() if o.ticket.receiver_id == peer.agent_id]:
                if out.sends or out.canceled:
                    continue
                if peer.state is _PeerState.READY:
                    self._issue(out)
                else:
                    self._finish_outgoing(out, peer.error)
        elif isinstance(message, Cancel):
            if message.receiver_id == self.agent_id:
                res = self._reservations.get(message.xid)
                if res is not None and res.waiting:
                    self._abandon(res, message.reason, tell_peers=False)
                return
            out = self._outgoing.get((message.receiver_id, message.xid))
            if out is None:
                self._canceled_by_receiver[(message.receiver_id, message.xid)] = time.monotonic()
            elif not out.canceled:
                out.canceled = message.reason
                if out.offered or not out.sends:  # an abandoned reservation refuses our offer
                    self._finish_outgoing(out, message.reason)
        elif isinstance(message, Offer):
            self._offers.append(message)
        elif isinstance(message, Taken):
            out = self._outgoing.get((message.receiver_id, message.xid))
            if out is None or not out.offered:
                return
            if message.ok:
                self._sent(out)
            else:
                self._finish_outgoing(out, out.canceled or message.reason)

    def _map_sender(self, hello: Hello) -> bool:
        """Map the sender's page memory if UCX can (same host, shared memory): we will pull its pages."""
        old = self._mappings.pop(hello.agent_id, None)
        if old is not None:
            old.close()
        if hello.shared is None or hello.shared.nbytes % self.page_bytes:
            return False
        mapping = RemotePages.map(self._endpoint(hello.address).handle, hello.shared)
        if mapping is None:
            return False
        self._mappings[hello.agent_id] = mapping
        return True

    def _take(self, offer: Offer) -> None:
        """Copy an offer's pages out of the sender's memory into the reservation's, if still wanted in time."""
        address = self._senders.get(offer.sender_id)
        if address is None or offer.receiver_id != self.agent_id:
            log.warning("dropped an offer from %s to %s: not a sender of ours", offer.sender_id, offer.receiver_id)
            return
        res = self._reservations.get(offer.xid)
        mapping = self._mappings.get(offer.sender_id)
        source = None if mapping is None else mapping.tensor.numpy().reshape(-1, self.page_bytes)
        if res is None or not res.waiting:
            reason = res.abandoned if res is not None and res.abandoned else "no such reservation (expired or done)"
        elif source is None:
            reason = "the sender's pages are not mapped here"
        elif len(offer.pages) != len(res.pages) or not all(0 <= p < source.shape[0] for p in offer.pages):
            reason = f"the offer's {len(offer.pages)} pages do not fit the {len(res.pages)} reserved ones"
        else:
            if time.monotonic() < offer.deadline:
                _copy_pages(source, offer.pages, self._pages.numpy(), res.pages)
            # The sender may reuse its pages once the deadline passes: a copy that ends later may hold them.
            reason = (
                "the sender's offer expired before its pages were copied" if time.monotonic() >= offer.deadline else ""
            )
        self._send_control(address, Taken(self.agent_id, offer.xid, ok=not reason, reason=reason))
        if res is None or not res.waiting:
            return
        if reason:
            self._abandon(res, reason, tell_peers=False)
        else:
            res.pulled = offer.payload
            self._complete_own_receives(res)

    def _issue(self, out: _Outgoing) -> None:
        ep = self._endpoint(out.ticket.address)
        xid = out.ticket.xid
        if self._receivers[out.ticket.receiver_id].pulls:
            offer = Offer(self.agent_id, out.ticket.receiver_id, xid, out.pages, out.deadline, out.payload)
            try:
                self._send_control(out.ticket.address, offer)
                out.offered = True
                return
            except ProtocolError:  # too many pages for one control message: send them tagged
                pass
        start = 0
        for i, length in enumerate(out.ticket.run_lengths):
            pages = out.pages[start : start + length]
            start += length
            if pages == list(range(pages[0], pages[0] + length)):
                region = self._pages[pages[0] : pages[0] + length]  # zero-copy
            else:
                region = gather_pages(self._pages, pages)  # gather, then send
                out.staging.append(region)
            out.sends.append(ep.tag_send(self._array(region), tag=_page_tag(xid, i)))

    def _poll_reservation(self, res: _Reservation, now: float) -> None:
        if res.waiting and now > res.deadline:
            self._abandon(res, f"no KV arrived within {res.deadline - res.started:.1f}s", tell_peers=True)
        pending = [r for r in (*res.recvs, res.done_recv) if not r.completed]
        if pending and not (res.abandoned is not None and now > res.abandoned_at + ABANDON_GRACE_S):
            return
        del self._reservations[res.xid]
        if res.abandoned is not None:
            # A receive already matched to a message from a sender that died cannot be cancelled: UCX
            # without endpoint error handling never completes it. The sender is gone (or was told to
            # cancel and close its endpoint), so nothing will write there: keep the request referenced
            # and let the pages go.
            self._orphans.extend(pending)
            self.metrics.orphaned_receives += len(pending)
            self._complete(Completion(Role.RECV, self.agent_id, res.xid, False, res.abandoned))
            return
        payload = res.pulled
        if payload is None:
            try:
                for r in (*res.recvs, res.done_recv):
                    r.check_error()
                done = decode_done(res.done_buffer.tobytes())
            except (ProtocolError, ucx.UCXError) as e:
                self._complete(Completion(Role.RECV, self.agent_id, res.xid, False, f"transfer failed: {e}"))
                return
            if not done.ok:
                self._complete(Completion(Role.RECV, self.agent_id, res.xid, False, done.reason))
                return
            payload = done.payload
        self.metrics.transfers_received += 1
        self.metrics.transfers_pulled += res.pulled is not None
        self.metrics.bytes_received += len(res.pages) * self.page_bytes
        self.metrics.seconds_receiving += now - res.started
        self._complete(Completion(Role.RECV, self.agent_id, res.xid, True, payload=payload))

    def _complete_own_receives(self, res: _Reservation) -> None:
        """Complete the reservation's pending receives with empty messages from our own endpoint (they
        write nothing), so that no sender's message can land in its pages any more."""
        me = self._endpoint(self.address)
        empty = np.zeros(0, dtype=np.uint8)
        for i, r in enumerate(res.recvs):
            if not r.completed:
                self._control_sends.append((me.tag_send(Array(empty), tag=_page_tag(res.xid, i)), empty))
        if not res.done_recv.completed:
            self._control_sends.append((me.tag_send(Array(empty), tag=_done_tag(res.xid)), empty))

    def _abandon(self, res: _Reservation, reason: str, tell_peers: bool) -> None:
        """Stop waiting for the sender: complete our own receives, and watch the tags for late messages."""
        res.abandoned, res.abandoned_at = reason, time.monotonic()
        self._complete_own_receives(res)
        self._zombies[res.xid] = (len(res.runs), time.monotonic() + ZOMBIE_GRACE_S)
        self._scratch = np.empty(max(self._scratch.size, max(map(len, res.runs)) * self.page_bytes), np.uint8)
        if tell_peers:  # the sender holding this ticket, if any, stops early
            for address in self._senders.values():
                self._send_control(address, Cancel(self.agent_id, res.xid, reason))

    def _drain_zombies(self, now: float) -> None:
        self._drains = {tag: d for tag, d in self._drains.items() if not d[0].completed}
        for xid, (num_runs, until) in list(self._zombies.items()):
            if now > until:
                del self._zombies[xid]
                continue
            for index in range(num_runs + 1):
                value = (xid << _INDEX_BITS) | index
                # One drain per tag at a time: a message probed again before our receive is posted
                # must not get a second receive that nothing will ever match.
                if value not in self._drains and self._worker.tag_probe(ucx.UCXXTag(value)):
                    recv = self._worker.tag_recv(Array(self._scratch), tag=ucx.UCXXTag(value))
                    self._drains[value] = (recv, self._scratch)
        for slot, when in list(self._canceled_by_receiver.items()):
            if now - when > ZOMBIE_GRACE_S:
                del self._canceled_by_receiver[slot]

    def _poll_outgoing(self, out: _Outgoing, now: float) -> None:
        if now > out.deadline:
            peer = self._receivers.get(out.ticket.receiver_id)
            if peer is not None and peer.state is _PeerState.HELLO_SENT:
                self._fail_receiver(peer.agent_id, "the receiver did not answer the handshake in time")
            else:
                took = out.deadline - out.started
                self._fail_receiver(out.ticket.receiver_id, f"the receiver did not take the KV within {took:.1f}s")
            return
        if out.offered or not out.sends or not all(s.completed for s in out.sends):
            return
        if out.done_send is None:
            errors = []
            for s in out.sends:
                try:
                    s.check_error()
                except ucx.UCXError as e:
                    errors.append(str(e))
            reason = out.canceled or (f"send failed: {errors[0]}" if errors else "")
            done = Done(ok=not reason, reason=reason, payload=b"" if reason else out.payload)
            out.done_payload = np.frombuffer(frame(done, MAX_DONE_BYTES), dtype=np.uint8).copy()
            ep = self._endpoint(out.ticket.address)
            out.done_send = ep.tag_send(Array(out.done_payload), tag=_done_tag(out.ticket.xid))
            if reason:
                out.canceled = reason
        if out.done_send.completed:
            if out.canceled:
                self._finish_outgoing(out, out.canceled)
            else:
                self._sent(out)

    def _sent(self, out: _Outgoing) -> None:
        del self._outgoing[(out.ticket.receiver_id, out.ticket.xid)]
        self.metrics.transfers_sent += 1
        self.metrics.bytes_sent += len(out.pages) * self.page_bytes
        self.metrics.seconds_sending += time.monotonic() - out.started
        self._complete(Completion(Role.SEND, out.ticket.receiver_id, out.ticket.xid, True))

    def _fail_receiver(self, receiver_id: str, reason: str) -> None:
        """A receiver that misses a deadline is taken for dead: close its endpoint, which cancels our sends
        to it (they could otherwise wait forever), and fail every transfer to it."""
        peer = self._receivers.pop(receiver_id, None)
        address = peer.address if peer is not None else None
        for out in [o for o in self._outgoing.values() if o.ticket.receiver_id == receiver_id]:
            address = out.ticket.address
            self._finish_outgoing(out, reason)
        ep = self._endpoints.pop(address, None) if address is not None else None
        if ep is not None:
            ep.close()

    def _finish_outgoing(self, out: _Outgoing, reason: str) -> None:
        self._outgoing.pop((out.ticket.receiver_id, out.ticket.xid), None)
        self._complete(Completion(Role.SEND, out.ticket.receiver_id, out.ticket.xid, False, reason))

    def _complete(self, completion: Completion) -> None:
        if not completion.ok:
            self.metrics.failures += 1
        self._completions.append(completion)
