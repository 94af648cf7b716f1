"""The receiving side of KV transfers (a decode worker's): reservations, and the senders it pulls pages from.

`reserve` splits the destination pages into a few large messages (`link.message_sizes`), posts one receive
for each (straight into its pages where they are consecutive, else into a staging buffer whose pages are
scattered into place once the transfer is whole) and returns the `Ticket` a sender needs. A page is filled by
one transfer at a time: `reserve` refuses a page that a reservation not yet ended holds. The pages arrive
one of two ways (see `messages`): as tagged messages into those receives and then a `Done`; or, from a
sender whose page memory we mapped at its `Hello` (same host), as an `Offer` whose pages we copy ourselves
in one pass, completing our posted receives with empty messages of our own, and answer `Taken`.

A reservation whose deadline passes (or that its owner cancels) is *abandoned*: we complete its posted
receives ourselves with empty messages, so that no receive can later write into a freed page, and tell the
senders to cancel. A receive already matched to a dead sender's message cannot complete at all: it is given
up after a short grace (`metrics.orphaned_receives`). Messages for an abandoned reservation that arrive
later are drained into a scratch buffer, so that a live but late sender's sends complete too.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from splitserve.kernels.layers import copy_pages
from splitserve.kv_transfer.link import (
    MAX_DONE_BYTES,
    MAX_PAGES_PER_TRANSFER,
    ZOMBIE_GRACE_S,
    Array,
    Completion,
    FaultInjector,
    Link,
    Side,
    TransferError,
    copies_done,
    done_tag,
    message_sizes,
    page_digest,
    page_region,
    page_tag,
    page_tag_value,
    ucx,
)
from splitserve.kv_transfer.messages import (
    Cancel,
    Hello,
    HelloReply,
    Offer,
    ProtocolError,
    Taken,
    Ticket,
    decode_done,
)
from splitserve.kv_transfer.shared_memory import RemotePages

log = logging.getLogger(__name__)

# How long an abandoned reservation waits for its receives to complete before giving them up.
ABANDON_GRACE_S = 0.5


@dataclass(eq=False)
class _Reservation:
    """One transfer as its receiver sees it, from `reserve` until its tags stop being watched."""

    xid: int
    pages: list[int]
    deadline: float
    started: float
    messages: list[list[int]] = field(default_factory=list)  # the pages of each message, in order
    staged: dict[int, torch.Tensor] = field(default_factory=dict)  # message -> its buffer, where not in place
    recvs: list = field(default_factory=list)
    done_buffer: np.ndarray = field(default_factory=lambda: np.zeros(MAX_DONE_BYTES, dtype=np.uint8))
    done_recv: object = None
    abandoned: str | None = None  # why we stopped waiting for the sender
    abandoned_at: float = 0.0
    pulled: bytes | None = None  # the offer's payload, once its pages are copied in
    # Abandoned: its tags are watched for late messages until `watch_until`; each one found is drained by
    # a receive into a scratch buffer (by tag value: the receive and the buffer it writes into).
    watch_until: float = 0.0
    drains: dict[int, tuple[object, np.ndarray]] = field(default_factory=dict)

    @property
    def waiting(self) -> bool:
        """Still waiting for its pages: neither given up nor filled from an offer."""
        return self.abandoned is None and self.pulled is None


class Receiver:
    def __init__(self, link: Link):
        self._link = link
        self._senders: dict[str, bytes] = {}  # agents that said hello to us: id -> address
        self._mappings: dict[str, RemotePages] = {}  # senders whose pages we pull, by id
        self._offers: list[Offer] = []  # taken once every control message that arrived with them is handled
        self._xids = itertools.count(1)
        self._reservations: dict[int, _Reservation] = {}  # not ended
        self._reserved: dict[int, int] = {}  # page -> the xid of the reservation not ended that holds it
        self._watched: dict[int, _Reservation] = {}  # abandoned: late messages for them are drained
        self._orphans: list = []  # receives given up on (see `_poll_reservation`); kept alive, never reused
        self._scratch = np.empty(0, dtype=np.uint8)  # grows to the largest run drained
        self._faults = FaultInjector(os.environ.get("SPLITSERVE_KV_FAULT"))

    def reserve(self, pages: list[int], timeout_s: float) -> Ticket:
        """Post receives into `pages` (in order) and return the ticket a sender needs to fill them."""
        if not 0 < len(pages) <= MAX_PAGES_PER_TRANSFER:
            raise TransferError(f"a transfer holds 1 to {MAX_PAGES_PER_TRANSFER} pages, got {len(pages)}")
        self._check_unreserved(pages)
        link = self._link
        now = time.monotonic()
        res = _Reservation(next(self._xids), list(pages), now + timeout_s, now)
        self._reserved.update(dict.fromkeys(res.pages, res.xid))
        start = 0
        for i, size in enumerate(message_sizes(len(pages), link.page_bytes)):
            dest = res.pages[start : start + size]
            start += size
            region = page_region(link.pages, dest)
            if region is None:
                region = res.staged[i] = link.staging.take(size)
            res.messages.append(dest)
            res.recvs.append(link.worker.tag_recv(link.array(region), tag=page_tag(res.xid, i)))
        res.done_recv = link.worker.tag_recv(Array(res.done_buffer), tag=done_tag(res.xid))
        self._reservations[res.xid] = res
        return Ticket(link.agent_id, link.address, res.xid, list(map(len, res.messages)), link.key)

    def _check_unreserved(self, pages: list[int]) -> None:
        """A page is filled by one transfer at a time: two in flight into the same page would race (the later
        one's messages can land between the earlier one's arrival and its check, which then fails, or after
        it, which corrupts pages already handed to the engine)."""
        if len(set(pages)) != len(pages):
            raise TransferError("a reservation names a page twice")
        for page in pages:
            if page in self._reserved:
                raise TransferError(f"page {page} is already being filled by transfer {self._reserved[page]}")

    def cancel(self, xid: int) -> None:
        res = self._reservations.get(xid)
        if res is not None and res.waiting:
            self._abandon(res, "canceled by the receiver", tell_peers=True)

    def on_hello(self, hello: Hello) -> None:
        problem = self._link.key.mismatch(hello.key)
        pulls = False
        if problem is None:
            self._senders[hello.agent_id] = hello.address
            pulls = self._map_sender(hello)
        reply = HelloReply(self._link.agent_id, ok=problem is None, error=problem or "", pulls=pulls)
        self._link.send_control(hello.address, reply)

    def on_cancel(self, cancel: Cancel) -> None:
        """The sender gave up the transfer."""
        res = self._reservations.get(cancel.xid)
        if res is not None and res.waiting:
            self._abandon(res, cancel.reason, tell_peers=False)

    def on_offer(self, offer: Offer) -> None:
        self._offers.append(offer)

    def poll(self, now: float) -> None:
        offers, self._offers = self._offers, []
        for offer in offers:
            self._take(offer)
        for res in list(self._reservations.values()):
            self._poll_reservation(res, now)
        self._drain_late_messages(now)

    @property
    def num_in_flight(self) -> int:
        """Reservations not ended, and receives draining late messages."""
        return len(self._reservations) + sum(len(res.drains) for res in self._watched.values())

    def close(self) -> None:
        for mapping in self._mappings.values():
            mapping.close()
        self._mappings.clear()
        self._reservations.clear()
        self._reserved.clear()
        self._watched.clear()

    def _map_sender(self, hello: Hello) -> bool:
        """Map the sender's page memory if UCX can (same host, shared memory): we will pull its pages."""
        old = self._mappings.pop(hello.agent_id, None)
        if old is not None:
            old.close()
        if hello.device is not None and hello.device.nbytes % self._link.page_bytes == 0:
            mapping = RemotePages.open_device(hello.device)  # CUDA pages, same host: copied device to device
        elif hello.shared is None or hello.shared.nbytes % self._link.page_bytes:
            return False
        else:
            mapping = RemotePages.map(self._link.endpoint(hello.address).handle, hello.shared)
        if mapping is None:
            return False
        self._mappings[hello.agent_id] = mapping
        return True

    def _take(self, offer: Offer) -> None:
        """Copy an offer's pages out of the sender's memory into the reservation's, if still wanted in time."""
        link = self._link
        address = self._senders.get(offer.sender_id)
        if address is None or offer.receiver_id != link.agent_id:
            log.warning("dropped an offer from %s to %s: not a sender of ours", offer.sender_id, offer.receiver_id)
            return
        res = self._reservations.get(offer.xid)
        mapping = self._mappings.get(offer.sender_id)
        source = None if mapping is None else mapping.tensor.view(-1, link.page_bytes)
        if res is None or not res.waiting:
            reason = res.abandoned if res is not None and res.abandoned else "no such reservation (expired or done)"
        elif source is None:
            reason = "the sender's pages are not mapped here"
        elif len(offer.pages) != len(res.pages) or not all(0 <= p < source.shape[0] for p in offer.pages):
            reason = f"the offer's {len(offer.pages)} pages do not fit the {len(res.pages)} reserved ones"
        else:
            reason = ""
            if time.monotonic() < offer.deadline:
                copy_pages(source, offer.pages, link.pages, res.pages)
                if source.is_cuda or link.pages.is_cuda:  # done before `Taken` lets the sender reuse its pages
                    torch.cuda.synchronize(source.device if source.is_cuda else link.pages.device)
                reason = self._verify(res, None, offer.digest)
            # The sender may reuse its pages once the deadline passes: a copy that ends later may hold them.
            if time.monotonic() >= offer.deadline:
                reason = "the sender's offer expired before its pages were copied"
        link.send_control(address, Taken(link.agent_id, offer.xid, ok=not reason, reason=reason))
        if res is None or not res.waiting:
            return
        if reason:
            self._abandon(res, reason, tell_peers=False)
        else:
            res.pulled = offer.payload
            self._complete_own_receives(res)

    def _poll_reservation(self, res: _Reservation, now: float) -> None:
        link = self._link
        if res.waiting and now > res.deadline:
            self._abandon(res, f"no KV arrived within {res.deadline - res.started:.1f}s", tell_peers=True)
        pending = [r for r in (*res.recvs, res.done_recv) if not r.completed]
        if pending and not (res.abandoned is not None and now > res.abandoned_at + ABANDON_GRACE_S):
            return
        del self._reservations[res.xid]
        for page in res.pages:
            del self._reserved[page]
        try:
            self._end(res, pending, now)
        finally:
            if not pending:  # nothing writes into the staging buffers any more
                for staged in res.staged.values():
                    link.staging.give(staged)

    def _end(self, res: _Reservation, pending: list, now: float) -> None:
        """Report the end of a reservation whose receives all completed (or, abandoned, were given up)."""
        link = self._link
        if res.abandoned is not None:
            # A receive already matched to a message from a sender that died cannot be cancelled: UCX
            # without endpoint error handling never completes it. The sender is gone (or was told to
            # cancel and close its endpoint), so nothing will write there: keep the request (and the
            # staging buffer it may write into) referenced and let the pages go.
            self._orphans.extend([*pending, *res.staged.values()])
            link.metrics.orphaned_receives += len(pending)
            link.complete(Completion(Side.RECV, link.agent_id, res.xid, False, res.abandoned))
            return
        payload = res.pulled
        if payload is None:
            try:
                for r in (*res.recvs, res.done_recv):
                    r.check_error()
                done = decode_done(res.done_buffer.tobytes())
            except (ProtocolError, ucx.UCXError) as e:
                link.complete(Completion(Side.RECV, link.agent_id, res.xid, False, f"transfer failed: {e}"))
                return
            if not done.ok:
                link.complete(Completion(Side.RECV, link.agent_id, res.xid, False, done.reason))
                return
            payload = done.payload
            for i, staged in res.staged.items():  # the transfer is whole: its staged pages go into place
                copy_pages(staged, list(range(len(staged))), link.pages, res.messages[i])
            if res.staged:
                copies_done(link.pages)  # read out before the buffers are reused
            problem = self._verify(res, done.nbytes, done.digest)
            if problem:
                link.complete(Completion(Side.RECV, link.agent_id, res.xid, False, problem))
                return
        link.metrics.transfers_received += 1
        link.metrics.transfers_pulled += res.pulled is not None
        link.metrics.bytes_received += len(res.pages) * link.page_bytes
        link.metrics.seconds_receiving += now - res.started
        link.complete(Completion(Side.RECV, link.agent_id, res.xid, True, payload=payload))

    def _verify(self, res: _Reservation, nbytes: int | None, digest: bytes) -> str:
        """Why the reservation's pages, now in place, are not what the sender sent (its byte count, where it
        says, and its `page_digest`), or "" when they are."""
        link = self._link
        self._faults.damage(link.pages, res.pages)
        expected = len(res.pages) * link.page_bytes
        problem = ""
        if nbytes is not None and nbytes != expected:
            problem = f"the sender sent {nbytes} bytes into {expected} reserved"
        elif digest != page_digest(link.pages, res.pages, link.key.page_layers):
            problem = "the KV pages that arrived do not match the sender's checksum"
        link.metrics.checksum_failures += bool(problem)
        return problem

    def _complete_own_receives(self, res: _Reservation) -> None:
        """Complete the reservation's pending receives with empty messages from our own endpoint (they
        write nothing), so that no sender's message can land in its pages any more."""
        for i, r in enumerate(res.recvs):
            if not r.completed:
                self._link.send_empty_to_self(page_tag(res.xid, i))
        if not res.done_recv.completed:
            self._link.send_empty_to_self(done_tag(res.xid))

    def _abandon(self, res: _Reservation, reason: str, tell_peers: bool) -> None:
        """Stop waiting for the sender: complete our own receives, and watch the tags for late messages."""
        res.abandoned, res.abandoned_at = reason, time.monotonic()
        self._complete_own_receives(res)
        res.watch_until = res.abandoned_at + ZOMBIE_GRACE_S
        self._watched[res.xid] = res
        longest = max(map(len, res.messages)) * self._link.page_bytes
        self._scratch = np.empty(max(self._scratch.size, longest), np.uint8)
        if tell_peers:  # the sender holding this ticket, if any, stops early
            for address in self._senders.values():
                self._link.send_control(address, Cancel(self._link.agent_id, res.xid, reason))

    def _drain_late_messages(self, now: float) -> None:
        worker = self._link.worker
        for res in list(self._watched.values()):
            res.drains = {tag: d for tag, d in res.drains.items() if not d[0].completed}
            if now > res.watch_until:
                if not res.drains:
                    del self._watched[res.xid]
                continue
            for index in range(len(res.messages) + 1):
                value = page_tag_value(res.xid, index)
                # One drain per tag at a time: a message probed again before our receive is posted
                # must not get a second receive that nothing will ever match.
                if value not in res.drains and worker.tag_probe(ucx.UCXXTag(value)):
                    recv = worker.tag_recv(Array(self._scratch), tag=ucx.UCXXTag(value))
                    res.drains[value] = (recv, self._scratch)
