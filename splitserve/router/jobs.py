"""A client request as the router sees it (`Job`, across its attempts), the events its answer is made of, and
the refusal of one it cannot queue."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

from splitserve.engine.params import SamplingParams, TokenLogprob
from splitserve.engine.prefix_cache import page_hashes, reusable_pages


class Overloaded(Exception):
    """The request cannot be queued now (HTTP 429 or 503, with Retry-After)."""

    def __init__(self, message: str, status: int, retry_after_s: int = 1):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    logprob: TokenLogprob | None
    finish_reason: str | None


@dataclass(frozen=True)
class ErrorEvent:
    message: str
    status: int  # the HTTP status this error maps to, when no byte of the answer was sent yet
    retry_after_s: int | None = None


class JobState(enum.Enum):
    QUEUED = "queued"
    RESERVING = "reserving"  # Reserve sent to a decode worker
    PREFILLING = "prefilling"  # pages reserved, Prefill sent
    GENERATING = "generating"  # tokens flowing (or a colocated worker prefilling)
    DONE = "done"


@dataclass(eq=False)
class Job:
    """One client request, across its attempts. `wire_id` names the current attempt on the wire."""

    prompt_token_ids: list[int]
    params: SamplingParams
    created: float
    pages_needed: int
    wire_id: int = 0
    attempts: int = 0
    state: JobState = JobState.QUEUED
    queued_at: float = 0.0
    waited_s: float = 0.0  # time spent in the router's queue, waiting for room on a worker
    enqueued_at: float = 0.0  # when it last entered that queue
    judged: bool = False  # counted in an SLO window already
    prefill: str | None = None  # worker ids holding state for the current attempt
    decode: str | None = None
    num_tokens: int = 0
    first_token_at: float | None = None
    cache_key: str | None = None  # the conversation it belongs to
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    _hashes: dict[int, list[int]] = field(default_factory=dict)  # its prompt's reusable page hashes, by root

    def page_hashes(self, root: int, page_size: int) -> list[int]:
        if root not in self._hashes:
            limit = reusable_pages(len(self.prompt_token_ids), page_size)
            self._hashes[root] = page_hashes(self.prompt_token_ids, page_size, root, limit)
        return self._hashes[root]

    async def next_event(self) -> TokenEvent | ErrorEvent:
        return await self.events.get()
