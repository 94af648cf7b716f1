"""`DecodeEngine`: the decode side's continuous-batching loop: requests in, one step at a time, tokens out.

A request enters in one of two ways: `add_request` (the engine prefills it itself, in chunks mixed into
decode steps: role `both`, the colocated baseline) or `reserve` + `start_decode` (a prefill worker computes
the prompt's KV into the reserved pages and hands over the first token: the disaggregated path).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from splitserve.decode.scheduler import Scheduler
from splitserve.engine.config import EngineConfig
from splitserve.engine.core import EngineCore
from splitserve.engine.draft_model import DraftModel, target_kv_share
from splitserve.engine.kv_cache import TensorAllocator
from splitserve.engine.params import TokenLogprob
from splitserve.engine.request import EngineRequest, Request, Sampled, SamplingFailed
from splitserve.engine.speculative import Speculator
from splitserve.errors import InvalidRequestError
from splitserve.model.checkpoint import resolve_model
from splitserve.model.config import ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestUpdate:
    """What one step produced for one request."""

    request_id: str
    token_id: int  # -1 when the request failed (finish_reason "error")
    logprob: TokenLogprob | None
    finish_reason: str | None  # set when this token ends the request
    error: str | None = None  # why it failed


class NoCapacityError(RuntimeError):
    """The engine cannot take a reservation now (pages or batch slots); another worker, or later, may."""


class DecodeEngine(EngineCore):
    def __init__(
        self, config: EngineConfig, kv_allocator: TensorAllocator | None = None, take_over: EngineCore | None = None
    ):
        share = 1.0
        if config.speculative == "draft" and take_over is None:  # the draft's pages share the KV budget
            share = target_kv_share(config, ModelConfig.from_pretrained(resolve_model(config.model)))
        super().__init__(config, kv_allocator, take_over, kv_share=share)
        self.speculator = self._speculator()
        self.scheduler = Scheduler(self.pages, config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len,
                                   self.speculator)  # fmt: skip
        self._requests: dict[str, Request] = {}

    def add_request(self, spec: EngineRequest) -> None:
        """A request this engine prefills itself."""
        self.scheduler.add(self._register(self.new_request(spec)))

    def reserve(self, spec: EngineRequest) -> list[int]:
        """Take pages for a prompt (and the outputs it resumes after) whose KV another worker will write;
        returns those that need it, in order: the pages after the prefix that this engine has cached (the last
        page always)."""
        request = self._register(self.new_request(spec))
        if not self.scheduler.reserve(request):
            del self._requests[request.request_id]
            raise NoCapacityError(
                f"no room for {request.num_tokens} prompt tokens: {self.allocator.num_available} pages free, "
                f"{self.scheduler.num_requests} of {self.scheduler.max_num_seqs} batch slots taken"
            )
        return request.pages[request.num_cached_tokens // self.config.page_size :]

    def start_decode(
        self, request_id: str, token_id: int, logprob: TokenLogprob | None, generator_state: bytes | None
    ) -> RequestUpdate:
        """The reserved pages now hold the prompt's KV and `token_id` is its first output: start decoding."""
        request = self._requests[request_id]
        if generator_state is not None and request.generator is not None:
            request.generator.set_state(torch.frombuffer(bytearray(generator_state), dtype=torch.uint8))
        first = Sampled(token_id, logprob)
        self.scheduler.admit_prefilled(request, first)
        return self._update(request, first)

    def abort(self, request_id: str) -> None:
        if self._requests.pop(request_id, None) is not None:
            self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def _speculator(self) -> Speculator | None:
        c = self.config
        if c.speculative == "off":
            return None
        if self.runner.kv_layout.has_rings:
            log.warning("--speculative %s is off for this model: its sliding-window layers' pages are rings",
                        c.speculative)  # fmt: skip
            return None
        if self.numerics_differ:
            log.warning("--speculative %s: greedy tokens may differ from a run without it in near ties: %s",
                        c.speculative, self.numerics_differ)  # fmt: skip
        proposer = None
        if c.speculative == "draft":
            proposer = DraftModel(c, self.model_config, self.runner.num_pages, self.max_model_len)
        return Speculator(c.speculative, c.num_speculative_tokens, c.ngram_min, c.ngram_max, c.speculative_max_batch,
                          proposer)  # fmt: skip

    def step(self) -> list[RequestUpdate]:
        """Schedule, run one forward pass, sample; returns one update per token, in order (a request whose draft
        was verified may have several)."""
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        taken = self.scheduler.update(chunks, self.execute(chunks))
        last = {id(request): i for i, (request, _) in enumerate(taken)}
        return [self._update(request, outcome, last[id(request)] == i) for i, (request, outcome) in enumerate(taken)]

    def _register(self, request: Request) -> Request:
        if request.request_id in self._requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        self._requests[request.request_id] = request
        return request

    def _update(self, request: Request, outcome: Sampled | SamplingFailed, last: bool = True) -> RequestUpdate:
        """The update of `outcome`, the request's `last` of the step: only that one may carry its end."""
        finish_reason = request.finish_reason if last else None
        if finish_reason is not None:
            del self._requests[request.request_id]
        if isinstance(outcome, SamplingFailed):
            return RequestUpdate(request.request_id, -1, None, finish_reason, request.error)
        return RequestUpdate(request.request_id, outcome.token_id, outcome.logprob, finish_reason, request.error)
