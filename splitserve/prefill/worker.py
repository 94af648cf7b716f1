"""`PrefillWorker`: the prefill pool's side of the protocol. Queues `Prefill` jobs into the `PrefillEngine`,
ships each finished prompt's pages (and its first token) to the decode worker's reservation over UCX (the
reservation's last pages: the decode worker may hold the prompt's first ones in its prefix cache), frees
its own pages once the transfer ended, and tells the router with `PrefillDone`."""

from __future__ import annotations

import logging
from collections.abc import Callable

from splitserve.engine.kv_cache import PageAllocator
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
        self._tickets: dict[int, Ticket] = {}  # job -> where its pages go
        self._transfers: dict[tuple[str, int], int] = {}  # (receiver, xid) -> job, while its pages travel

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
                self.engine.add_request(str(message.job), message.prompt_token_ids, message.params, message.cache_key,
                                        message.output_token_ids)  # fmt: skip
            except InvalidRequestError as e:
                self._send(PrefillDone(message.job, False, self.load(), str(e), retryable=False, invalid=True))
                return
            self._tickets[message.job] = message.ticket
        elif isinstance(message, Abort):
            if self.engine.abort(str(message.job)):
                del self._tickets[message.job]
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
            self.engine.release(str(job))
            self._send(PrefillDone(job, c.ok, self.load(), c.error))
        if not self.engine.has_work():
            return
        for done in self.engine.step():
            job = int(done.request.request_id)
            ticket = self._tickets.pop(job)
            if done.error is not None:  # this request alone failed; nothing of it is left here
                self._send(PrefillDone(job, False, self.load(), done.error, retryable=False))
                continue
            first = FirstToken(done.token_id, done.logprob, done.generator_state)
            # The decode worker reserved pages only for the part of the prompt it does not hold cached.
            pages = done.request.pages[len(done.request.pages) - ticket.num_pages :]
            try:
                self.agent.send(ticket, pages, self._kv_timeout_s, encode(first))
            except TransferError as e:
                self.engine.release(str(job))
                self._send(PrefillDone(job, False, self.load(), str(e)))
                continue
            self._transfers[(ticket.receiver_id, ticket.xid)] = job
