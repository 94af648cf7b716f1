"""`PrefillWorker`: the prefill pool's side of the protocol. Queues `Prefill` jobs into the `PrefillEngine`,
ships each prompt's pages (and its first token) to the decode worker's reservation over UCX (the
reservation's last pages: the decode worker may hold the prompt's first ones in its prefix cache), frees
its own pages once the transfer ended, and tells the router with `PrefillDone`.

A prompt prefilled in chunks streams its pages: after each chunk, the pages it completed go to the transfer
agent (`send(..., complete=False)`), which sends them while the next chunk computes; the first token and the
last pages follow when the prompt is done. A stream that fails ends its prompt's prefill."""

from __future__ import annotations

import logging
from collections.abc import Callable

from splitserve.engine.kv_cache import PageAllocator
from splitserve.engine.request import EngineRequest, Request
from splitserve.errors import InvalidRequestError
from splitserve.kv_transfer.agent import Side, TransferAgent, TransferError
from splitserve.kv_transfer.messages import Ticket
from splitserve.prefill.engine import PrefillEngine
from splitserve.protocol import Abort, FirstToken, Load, Prefill, PrefillDone, ToRouter, ToWorker, encode

log = logging.getLogger(__name__)


class PrefillWorker:
    def __init__(self, engine: PrefillEngine, agent: TransferAgent, send: Callable[[ToRouter], None], kv_timeout_s):
        self.engine = engine
        self.agent = agent
        self._send = send
        self._kv_timeout_s = kv_timeout_s
        self._tickets: dict[int, Ticket] = {}  # job -> where its pages go, until its prefill ends
        self._streamed: dict[int, int] = {}  # job -> pages handed to its streamed transfer, while it prefills
        self._transfers: dict[tuple[str, int], int] = {}  # (receiver, xid) -> job, while its pages travel
        self._dropped: set[int] = set()  # jobs whose pages were freed while their stream winds down

    @property
    def allocator(self) -> PageAllocator:
        return self.engine.allocator

    def busy(self) -> bool:
        return self.engine.has_work()

    def in_flight(self) -> bool:
        return self.agent.num_in_flight > 0

    def load(self) -> Load:
        s = self.engine.scheduler
        return Load(self.allocator.num_available, len(s.running), len(s.waiting), s.pending_tokens,
                    self.engine.prefill_tokens_per_s)  # fmt: skip

    def idle(self) -> bool:
        """Nothing queued, computed or travelling: the worker may switch roles."""
        return not self.engine.has_work() and not self._tickets and not self._transfers

    def on_message(self, message: ToWorker) -> None:
        if isinstance(message, Prefill):
            try:
                self.engine.add_request(EngineRequest.of(message))
            except InvalidRequestError as e:
                self._send(PrefillDone(message.job, False, self.load(), str(e), retryable=False, invalid=True))
                return
            self._tickets[message.job] = message.ticket
        elif isinstance(message, Abort):
            if self.engine.abort(str(message.job)):
                self._drop_stream(message.job, self._tickets.pop(message.job))
                return
            for (receiver, xid), job in self._transfers.items():
                if job == message.job:  # its pages are on the way: stop them; the completion frees them
                    self.agent.cancel(xid, receiver)
                    break
        else:
            log.warning("a prefill worker got %s: ignored", type(message).__name__)

    def step(self) -> None:
        for c in self.agent.poll():
            if c.side is not Side.SEND:
                continue
            job = self._transfers.pop((c.receiver_id, c.xid))
            if job in self._dropped:  # its pages are free already, its outcome told
                self._dropped.discard(job)
            elif job in self._tickets:  # its stream ended before its prefill did: the prefill cannot deliver
                del self._tickets[job], self._streamed[job]
                self.engine.abort(str(job))
                self._send(PrefillDone(job, False, self.load(), c.error or "KV transfer ended early"))
            else:
                self.engine.release(str(job))
                self._send(PrefillDone(job, c.ok, self.load(), c.error))
        if not self.engine.has_work():
            return
        for done in self.engine.step():
            job = int(done.request.request_id)
            ticket = self._tickets.pop(job)
            if done.error is not None:  # this request alone failed; nothing of it is left here
                self._drop_stream(job, ticket)
                self._send(PrefillDone(job, False, self.load(), done.error, retryable=False))
                continue
            streamed = self._streamed.pop(job, None) is not None
            first = FirstToken(done.token_id, done.logprob, done.generator_state)
            self._transfers[(ticket.receiver_id, ticket.xid)] = job
            try:
                self.agent.send(ticket, self._pages(done.request, ticket), self._kv_timeout_s, encode(first))
            except TransferError as e:
                if streamed:  # its Completion frees the pages (UCX may be reading them) and tells the router
                    self.agent.cancel(ticket.xid, ticket.receiver_id)
                    continue
                del self._transfers[(ticket.receiver_id, ticket.xid)]
                self.engine.release(str(job))
                self._send(PrefillDone(job, False, self.load(), str(e)))
        self._stream()

    @staticmethod
    def _pages(request: Request, ticket: Ticket) -> list[int]:
        """The request's pages the ticket reserves: its last ones (the decode worker reserved pages only for
        the part of the prompt it does not hold cached)."""
        return request.pages[len(request.pages) - ticket.num_pages :]

    def _stream(self) -> None:
        """Hand each prompt still being prefilled the pages its chunks so far completed. Not where sliding-window
        layers keep rings of pages (`kv_layout`): a later chunk rewrites them, so they are final only at the end."""
        if self.engine.runner.kv_layout.has_rings:
            return
        for request in list(self.engine.scheduler.running):  # a failed send aborts its request: a copy
            job = int(request.request_id)
            ticket = self._tickets[job]
            pages = self._pages(request, ticket)
            first = len(request.pages) - ticket.num_pages  # the first reserved page's index in the request
            final = min(request.num_computed_tokens // self.engine.config.page_size - first, len(pages))
            if final <= self._streamed.get(job, 0):
                continue
            try:
                self.agent.send(ticket, pages[:final], self._kv_timeout_s, complete=False)
            except TransferError as e:
                del self._tickets[job]
                self._drop_stream(job, ticket)
                self.engine.abort(str(job))
                self._send(PrefillDone(job, False, self.load(), str(e)))
                continue
            self._streamed[job] = final
            self._transfers[(ticket.receiver_id, ticket.xid)] = job

    def _drop_stream(self, job: int, ticket: Ticket) -> None:
        """The job's pages are freed while it prefills: stop its stream, if it has one (its Completion is
        then expected and ignored)."""
        if self._streamed.pop(job, None) is not None:
            self.agent.cancel(ticket.xid, ticket.receiver_id)
            self._dropped.add(job)
