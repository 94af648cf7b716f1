"""`DecodeWorker`: the decode pool's side of the protocol (and role `both`'s).

Disaggregated: a `Reserve` takes pages in the `DecodeEngine` and posts UCX receives into them; when the prefill
worker's transfer lands, its payload carries the first token and the request joins the running batch
(that token goes to the router at once). Colocated (role `both`), or a prompt this decode worker holds mostly
cached: a `Generate` enters the engine's own chunked prefill. Every step's tokens go to the router in one
`Tokens` message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from splitserve.decode.engine import DecodeEngine, NoCapacityError, RequestUpdate
from splitserve.engine.kv_cache import PageAllocator
from splitserve.engine.request import EngineRequest
from splitserve.errors import InvalidRequestError
from splitserve.kv_transfer.agent import Side, TransferAgent
from splitserve.protocol import (
    Abort,
    Generate,
    JobFailed,
    Load,
    ProtocolError,
    Reserve,
    Reserved,
    TokenOut,
    Tokens,
    ToRouter,
    ToWorker,
    decode_first_token,
)

log = logging.getLogger(__name__)


class DecodeWorker:
    def __init__(
        self, engine: DecodeEngine, agent: TransferAgent | None, send: Callable[[ToRouter], None], kv_timeout_s: float
    ):
        self.engine = engine
        self.agent = agent  # None for role `both`, which prefills its own prompts
        self._send = send
        self._kv_timeout_s = kv_timeout_s
        self._receiving: dict[int, int] = {}  # transfer xid -> job, while its pages are being filled
        self._aborted: set[int] = set()  # jobs aborted while their pages were being filled

    @property
    def allocator(self) -> PageAllocator:
        return self.engine.allocator

    def busy(self) -> bool:
        return self.engine.has_unfinished()

    def in_flight(self) -> bool:
        return self.agent is not None and self.agent.num_in_flight > 0

    def load(self) -> Load:
        s = self.engine.scheduler
        pending = sum(r.num_tokens - r.num_computed_tokens for r in s.waiting)
        return Load(self.allocator.num_available, len(s.running), len(s.waiting) + len(s.receiving), pending,
                    self.engine.prefill_tokens_per_s, self.engine.decode_step_s)  # fmt: skip

    def idle(self) -> bool:
        """Nothing running, queued or being received: the worker may switch roles."""
        return not self.engine.has_unfinished() and not self._receiving and not self.engine.scheduler.receiving

    def on_message(self, message: ToWorker) -> None:
        if isinstance(message, Reserve) and self.agent is not None:
            self._reserve(message)
        elif isinstance(message, Generate):
            try:
                self.engine.add_request(EngineRequest.of(message))
            except InvalidRequestError as e:
                self._send(JobFailed(message.job, str(e), retryable=False, invalid=True))
        elif isinstance(message, Abort):
            for xid, job in self._receiving.items():
                if job == message.job:  # pages still being filled: free them when the transfer has ended
                    self._aborted.add(job)
                    self.agent.cancel(xid)
                    return
            self.engine.abort(str(message.job))
        else:
            log.warning("a %s worker got %s: ignored", "decode" if self.agent else "both", type(message).__name__)

    def step(self) -> None:
        if self.agent is not None:
            landed = [u for u in map(self._landed, self.agent.poll()) if u is not None]
            if landed:  # first tokens go out now, not after the next decode step (that is the next turn)
                self._report(landed)
                return
        if self.engine.has_unfinished():
            self._report(self.engine.step())

    def _report(self, updates: list[RequestUpdate]) -> None:
        """Tokens to the router in one message; a request that failed (its row alone) as its own failure."""
        for u in updates:
            if u.finish_reason == "error":
                self._send(JobFailed(int(u.request_id), u.error or "the request failed", retryable=False))
        tokens = [_token_out(u) for u in updates if u.finish_reason != "error"]
        if tokens:
            self._send(Tokens(tokens, self.load()))

    def _reserve(self, message: Reserve) -> None:
        try:
            pages = self.engine.reserve(EngineRequest.of(message))
        except (NoCapacityError, InvalidRequestError) as e:
            self._send(Reserved(message.job, None, self.load(), str(e), invalid=isinstance(e, InvalidRequestError)))
            return
        ticket = self.agent.reserve(pages, self._kv_timeout_s)
        self._receiving[ticket.xid] = message.job
        self._send(Reserved(message.job, ticket, self.load()))

    def _landed(self, c) -> RequestUpdate | None:
        """A reservation's transfer ended: start decoding, or fail the job (fail closed)."""
        if c.side is not Side.RECV:
            return None
        job = self._receiving.pop(c.xid)
        error = c.error
        if c.ok and job not in self._aborted:
            try:
                first = decode_first_token(c.payload)
                return self.engine.start_decode(str(job), first.token_id, first.logprob, first.generator_state)
            except (ProtocolError, RuntimeError) as e:  # RuntimeError: a sampler state torch refuses
                error = f"the prefill worker's first token was malformed: {e}"
        self.engine.abort(str(job))
        if job in self._aborted:
            self._aborted.discard(job)
        else:
            self._send(JobFailed(job, f"KV transfer failed: {error}", retryable=True))
        return None


def _token_out(u: RequestUpdate) -> TokenOut:
    return TokenOut(int(u.request_id), u.token_id, u.finish_reason, u.logprob)
