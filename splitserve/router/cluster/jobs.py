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
    """One client request, across its attempts. `wire_id` names the current attempt on the wire.

    Every token that reached the client is in `output_token_ids`. An attempt that fails before the first
    token is *retried* (at most `MAX_ATTEMPTS`); one that fails later is *migrated*: the next attempt prefills
    the prompt and those tokens and resumes after them (`resumed`), so the client's stream goes on."""

    prompt_token_ids: list[int]
    params: SamplingParams
    created: float
    page_size: int  # the smallest of the workers' (a job's pages are counted in it)
    wire_id: int = 0
    attempts: int = 0
    state: JobState = JobState.QUEUED
    queued_at: float = 0.0  # when it entered the queue: at submission, or when it was last migrated
    waited_s: float = 0.0  # time spent in the router's queue, waiting for room on a worker
    enqueued_at: float = 0.0  # when it last entered that queue
    judged: bool = False  # counted in an SLO window already
    prefill: str | None = None  # worker ids holding state for the current attempt
    decode: str | None = None
    output_token_ids: list[int] = field(default_factory=list)  # streamed to the client so far
    resumed: int = 0  # output tokens the current attempt started from (0 but after a migration)
    migrations: list[str] = field(default_factory=list)  # why each migration happened
    first_token_at: float | None = None
    cache_key: str | None = None  # the conversation it belongs to
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    _hashes: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # reusable page hashes, by (root, resumed)

    @property
    def num_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def token_ids(self) -> list[int]:
        """What the current attempt prefills: the prompt, and after a migration the outputs it resumes after."""
        return (
            [*self.prompt_token_ids, *self.output_token_ids[: self.resumed]] if self.resumed else self.prompt_token_ids
        )

    @property
    def resumed_token_ids(self) -> list[int]:
        return self.output_token_ids[: self.resumed]

    @property
    def num_prefill_tokens(self) -> int:
        """len(token_ids)."""
        return len(self.prompt_token_ids) + self.resumed

    @property
    def pages_needed(self) -> int:
        return -(-self.num_prefill_tokens // self.page_size)

    @property
    def attempt_started(self) -> bool:
        """The current attempt has streamed a token (a failure now is a migration even for a fresh request)."""
        return self.num_tokens > self.resumed

    def page_hashes(self, root: int, page_size: int) -> list[int]:
        key = (root, self.resumed)
        if key not in self._hashes:
            tokens = self.token_ids
            self._hashes[key] = page_hashes(tokens, page_size, root, reusable_pages(len(tokens), page_size))
        return self._hashes[key]

    async def next_event(self) -> TokenEvent | ErrorEvent:
        return await self.events.get()
