"""Speculative decoding (`--speculative ngram|suffix|draft`): which tokens a decoding request will likely
write next, read from text it has already seen (ngram, suffix) or proposed by a draft model
(`engine/draft_model.py`), and which requests propose them in a step.

A proposal is checked in the step that follows: the request's last token and its drafted tokens go through the
model as one chunk of k + 1 rows (the paged kernels take them as a prompt's rows: in the default mode bitwise
what decode steps compute, README 'Modes'), and the rows' logits are sampled in order, each as if the drafted
tokens before it had been accepted (`sampling.verify`). The drafted tokens up to the first one the sampler did
not pick are kept, with the sampler's own token after them; so the output is the tokens of a run without
speculation: greedy ones, and sampled ones too (a seeded request draws one uniform number per output token
either way). For a draft that is one token per position (no distribution), accepting the sampled token when it
equals the drafted one is standard speculative sampling: accepted with probability p(d) = min(1, p(d) / 1), and
otherwise a token from p without d, renormalised (the residual).

This module owns each speculating request's n-gram index and acceptance record, the conversations' indexes of
earlier outputs (`--speculative suffix`: an agent re-emitting a tool call it made in an earlier turn), and the
policy: which requests propose how many tokens in a step (`Speculator.drafts`), backing off per request when
its drafts are rejected and for the whole step when the batch is large. With a draft model the policy decides
how many tokens each request drafts, the scheduler takes pages for them, and the draft model then writes them
(`fill`): it needs those pages for its own K/V.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from splitserve.protocol import ACCEPTANCE_BUCKETS

if TYPE_CHECKING:
    from splitserve.engine.draft_model import DraftModel
    from splitserve.engine.request import Chunk, Request

log = logging.getLogger(__name__)

# A request whose recent drafts were mostly rejected stops proposing for a while, longer each time (steps).
_LOW_ACCEPTANCE = 0.25
_FIRST_PAUSE, _LONGEST_PAUSE = 4, 256
_SMALL_BATCH, _LIKELY = 2, 0.5  # past a batch this small, only requests with a recent acceptance this high draft
_RECENT = 0.7  # weight of the past in a request's moving acceptance rate
_SUFFIX_CONVERSATIONS = 1024  # conversations whose earlier outputs --speculative suffix keeps (least recent go)
_SUFFIX_TOKENS = 16384  # tokens kept per conversation (the oldest go)


class NgramIndex:
    """Where each n-gram (n in [n_min, n_max]) of a growing token sequence last occurred, to continue the
    sequence's end as it went on after its latest earlier occurrence."""

    def __init__(self, n_min: int, n_max: int, tokens: Iterable[int] = ()):
        self.n_min, self.n_max = n_min, n_max
        self.tokens: list[int] = []
        # per n: n-gram -> the position after its latest occurrence that is not the sequence's end
        self._after: list[dict[tuple[int, ...], int]] = [{} for _ in range(n_min, n_max + 1)]
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        seq, after = self.tokens, self._after
        for token in tokens:
            end = len(seq)  # the n-grams ending here stop being the end: index them, then grow
            for i, n in enumerate(range(self.n_min, min(self.n_max, end) + 1)):
                after[i][tuple(seq[end - n :])] = end
            seq.append(token)

    def continuation(self, suffix: Sequence[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest n-gram ending `suffix`
        (the sequence's own end where `suffix` is its tokens); [] when none of them occurred."""
        for n in range(min(self.n_max, len(suffix)), self.n_min - 1, -1):
            start = self._after[n - self.n_min].get(tuple(suffix[len(suffix) - n :]))
            if start is not None:
                return self.tokens[start : start + k]
        return []


@dataclass
class _Record:
    """One speculating request's index of its own tokens and its acceptance so far."""

    index: NgramIndex
    drafted: int = 0
    accepted: int = 0
    rate: float = 1.0  # moving acceptance rate of its recent drafts
    paused: int = 0  # steps left without proposing
    pause: int = _FIRST_PAUSE  # the next pause's length


@dataclass
class SpecStats:
    """Counters for /metrics: tokens drafted and accepted, and finished requests by their acceptance rate."""

    drafted: int = 0
    accepted: int = 0
    steps: int = 0  # request-steps that verified a draft
    acceptance: Counter = field(default_factory=Counter)  # bucket upper bound -> finished requests


class Speculator:
    def __init__(self, method: str, num_tokens: int, ngram_min: int, ngram_max: int, max_batch: int,
                 proposer: DraftModel | None = None):  # fmt: skip
        """`proposer`: the draft model, for method `draft`."""
        self.method, self.num_tokens, self.max_batch = method, num_tokens, max_batch
        self.proposer = proposer
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self._records: dict[str, _Record] = {}
        self._conversations: OrderedDict[str, NgramIndex] = OrderedDict()
        self.stats = SpecStats()

    def drafts(self, decoding: list[Request]) -> dict[str, list[int]]:
        """Drafted tokens per request id for this step's decoding requests (those with one token to compute):
        none when they are more than `max_batch`, and at most `2 * num_tokens` in all, the requests whose recent
        drafts were accepted most first (each drafted token is a row of the step: past a few, a step of
        several requests stops being bound by reading the weights, and rows cost compute)."""
        if len(decoding) > self.max_batch:
            return {}
        proposed = self._proposals(decoding)
        if len(decoding) > _SMALL_BATCH:  # rows cost compute here: only drafts that are likely kept
            proposed = {r: d for r, d in proposed.items() if self._records[r].rate >= _LIKELY}
        budget = 2 * self.num_tokens
        out = {}
        for request_id, draft in sorted(proposed.items(), key=lambda kv: -self._records[kv[0]].rate):
            if budget <= 0:
                break
            out[request_id] = draft[:budget]
            budget -= len(out[request_id])
        return out

    def _proposals(self, decoding: list[Request]) -> dict[str, list[int]]:
        out = {}
        for request in decoding:
            k = self._room(request)
            if k <= 0:
                continue
            record = self._record(request)
            if record.paused:
                record.paused -= 1
                continue
            if self.proposer is not None:  # placeholders: the draft model writes them once the pages are taken
                out[request.request_id] = [0] * k
                continue
            record.index.extend(request.token_ids[len(record.index.tokens) :])
            draft = record.index.continuation(request.token_ids, k)
            if not draft and request.cache_key is not None and request.cache_key in self._conversations:
                draft = self._conversations[request.cache_key].continuation(request.token_ids, k)
            if draft:
                out[request.request_id] = draft
        return out

    def _room(self, request: Request) -> int:
        """How many tokens the request may draft: none when it opted out; fewer than its remaining output."""
        p = request.params
        if not p.speculative:
            return 0
        return min(self.num_tokens, p.max_tokens - (request.num_tokens - request.num_prompt_tokens) - 1)

    def _record(self, request: Request) -> _Record:
        record = self._records.get(request.request_id)
        if record is None:
            record = self._records[request.request_id] = _Record(NgramIndex(self.ngram_min, self.ngram_max))
        return record

    def verified(self, request: Request, drafted: int, accepted: int) -> None:
        """A step checked `drafted` of the request's tokens and kept `accepted` of them."""
        record = self._record(request)
        record.drafted += drafted
        record.accepted += accepted
        self.stats.drafted += drafted
        self.stats.accepted += accepted
        self.stats.steps += 1
        record.rate = _RECENT * record.rate + (1 - _RECENT) * accepted / drafted
        if record.rate < _LOW_ACCEPTANCE:
            record.paused, record.pause = record.pause, min(2 * record.pause, _LONGEST_PAUSE)
            record.rate = _LOW_ACCEPTANCE  # after the pause it gets another try at the threshold
        elif accepted == drafted:
            record.pause = _FIRST_PAUSE

    def fill(self, chunks: list[Chunk]) -> list[Chunk]:
        """The step's chunks with their drafts written: the draft model's tokens in place of the placeholders
        (with pages taken for them); n-gram drafts are written already."""
        return chunks if self.proposer is None else self.proposer.propose(chunks)

    def preempted(self, request: Request) -> None:
        """Its pages were freed: a draft model's K/V in them is gone."""
        if self.proposer is not None:
            self.proposer.forget(request)

    def finished(self, request: Request) -> tuple[int, int] | None:
        """Forget the request (finished or aborted); remember its output for its conversation's next turns.
        (drafted, accepted) of its drafts, or None when it drafted none."""
        if self.proposer is not None:
            self.proposer.forget(request)
        record = self._records.pop(request.request_id, None)
        if self.method == "suffix" and request.cache_key is not None and request.finish_reason in ("stop", "length"):
            self._remember(request.cache_key, request.output_token_ids)
        if record is None or not record.drafted:
            return None
        rate = record.accepted / record.drafted
        self.stats.acceptance[next(b for b in ACCEPTANCE_BUCKETS if rate <= b)] += 1
        log.info("request %s (%s): %d of %d drafted tokens accepted (%.0f%%), %d output tokens",
                 request.request_id, request.finish_reason, record.accepted, record.drafted, 100 * rate,
                 request.num_tokens - request.num_prompt_tokens)  # fmt: skip
        return record.drafted, record.accepted

    def _remember(self, key: str, output: list[int]) -> None:
        index = self._conversations.pop(key, None)
        if index is None or len(index.tokens) + len(output) > _SUFFIX_TOKENS:
            kept = [] if index is None else index.tokens[-(_SUFFIX_TOKENS // 2) :]
            index = NgramIndex(self.ngram_min, self.ngram_max, kept)
        index.extend(output)
        self._conversations[key] = index
        while len(self._conversations) > _SUFFIX_CONVERSATIONS:
            self._conversations.popitem(last=False)
