"""`Engine`: one process's continuous-batching loop (role `both`): requests in, one step at a time, tokens out."""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.decode.scheduler import Scheduler
from splitserve.engine.config import EngineConfig
from splitserve.engine.kv_cache import PageAllocator
from splitserve.engine.request import Request
from splitserve.engine.runner import ModelRunner
from splitserve.engine.sampling import SamplingParams, TokenLogprob
from splitserve.errors import InvalidRequestError
from splitserve.model.checkpoint import resolve_model
from splitserve.model.config import ModelConfig


@dataclass(frozen=True)
class RequestUpdate:
    """What one step produced for one request."""

    request_id: str
    token_id: int
    logprob: TokenLogprob | None
    finish_reason: str | None  # set when this token ends the request


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_path = resolve_model(config.model)
        self.model_config = ModelConfig.from_pretrained(self.model_path)
        self.runner = ModelRunner(self.model_config, self.model_path, config)
        self.max_model_len = self.runner.max_model_len
        self.allocator = PageAllocator(self.runner.num_pages)
        self.scheduler = Scheduler(
            self.allocator, config.page_size, config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len
        )
        self._requests: dict[str, Request] = {}

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_token_ids)} tokens; this model's context holds {self.max_model_len} "
                "(prompt and at least one generated token)"
            )
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        self.validate_prompt(prompt_token_ids)
        request = Request.create(request_id, prompt_token_ids, params, frozenset(self.model_config.eos_token_ids))
        self._requests[request_id] = request
        self.scheduler.add(request)

    def abort(self, request_id: str) -> None:
        if self._requests.pop(request_id, None) is not None:
            self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestUpdate]:
        """Schedule, run one forward pass, sample; returns one update per request that got a token."""
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        sampled = self.runner.execute(chunks)
        self.scheduler.update(chunks, sampled)
        updates = []
        for request, token_id, logprob in sampled:
            updates.append(RequestUpdate(request.request_id, token_id, logprob, request.finish_reason))
            if request.finish_reason is not None:
                del self._requests[request.request_id]
        return updates
