"""Continuous-batching scheduler with chunked prefill and preemption by recomputation.

The scheduler owns request state: which requests wait, which run, how many of their tokens are computed
and which pages hold them. The page allocator owns the pages themselves; `RequestPages` takes and gives them
back for the scheduler, reusing cached prefixes: a request whose prompt starts with pages another request
computed starts with those tokens computed.

Each step spends a token budget: first on the running requests, oldest first (one token for a decoding
request, the next chunk for one still prefilling), then on admitting waiting requests in arrival order.
When a running request needs a page and none is free, the newest running request is preempted: its pages
are freed and it goes back to the front of the queue, to be recomputed from its tokens later.

With a `Speculator` (--speculative), a decoding request's one token may bring drafted tokens: they cost budget
and pages like prompt tokens, but never a preemption (a request that cannot grow for its draft decodes without
one); the step keeps those the sampler confirms (`update`).

In the disaggregated path a request is first *reserved*: it holds pages for its prompt while another
worker computes their KV, then is *admitted* straight into the running batch with its first token.
"""

from __future__ import annotations

from collections import Counter, deque

from splitserve.engine.pages import RequestPages
from splitserve.engine.request import Chunk, Request, RequestStatus, Sampled, SamplingFailed
from splitserve.engine.speculative import Speculator


class Scheduler:
    def __init__(
        self,
        pages: RequestPages,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        speculator: Speculator | None = None,
    ):
        self.pages = pages
        self.speculator = speculator
        self.allocator = pages.allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # oldest first
        self.receiving: list[Request] = []  # reserved: their pages are being filled by another worker
        self.num_preemptions = 0

    @property
    def num_requests(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.receiving)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def reserve(self, request: Request) -> bool:
        """Give `request` pages for its prompt (its cached prefix among them: `num_computed_tokens` says how
        much) and hold it until `admit_prefilled`. False (and no change) when the pages or a batch slot are
        not free, or preempted requests wait for pages of their own."""
        if self.waiting or self.num_requests >= self.max_num_seqs:
            return False
        if self.pages.admit(request, request.num_tokens, whole_prompt=True) is None:
            return False
        request.status = RequestStatus.RECEIVING
        self.receiving.append(request)
        return True

    def admit_prefilled(self, request: Request, first: Sampled) -> None:
        """A reserved request's pages hold its prompt's KV and `first` is its first output: run it."""
        self.receiving.remove(request)
        request.num_computed_tokens = request.num_tokens
        self.pages.cache_computed(request)
        request.take(first, self.max_model_len)
        if request.finish_reason is not None:
            request.status = RequestStatus.FINISHED
            self._release(request)
        else:
            request.status = RequestStatus.RUNNING
            self.running.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Request | None:
        """Drop a request wherever it is and free its pages. Returns it, or None if it is unknown.
        (A reserved request's pages must no longer be the target of a transfer.)"""
        for queue in (self.running, self.waiting, self.receiving):
            for request in queue:
                if request.request_id == request_id:
                    queue.remove(request)
                    request.finish_reason = "abort"
                    request.status = RequestStatus.FINISHED
                    self._release(request)
                    return request
        return None

    def schedule(self) -> list[Chunk]:
        self.allocator.expire()
        budget = self.max_num_batched_tokens
        chunks: list[Chunk] = []
        preempted = False
        drafts = self._drafts()
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            room = min(budget - n, self.max_model_len - request.num_tokens)  # drafted positions in the context
            draft = tuple(drafts.get(request.request_id, ())[: max(room, 0)])
            if draft and self.pages.grow(request, request.num_computed_tokens + n + len(draft)):
                chunks.append(Chunk(request, n, draft))
                budget -= n + len(draft)
                i += 1
                continue
            while not self.pages.grow(request, request.num_computed_tokens + n):
                victim = self.running.pop()  # the newest: later than every request scheduled so far
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            else:
                chunks.append(Chunk(request, n))
                budget -= n
                i += 1
        # Admit new work only when the running batch got all it needs this step.
        # Reserved requests keep their batch slots: they join the running batch as soon as their KV lands.
        while not preempted and self.waiting and budget > 0 and self._free_slot():
            request = self.waiting[0]
            n = self.pages.admit(request, budget)
            if n is None:
                break  # first come, first served: no overtaking the head of the queue
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            chunks.append(Chunk(request, n))
            budget -= n
        return chunks if self.speculator is None else self.speculator.fill(chunks)

    def _drafts(self) -> dict[str, list[int]]:
        if self.speculator is None:
            return {}
        decoding = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]
        return self.speculator.drafts(decoding)

    def update(
        self, chunks: list[Chunk], sampled: list[tuple[Request, Sampled | SamplingFailed]]
    ) -> list[tuple[Request, Sampled | SamplingFailed]]:
        """Account for a finished step: computed tokens advance, sampled tokens append (a row whose sampling
        failed ends its request). A request with a draft may have several tokens, in order: each after its
        first is a drafted token confirmed, whose KV the step computed; those past the request's end are
        dropped. Returns the outcomes taken, in order."""
        for chunk in chunks:
            chunk.request.num_computed_tokens += chunk.num_tokens
        taken = []
        previous = None
        for request, outcome in sampled:
            if request.finish_reason is not None:
                continue  # a drafted token after the request's last
            if request is previous:
                request.num_computed_tokens += 1
            request.take(outcome, self.max_model_len)
            taken.append((request, outcome))
            previous = request
        tokens = Counter(id(r) for r, _ in taken)  # each request's tokens this step
        for chunk in chunks:
            request = chunk.request
            if chunk.draft and self.speculator is not None:
                self.speculator.verified(request, len(chunk.draft), max(tokens[id(request)] - 1, 0))
            self.pages.cache_computed(request)
            if request.finish_reason is not None:
                self.running.remove(request)
                request.status = RequestStatus.FINISHED
                self._release(request)
        return taken

    def _free_slot(self) -> bool:
        return len(self.running) + len(self.receiving) < self.max_num_seqs

    def _preempt(self, request: Request) -> None:
        self.pages.preempted(request)
        if self.speculator is not None:
            self.speculator.preempted(request)
        request.status = RequestStatus.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _release(self, request: Request) -> None:
        self.pages.release(request)
        if self.speculator is not None:
            self.speculator.finished(request)
