"""`PrefillScheduler`: prompt batching for the prefill pool.

Prompts are served first come, first served. Each forward pass spends a token budget: first on prompts
already started (long prompts are prefilled in chunks), then on new ones. A prompt takes pages for all its
tokens when it starts, so it never waits for pages halfway. When its last chunk has run, its first token is
sampled and it keeps its pages, now *handed off*, until the caller has shipped them and calls `release`.

A prompt that starts with cached pages (a shared system prompt, an earlier turn) computes only the rest.
The scheduler owns these requests' state; the page allocator owns the pages.
"""

from __future__ import annotations

from collections import deque

from splitserve.engine.pages import RequestPages
from splitserve.engine.request import Chunk, Request, RequestStatus, Sampled, SamplingFailed


class PrefillScheduler:
    def __init__(self, pages: RequestPages, max_num_seqs: int, max_num_batched_tokens: int):
        self.pages = pages
        self.allocator = pages.allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # prompts partly prefilled, oldest first
        self.handed_off: dict[str, Request] = {}  # first token sampled; pages in transfer

    @property
    def pending_tokens(self) -> int:
        """Prompt tokens not yet computed: how far behind this worker is."""
        return sum(r.num_tokens - r.num_computed_tokens for r in (*self.waiting, *self.running))

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Request | None:
        """Drop a request that is queued or being prefilled, freeing its pages. Returns it, or None when it is
        unknown or handed off (a handed-off request's pages are freed by `release`, after its transfer)."""
        for queue in (self.running, self.waiting):
            for request in queue:
                if request.request_id == request_id:
                    queue.remove(request)
                    request.status = RequestStatus.FINISHED
                    request.finish_reason = "abort"
                    self._free(request)
                    return request
        return None

    def schedule(self) -> list[Chunk]:
        self.allocator.expire()
        budget = self.max_num_batched_tokens
        chunks: list[Chunk] = []
        for request in self.running:
            if budget == 0:
                break
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            chunks.append(Chunk(request, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            n = self.pages.admit(request, budget, whole_prompt=True)
            if n is None:
                break  # first come, first served
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            chunks.append(Chunk(request, n))
            budget -= n
        return chunks

    def update(
        self, chunks: list[Chunk], sampled: list[tuple[Request, Sampled | SamplingFailed]]
    ) -> list[tuple[Request, Sampled | SamplingFailed]]:
        """Account for a finished forward pass; returns the requests it completed, with their first tokens. A
        request whose sampling failed is over: its pages are freed at once."""
        for chunk in chunks:
            chunk.request.num_computed_tokens += chunk.num_tokens
            self.pages.cache_computed(chunk.request)
        for request, outcome in sampled:
            self.running.remove(request)
            request.status = RequestStatus.FINISHED
            if isinstance(outcome, SamplingFailed):
                request.finish_reason, request.error = "error", outcome.message
                self._free(request)
            else:
                self.handed_off[request.request_id] = request
        return sampled

    def release(self, request_id: str) -> None:
        """The handed-off request's pages were shipped (or the transfer ended): free them."""
        self._free(self.handed_off.pop(request_id))

    def _free(self, request: Request) -> None:
        self.pages.release(request)
