"""`PrefillEngine`: the prefill pool's loop: prompts in, their KV pages and first token out."""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.engine.config import EngineConfig
from splitserve.engine.core import EngineCore
from splitserve.engine.kv_cache import TensorAllocator
from splitserve.engine.params import TokenLogprob
from splitserve.engine.request import EngineRequest, Request, SamplingFailed
from splitserve.errors import InvalidRequestError
from splitserve.prefill.scheduler import PrefillScheduler


@dataclass(frozen=True)
class Prefilled:
    """A prompt whose KV is in `request.pages`, with its first sampled token. The pages stay taken until
    `PrefillEngine.release`."""

    request: Request
    token_id: int  # -1 when sampling failed: `error` says why, and the pages are already free
    logprob: TokenLogprob | None
    error: str | None = None

    @property
    def generator_state(self) -> bytes | None:
        """The seeded sampler's state after the first token, so that decoding continues the same sequence."""
        g = self.request.generator
        return None if g is None else g.get_state().numpy().tobytes()


class PrefillEngine(EngineCore):
    def __init__(
        self, config: EngineConfig, kv_allocator: TensorAllocator | None = None, take_over: EngineCore | None = None
    ):
        super().__init__(config, kv_allocator, take_over)
        self.scheduler = PrefillScheduler(self.pages, config.max_num_seqs, config.max_num_batched_tokens)
        self._ids: set[str] = set()

    def add_request(self, spec: EngineRequest) -> None:
        """Queue a prompt (and the outputs it resumes after) for prefill."""
        if spec.request_id in self._ids:
            raise InvalidRequestError(f"request id {spec.request_id!r} is already in use")
        request = self.new_request(spec)
        self._ids.add(spec.request_id)
        self.scheduler.add(request)

    def abort(self, request_id: str) -> bool:
        """Drop a queued or running prompt; False when it is unknown or already handed off."""
        if self.scheduler.abort(request_id) is None:
            return False
        self._ids.discard(request_id)
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Prefilled]:
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        done = []
        for request, outcome in self.scheduler.update(chunks, self.execute(chunks)):
            if isinstance(outcome, SamplingFailed):
                self._ids.discard(request.request_id)
                done.append(Prefilled(request, -1, None, outcome.message))
            else:
                done.append(Prefilled(request, outcome.token_id, outcome.logprob))
        return done

    def release(self, request_id: str) -> None:
        self.scheduler.release(request_id)
        self._ids.discard(request_id)
