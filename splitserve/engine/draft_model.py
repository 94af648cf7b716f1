"""`DraftModel`: the draft of `--speculative draft`, a small model with the target's vocabulary that proposes
each speculating request's next tokens (greedily: a drafted token is a point distribution, which
`sampling.verify` accepts with the target's probability of it, so the output is the target's, sampled or not).

It owns a model runner of its own (its weights, and a KV cache of as many pages as the target's, each page id
holding the draft's K/V of the same tokens as the target's page of that id: the scheduler's pages serve both,
and a request's pages for its drafted positions are taken before the draft runs), and per request the tokens
whose draft K/V its pages hold. Each step, for the requests the scheduler gave drafted rows, it first runs the
tokens the draft has not seen (a new request's whole prompt: the decode worker prefills the draft itself, so
nothing about the draft crosses between the pools), then one draft step per drafted token. A verified draft
leaves the draft's K/V valid up to the first rejected token; a preempted request (its pages freed) is
forgotten and starts again from its first token.
"""

from __future__ import annotations

import dataclasses
import logging

from splitserve.engine.config import EngineConfig
from splitserve.engine.params import SamplingParams
from splitserve.engine.request import Chunk, Request, Sampled
from splitserve.engine.runner import ModelRunner
from splitserve.errors import ModelLoadError
from splitserve.kernels import kv_format
from splitserve.model.checkpoint import resolve_model
from splitserve.model.config import ModelConfig

log = logging.getLogger(__name__)

_GREEDY = SamplingParams(temperature=0)


def page_bytes(cfg: ModelConfig, config: EngineConfig) -> int:
    return kv_format.page_bytes(cfg.num_layers, config.page_size, cfg.num_kv_heads, cfg.head_dim,
                                config.torch_kv_dtype)  # fmt: skip


def target_kv_share(config: EngineConfig, target: ModelConfig) -> float:
    """The share of `--kv-cache-memory` the target's pages get, the draft's pages (one for each) the rest."""
    draft = ModelConfig.from_pretrained(resolve_model(config.draft_model))
    target_bytes = page_bytes(target, config)
    return target_bytes / (target_bytes + page_bytes(draft, config))


@dataclasses.dataclass(eq=False)
class _Shadow:
    """A request as the draft sees it: the tokens whose draft K/V are in its pages."""

    request: Request  # the draft runner's: the tokens fed so far, greedy, the target request's page list
    confirmed: int = 0  # the request's tokens when last drafted: the fed tokens before it are the request's own


class DraftModel:
    def __init__(self, config: EngineConfig, target: ModelConfig, num_pages: int, max_model_len: int):
        path = resolve_model(config.draft_model)
        cfg = ModelConfig.from_pretrained(path)
        name = f"--draft-model {config.draft_model}"
        if cfg.vocab_size != target.vocab_size:
            raise ModelLoadError(f"{name}: a vocabulary of {cfg.vocab_size} tokens, the model's has "
                                 f"{target.vocab_size}: a draft must share the model's tokenizer")  # fmt: skip
        if any(cfg.layer_windows):
            raise ModelLoadError(f"{name}: its sliding-window layers cannot hold drafted tokens")
        options = dict(model=config.draft_model, speculative="off", draft_model=None,
                       kv_cache_memory=num_pages * page_bytes(cfg, config))  # fmt: skip
        self.runner = ModelRunner(cfg, path, dataclasses.replace(config, **options), None)
        if self.runner.num_pages != num_pages:  # (the same ids, or the draft would write outside its pages)
            raise RuntimeError(f"the draft's KV cache has {self.runner.num_pages} pages, the model's {num_pages}")
        self.max_model_len = min(max_model_len, self.runner.max_model_len)
        self.budget = config.max_num_batched_tokens
        self._shadows: dict[str, _Shadow] = {}
        log.info("draft model %s: %d layers, KV pages of %d bytes beside the model's", config.draft_model,
                 cfg.num_layers, page_bytes(cfg, config))  # fmt: skip

    def propose(self, chunks: list[Chunk]) -> list[Chunk]:
        """`chunks` with each draft (as many placeholder tokens as the request may draft, its pages taken)
        replaced by the draft model's greedy tokens."""
        drafting = {i: c for i, c in enumerate(chunks) if c.draft}
        wanted = {i: min(len(c.draft), self.max_model_len - c.request.num_tokens) for i, c in drafting.items()}
        shadows = {i: self._shadow(chunks[i].request) for i, k in wanted.items() if k > 0}
        drafts: dict[int, list[int]] = {i: [] for i in shadows}
        self._catch_up(shadows, drafts)
        for _ in range(max((wanted[i] for i in shadows), default=0) - 1):
            going = {i: s for i, s in shadows.items() if len(drafts[i]) < wanted[i]}
            for i, s in going.items():
                s.request.token_ids.append(drafts[i][-1])
            self._run({i: Chunk(s.request, 1) for i, s in going.items()}, drafts)
        return [c._replace(draft=tuple(drafts.get(i, ()))) if c.draft else c for i, c in enumerate(chunks)]

    def forget(self, request: Request) -> None:
        self._shadows.pop(request.request_id, None)

    def _shadow(self, request: Request) -> _Shadow:
        """The request's shadow, its tokens the request's and its computed ones those whose draft K/V are in the
        pages (at least the last token left to run). Only the draft's own tokens past `confirmed` can differ
        from the request's (those verification rejected): the comparison starts there."""
        shadow = self._shadows.get(request.request_id)
        if shadow is None:
            mirror = Request(request.request_id, [], request.num_prompt_tokens, _GREEDY, frozenset())
            shadow = self._shadows[request.request_id] = _Shadow(mirror)
        fed, tokens = shadow.request.token_ids, request.token_ids
        valid, end = shadow.confirmed, min(len(fed), len(tokens))
        while valid < end and fed[valid] == tokens[valid]:
            valid += 1
        del fed[valid:]
        fed.extend(tokens[valid:])
        shadow.confirmed = len(tokens)
        shadow.request.num_computed_tokens = min(valid, shadow.request.num_computed_tokens, len(tokens) - 1)
        shadow.request.pages = request.pages
        return shadow

    def _catch_up(self, shadows: dict[int, _Shadow], drafts: dict[int, list[int]]) -> None:
        """Run each shadow's tokens the draft has not seen, in passes of at most the batch budget, to its first
        drafted token."""
        while pending := {i: s for i, s in shadows.items() if not drafts[i]}:
            budget, chunks = self.budget, {}
            for i, s in pending.items():
                n = min(s.request.num_tokens - s.request.num_computed_tokens, budget)
                if n <= 0:
                    break
                chunks[i] = Chunk(s.request, n)
                budget -= n
            self._run(chunks, drafts)

    def _run(self, chunks: dict[int, Chunk], drafts: dict[int, list[int]]) -> None:
        """One pass of the draft runner; each chunk that reaches its shadow's last token adds a drafted token."""
        by_request = {id(c.request): i for i, c in chunks.items()}
        for request, outcome in self.runner.execute(list(chunks.values())):
            assert isinstance(outcome, Sampled)  # greedy rows without processors cannot fail
            drafts[by_request[id(request)]].append(outcome.token_id)
        for c in chunks.values():
            c.request.num_computed_tokens += c.num_tokens
