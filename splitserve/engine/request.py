"""A generation request's state as the scheduler and runner see it (the scheduler is its owner), and what the
sampler hands it each step (`Sampled`, or `SamplingFailed`)."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch

from splitserve.engine.params import SamplingParams, TokenLogprob
from splitserve.engine.structured import Grammar
from splitserve.errors import InvalidRequestError

if TYPE_CHECKING:
    from splitserve.protocol import Generate, Prefill, Reserve


@dataclass(frozen=True)
class Sampled:
    """The sampler's token for a request (and its logprobs, where asked)."""

    token_id: int
    logprob: TokenLogprob | None


@dataclass(frozen=True)
class SamplingFailed:
    """This row could not be sampled; its request fails with `message`, the others go on."""

    message: str


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted: holds no pages
    RUNNING = "running"  # holds pages for its computed tokens
    RECEIVING = "receiving"  # holds pages that another worker fills with its prompt's KV
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    token_ids: list[int]  # prompt, then every generated token
    num_prompt_tokens: int
    params: SamplingParams
    eos_token_ids: frozenset[int]
    num_computed_tokens: int = 0  # tokens whose K/V are in this request's pages
    pages: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None  # why, when finish_reason is "error"
    logprobs: list[TokenLogprob] = field(default_factory=list)
    generator: torch.Generator | None = None
    grammar: Grammar | None = None  # structured output: which tokens may come next
    cache_key: str | None = None  # the conversation it belongs to: its pages are kept for the next turn
    page_hashes: list[int] = field(default_factory=list)  # of its leading full pages (prefix cache)
    num_registered_pages: int = 0  # leading pages whose KV is computed and in the prefix cache
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache when it was admitted

    @classmethod
    def create(
        cls,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: frozenset[int],
        grammar: Grammar | None = None,
        cache_key: str | None = None,
        output_token_ids: Sequence[int] = (),
    ) -> Request:
        """`output_token_ids`: tokens an earlier attempt generated (a request migrated to this worker): they
        are computed with the prompt, count as output (max_tokens, min_tokens, penalties, the grammar), and a
        seeded generator continues after their draws, so that the next token is the one that attempt would have
        sampled. InvalidRequestError when the grammar refuses them."""
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator().manual_seed(params.seed)
        request = cls(
            request_id,
            [*prompt_token_ids, *output_token_ids],
            len(prompt_token_ids),
            params,
            eos_token_ids,
            generator=generator,
            grammar=grammar,
            cache_key=cache_key,
        )
        for token_id in output_token_ids:
            if grammar is not None:
                grammar.accept(token_id)
            if generator is not None:
                request.draw()
        return request

    def draw(self) -> torch.Tensor:
        """The next uniform number of this request's seeded generator, `[1]`: one per sampled token, so that
        a generator that drew once per output token is where the request's sampling left it."""
        return torch.rand(1, generator=self.generator)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    def take(self, outcome: Sampled | SamplingFailed, max_model_len: int) -> None:
        """Record what the sampler produced for this request: its next token, or its failure."""
        if isinstance(outcome, SamplingFailed):
            self.finish_reason, self.error = "error", outcome.message
            return
        try:
            self.append_token(outcome.token_id, outcome.logprob, max_model_len)
        except InvalidRequestError as e:  # a token its grammar refuses (only a faulty peer can send one)
            self.finish_reason, self.error = "error", str(e)

    @contextmanager
    def tentatively(self) -> Iterator[Callable[[Sampled], None]]:
        """A function that appends a sampled token (its logprobs, grammar state and finish with it), all taken
        back on exit: how the sampler sees a drafted token accepted before the scheduler takes it
        (sampling.verify)."""
        num_tokens, num_logprobs, finish_reason = self.num_tokens, len(self.logprobs), self.finish_reason
        try:
            yield lambda s: self.append_token(s.token_id, s.logprob, self.num_tokens + 2)
        finally:
            appended = self.num_tokens - num_tokens
            del self.token_ids[num_tokens:], self.logprobs[num_logprobs:]
            if self.grammar is not None and appended:
                self.grammar.rollback(appended)
            self.finish_reason = finish_reason

    def append_token(self, token_id: int, logprob: TokenLogprob | None, max_model_len: int) -> None:
        """Record a sampled token and decide whether the request is done."""
        self.token_ids.append(token_id)
        if logprob is not None:
            self.logprobs.append(logprob)
        if self.grammar is not None:
            self.grammar.accept(token_id)
        p = self.params
        stopped = token_id in p.stop_token_ids or (not p.ignore_eos and token_id in self.eos_token_ids)
        if stopped or (self.grammar is not None and self.grammar.complete):
            self.finish_reason = "stop"
        elif len(self.token_ids) - self.num_prompt_tokens >= p.max_tokens or len(self.token_ids) >= max_model_len:
            self.finish_reason = "length"


class EngineRequest(NamedTuple):
    """What an engine is asked to run: the fields of the protocol's `Generate`, `Reserve` and `Prefill` (their
    job id as the request id: `of`). Requests of one conversation share a `cache_key`: its pages are kept for
    its next turn. `output_token_ids`: what an earlier attempt at the request generated (a migrated request
    resumes after them; `Request.create`)."""

    request_id: str
    prompt_token_ids: Sequence[int]
    params: SamplingParams
    cache_key: str | None = None
    output_token_ids: Sequence[int] = ()

    @classmethod
    def of(cls, message: Generate | Reserve | Prefill) -> EngineRequest:
        return cls(str(message.job), message.prompt_token_ids, message.params, message.cache_key,
                   message.output_token_ids)  # fmt: skip


class Chunk(NamedTuple):
    """`num_tokens` of `request`'s uncomputed tokens, scheduled for one forward pass; a decoding request's
    last token may bring `draft`, tokens proposed to follow it (engine/speculative.py), verified in the pass."""

    request: Request
    num_tokens: int
    draft: tuple[int, ...] = ()

    @property
    def rows(self) -> int:
        """The pass's rows for this chunk: its tokens and the drafted ones."""
        return self.num_tokens + len(self.draft)

    @property
    def completes(self) -> bool:
        """True when this chunk reaches the request's last token, so the step samples a new one."""
        return self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens
