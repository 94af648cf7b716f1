"""The sending side of KV transfers (a prefill worker's): sends against tickets, and the receivers' handshakes.

`send` fills the reservation behind a `Ticket`. The first transfer to a receiver says `Hello` (our key and,
when our pages are in UCX shared memory, where they are); its `HelloReply` says whether it will pull. Then
each transfer goes one of two ways (see `messages`):
- tagged: the few large messages the ticket names (`link.message_sizes`), each read straight from the page
  tensor when its pages are consecutive here, else gathered into a staging buffer first; then a `Done` with
  the payload. A transfer may be *streamed*: sent while its pages are still being computed (`complete=False`:
  the pages given so far are final, more follow in later calls), each message as soon as all its pages are
  final, so that the link works while the prefill computes the prompt's next chunk;
- pulled: an `Offer` naming our pages; they stay untouched until the receiver answers `Taken` or the
  offer's deadline passes. A streamed transfer is offered once complete (a copy in shared memory takes
  milliseconds: nothing to overlap).

A receiver that misses a deadline is taken for dead: we close our endpoint to it, which cancels what is in
flight (UCX without endpoint error handling would never report it), and fail every transfer to it.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from splitserve.kernels.layers import copy_pages
from splitserve.kv_transfer.link import (
    MAX_DONE_BYTES,
    ZOMBIE_GRACE_S,
    Array,
    Completion,
    IncompatiblePeerError,
    Link,
    Side,
    TransferError,
    copies_done,
    done_tag,
    page_digest,
    page_region,
    page_tag,
    ucx,
)
from splitserve.kv_transfer.messages import (
    Cancel,
    Done,
    Hello,
    HelloReply,
    Offer,
    ProtocolError,
    Taken,
    Ticket,
    frame,
)

# How long a canceled send may take to wind down before its receiver is taken for dead (a dead receiver
# would otherwise hold the sender's pages until the transfer's own deadline).
CANCEL_GRACE_S = 1.0
# A receiver told to drop an offer answers within milliseconds; one silent this long is gone (its worker died),
# and the offered pages are the sender's again instead of waiting out the transfer's whole deadline.
OFFER_CANCEL_GRACE_S = 5.0


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
    """One transfer as its sender sees it, from `send` until its Completion."""

    ticket: Ticket
    pages: list[int]
    deadline: float
    started: float
    sends: list = field(default_factory=list)
    staging: list = field(default_factory=list)  # gathered pages: kept alive until their sends complete
    done_send: object = None
    done_payload: np.ndarray | None = None
    payload: bytes = b""
    canceled: str | None = None
    offered: bool = False  # an Offer is out: our pages stay untouched until Taken or the deadline
    complete: bool = True  # every page is final and the payload known (a streamed transfer: from its last call)
    issued: int = 0  # tagged messages posted, in the ticket's order
    posted: float | None = None  # when its first message (or its offer) went out: the link's time starts

    @property
    def slot(self) -> tuple[str, int]:
        return self.ticket.receiver_id, self.ticket.xid


class Sender:
    def __init__(self, link: Link):
        self._link = link
        self._receivers: dict[str, _Peer] = {}  # agents we send to, by id, with their handshake state
        self._outgoing: dict[tuple[str, int], _Outgoing] = {}  # by (receiver id, xid)
        self._canceled_early: dict[tuple[str, int], float] = {}  # tickets their receiver canceled before send()

    def send(self, ticket: Ticket, pages: list[int], timeout_s: float, payload: bytes = b"",
             complete: bool = True) -> None:  # fmt: skip
        """Send `pages` (in order) into the reservation behind `ticket`; ends in a Completion. With `complete`
        False the transfer is streamed: `pages` are the first ones, final; later calls with the same ticket
        give a longer prefix, the last one (`complete`) all of them and the payload."""
        link = self._link
        if len(payload) > MAX_DONE_BYTES - 256:
            raise TransferError(f"a transfer's payload holds at most {MAX_DONE_BYTES - 256} bytes, got {len(payload)}")
        problem = link.key.mismatch(ticket.key)
        if problem:
            raise IncompatiblePeerError(f"receiver {ticket.receiver_id} has an incompatible KV cache: {problem}")
        if len(pages) > ticket.num_pages or (complete and len(pages) != ticket.num_pages):
            raise TransferError(f"the ticket reserves {ticket.num_pages} pages, got {len(pages)} to send")
        now = time.monotonic()
        streamed = self._outgoing.get((ticket.receiver_id, ticket.xid))
        if streamed is not None and not streamed.complete:
            self._extend(streamed, pages, now + timeout_s, payload, complete)
            return
        out = _Outgoing(ticket, list(pages), now + timeout_s, now, payload=payload, complete=complete)
        if out.slot in self._outgoing:
            raise TransferError(f"transfer {ticket.xid} to {ticket.receiver_id} is already in flight")
        self._outgoing[out.slot] = out
        if self._canceled_early.pop(out.slot, None) is not None:
            self._fail(out, "canceled by the receiver")
            return
        peer = self._receivers.get(ticket.receiver_id)
        if peer is None:
            peer = _Peer(ticket.receiver_id, ticket.address, _PeerState.HELLO_SENT)
            hello = Hello(link.agent_id, link.address, link.key, link.shared, link.device_pages)
            if not link.send_control(ticket.address, hello):
                self._fail(out, f"receiver {ticket.receiver_id} is unreachable (it may have died)")
                return
            self._receivers[peer.agent_id] = peer
        if peer.state is _PeerState.READY:
            self._issue(out)
        elif peer.state is _PeerState.FAILED:
            self._fail(out, peer.error)

    def _extend(self, out: _Outgoing, pages: list[int], deadline: float, payload: bytes, complete: bool) -> None:
        """A streamed transfer's next call: more final pages (a longer prefix), and at last the payload."""
        if list(pages[: len(out.pages)]) != out.pages:  # (a shorter list differs too)
            raise TransferError(f"transfer {out.ticket.xid}: pages must extend those already given")
        if out.canceled:  # winding down: it ends in its Completion
            return
        out.pages, out.deadline = list(pages), deadline
        if complete:
            out.complete, out.payload = True, payload
        peer = self._receivers.get(out.ticket.receiver_id)
        if peer is not None and peer.state is _PeerState.READY:
            self._issue(out)

    def cancel(self, receiver_id: str, xid: int) -> None:
        out = self._outgoing.get((receiver_id, xid))
        if out is None or out.canceled:
            return
        out.canceled = "canceled by the sender"
        if out.offered:  # the receiver may be copying our pages: they are ours again once it answers
            self._link.send_control(out.ticket.address, Cancel(receiver_id, xid, out.canceled))
            out.deadline = min(out.deadline, time.monotonic() + OFFER_CANCEL_GRACE_S)
            return
        out.deadline = min(out.deadline, time.monotonic() + CANCEL_GRACE_S)
        if not out.sends:  # nothing issued yet: tell the receiver, which abandons its receives
            peer = self._receivers.get(receiver_id)
            if peer is not None and peer.state is _PeerState.READY:
                self._link.send_control(peer.address, Cancel(receiver_id, xid, out.canceled))
            self._fail(out, out.canceled)

    def on_hello_reply(self, reply: HelloReply) -> None:
        peer = self._receivers.get(reply.agent_id)
        if peer is None or peer.state is not _PeerState.HELLO_SENT:
            return
        if reply.ok:
            peer.state, peer.pulls = _PeerState.READY, reply.pulls
        else:
            peer.state, peer.error = _PeerState.FAILED, f"receiver refused the handshake: {reply.error}"
        for out in [o for o in self._outgoing.values() if o.ticket.receiver_id == peer.agent_id]:
            if out.sends or out.canceled or out.offered:
                continue
            if peer.state is _PeerState.READY:
                self._issue(out)
            else:
                self._fail(out, peer.error)

    def on_cancel(self, cancel: Cancel) -> None:
        """The receiver abandoned its reservation (possibly before we were given its ticket)."""
        slot = (cancel.receiver_id, cancel.xid)
        out = self._outgoing.get(slot)
        if out is None:
            self._canceled_early[slot] = time.monotonic()
        elif not out.canceled:
            out.canceled = cancel.reason
            if out.offered or not out.sends:  # an abandoned reservation refuses our offer
                self._fail(out, cancel.reason)

    def on_taken(self, taken: Taken) -> None:
        out = self._outgoing.get((taken.receiver_id, taken.xid))
        if out is None or not out.offered:
            return
        if taken.ok:
            self._sent(out)
        else:
            self._fail(out, out.canceled or taken.reason)

    def poll(self, now: float) -> None:
        for out in list(self._outgoing.values()):
            self._poll_outgoing(out, now)
        for slot, when in list(self._canceled_early.items()):
            if now - when > ZOMBIE_GRACE_S:
                del self._canceled_early[slot]

    @property
    def num_in_flight(self) -> int:
        return len(self._outgoing)

    def close(self) -> None:
        self._outgoing.clear()

    def _issue(self, out: _Outgoing) -> None:
        """Post what can go now: an offer once complete (to a receiver that pulls), else the tagged messages
        whose pages are all final and not yet posted."""
        link = self._link
        xid = out.ticket.xid
        if self._receivers[out.ticket.receiver_id].pulls and not out.sends:
            if not out.complete:
                return
            offer = Offer(link.agent_id, out.ticket.receiver_id, xid, out.pages, out.deadline, out.payload,
                          page_digest(link.pages, out.pages, link.key.page_layers))  # fmt: skip
            if link.pages.is_cuda:  # the pages' writes, on this process's streams, end before the peer reads them
                torch.cuda.synchronize(link.pages.device)
            try:
                link.send_control(out.ticket.address, offer)
                out.offered, out.posted = True, time.monotonic()
                return
            except ProtocolError:  # too many pages for one control message: send them tagged
                pass
        ep = link.endpoint(out.ticket.address)
        sizes = out.ticket.message_pages
        start = sum(sizes[: out.issued])
        regions, staged = [], False
        for length in sizes[out.issued :]:
            if start + length > len(out.pages):
                break  # not all final yet
            pages = out.pages[start : start + length]
            start += length
            region = page_region(link.pages, pages)
            if region is None:
                region = link.staging.take(length)
                copy_pages(link.pages, pages, region, list(range(length)))
                out.staging.append(region)
                staged = True
            regions.append(region)
        if staged:
            copies_done(link.pages)  # the gathers are written before UCX reads them
        if regions and out.posted is None:
            out.posted = time.monotonic()
        for region in regions:
            out.sends.append(ep.tag_send(link.array(region), tag=page_tag(xid, out.issued)))
            out.issued += 1
        link.metrics.messages_sent += len(regions)
        link.metrics.messages_streamed += 0 if out.complete else len(regions)

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
        if not out.canceled and (not out.complete or out.issued < len(out.ticket.message_pages)):
            return  # streamed: more messages to come
        if out.done_send is None:
            errors = []
            for s in out.sends:
                try:
                    s.check_error()
                except ucx.UCXError as e:
                    errors.append(str(e))
            reason = out.canceled or (f"send failed: {errors[0]}" if errors else "")
            done = Done(ok=False, reason=reason) if reason else Done(ok=True, payload=out.payload, **self._check(out))
            out.done_payload = np.frombuffer(frame(done, MAX_DONE_BYTES), dtype=np.uint8).copy()
            ep = self._link.endpoint(out.ticket.address)
            out.done_send = ep.tag_send(Array(out.done_payload), tag=done_tag(out.ticket.xid))
            if reason:
                out.canceled = reason
        if out.done_send.completed:
            if out.canceled:
                self._fail(out, out.canceled)
            else:
                self._sent(out)

    def _check(self, out: _Outgoing) -> dict:
        """What the receiver checks the pages against: their byte count and digest (as they are in our pages,
        which stay untouched until the transfer ends)."""
        link = self._link
        return {
            "nbytes": len(out.pages) * link.page_bytes,
            "digest": page_digest(link.pages, out.pages, link.key.page_layers),
        }

    def _sent(self, out: _Outgoing) -> None:
        link = self._link
        del self._outgoing[out.slot]
        for staged in out.staging:  # every send completed: nothing reads them any more
            link.staging.give(staged)
        link.metrics.transfers_sent += 1
        link.metrics.bytes_sent += len(out.pages) * link.page_bytes
        link.metrics.seconds_sending += time.monotonic() - (out.posted or out.started)
        link.complete(Completion(Side.SEND, out.ticket.receiver_id, out.ticket.xid, True))

    def _fail_receiver(self, receiver_id: str, reason: str) -> None:
        """Close our endpoint to a receiver taken for dead, which cancels our sends to it (they could otherwise
        wait forever), and fail every transfer to it."""
        peer = self._receivers.pop(receiver_id, None)
        address = peer.address if peer is not None else None
        for out in [o for o in self._outgoing.values() if o.ticket.receiver_id == receiver_id]:
            address = out.ticket.address
            self._fail(out, reason)
        if address is not None:
            self._link.close_endpoint(address)

    def _fail(self, out: _Outgoing, reason: str) -> None:
        self._outgoing.pop(out.slot, None)
        self._link.complete(Completion(Side.SEND, out.ticket.receiver_id, out.ticket.xid, False, reason))
