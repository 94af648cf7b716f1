"""`TransferAgent`: one worker's end of KV page transfers over UCX (ucxx core API), either way.

A decode worker *reserves* destination pages and hands the `Ticket` to a prefill worker through the router;
the prefill worker *sends* its pages against it; each side learns that the transfer ended, exactly once, as a
`Completion` from `poll()`, and only then may it free or reuse those pages. A transfer carries only page ids.

The agent is the two roles over one link: `receiver.Receiver` (reservations, pulls), `sender.Sender` (sends,
handshakes), `link.Link` (the UCX worker, endpoints and control channel they share). A worker holds both, as
a worker may switch roles in place. The agent routes each control message to the role it is for.

Every wait has a deadline. Without endpoint error handling (which would rule out shared memory) UCX does not
report a dead peer, so deadlines are how one is found (what each side then does: `receiver`, `sender`).
Progress is driven by the owner's loop calling `poll()`, and optionally by a native thread that sleeps until
the network wakes it (`TransferContext(progress_thread=True)`).
"""

from __future__ import annotations

import time
import uuid

import torch

from splitserve.kv_transfer.link import (
    CONTROL_TAG,
    Completion,
    IncompatiblePeerError,
    Link,
    Side,
    TransferContext,
    TransferError,
    TransferMetrics,
)
from splitserve.kv_transfer.messages import Cancel, CompatKey, Hello, HelloReply, Offer, Taken, Ticket
from splitserve.kv_transfer.receiver import Receiver
from splitserve.kv_transfer.sender import Sender

__all__ = [
    "CONTROL_TAG",
    "Completion",
    "IncompatiblePeerError",
    "Side",
    "TransferAgent",
    "TransferContext",
    "TransferError",
    "TransferMetrics",
]


class TransferAgent:
    """One worker's end of KV page transfers. Not thread-safe: one loop owns it and calls `poll()`. Its
    identity (`link.agent_id`, `link.address`, `link.key`) is the link's."""

    def __init__(
        self, pages: torch.Tensor, key: CompatKey, agent_id: str | None = None, context: TransferContext | None = None
    ):
        self.link = Link(pages, key, agent_id or uuid.uuid4().hex[:12], context or TransferContext())
        self._receiver = Receiver(self.link)
        self._sender = Sender(self.link)

    @property
    def metrics(self) -> TransferMetrics:
        return self.link.metrics

    def reserve(self, pages: list[int], timeout_s: float) -> Ticket:
        """Post receives into `pages` (in order) and return the ticket a sender needs to fill them."""
        return self._receiver.reserve(pages, timeout_s)

    def send(self, ticket: Ticket, pages: list[int], timeout_s: float, payload: bytes = b"",
             complete: bool = True) -> None:  # fmt: skip
        """Start sending `pages` (in order) into the reservation behind `ticket`; ends in a Completion.

        `payload` (a few KiB at most) reaches the receiver's Completion with the pages, and only with all of them.
        `complete` False streams the transfer: `pages` are the first ones and final, later calls with the same
        ticket give more (each a longer prefix), the last with `complete` and the payload. Over tagged messages
        each goes out as soon as its pages are final; a receiver that pulls gets one offer at the end.
        """
        self._sender.send(ticket, pages, timeout_s, payload, complete)

    def cancel(self, xid: int, receiver_id: str | None = None) -> None:
        """Give up a transfer: ours as receiver (`receiver_id` None or ours), else ours as sender to it."""
        if receiver_id in (None, self.link.agent_id):
            self._receiver.cancel(xid)
        else:
            self._sender.cancel(receiver_id, xid)

    def poll(self) -> list[Completion]:
        """Make progress on every transfer; return those that ended since the last call."""
        for message in self.link.progress():
            if isinstance(message, Hello):
                self._receiver.on_hello(message)
            elif isinstance(message, HelloReply):
                self._sender.on_hello_reply(message)
            elif isinstance(message, Cancel):  # from the other side of the transfer it names
                if message.receiver_id == self.link.agent_id:
                    self._receiver.on_cancel(message)
                else:
                    self._sender.on_cancel(message)
            elif isinstance(message, Offer):
                self._receiver.on_offer(message)
            elif isinstance(message, Taken):
                self._sender.on_taken(message)
        now = time.monotonic()
        self._receiver.poll(now)
        self._sender.poll(now)
        return self.link.take_completions()

    @property
    def num_in_flight(self) -> int:
        """Reservations, sends, control messages and drains not yet finished (0 when idle)."""
        return self._receiver.num_in_flight + self._sender.num_in_flight + self.link.num_sends

    def close(self) -> None:
        """Cancel what is in flight, drop every endpoint and mapping, and close the context: the page
        tensor, if the context allocated it, must not be touched afterwards."""
        self.link.stop()
        self._receiver.close()
        self._sender.close()
        self.link.close()
