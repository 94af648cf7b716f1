"""Sampling parameters and the sampler that turns a step's logits into next tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token, and when to stop. temperature 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): no top-k filter
    seed: int | None = None  # makes this request's samples reproducible
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; n >= 0: chosen token's logprob and the n most likely

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise InvalidRequestError(message)

        check(
            isinstance(self.max_tokens, int) and self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"
        )
        check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(self.top_k == -1 or self.top_k >= 0, f"top_k must be -1 (off) or >= 0, got {self.top_k}")
        check(self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class TokenLogprob:
    """The sampled token's log-probability under the model, and the most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Pick one token per row of `logits` ([rows, vocab], fp32) under that row's parameters."""
    tokens = logits.argmax(dim=-1).tolist()
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        # Per-request generators live on the CPU: sampling there keeps a seed's tokens the same on any device.
        rows = logits[sampled].cpu()
        for row, i in enumerate(sampled):
            tokens[i] = _sample_row(rows[row], params[i], generators[i])
    logprobs: list[TokenLogprob | None] = [None] * len(params)
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    if wanted:
        logp = torch.log_softmax(logits[wanted], dim=-1)
        for row, i in enumerate(wanted):
            top = torch.topk(logp[row], params[i].logprobs) if params[i].logprobs else None
            logprobs[i] = TokenLogprob(
                tokens[i],
                logp[row, tokens[i]].item(),
                tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else (),
            )
    return tokens, logprobs


def _sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    scores = logits / p.temperature
    if 0 < p.top_k < scores.shape[-1]:
        kth = torch.topk(scores, p.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if p.top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = sorted_scores.softmax(-1)
        # Drop a token when the tokens more likely than it already reach top_p (the first always stays).
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())
