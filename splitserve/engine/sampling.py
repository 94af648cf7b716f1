"""The sampler: turns a step's logits into next tokens, as each request's `SamplingParams` (params.py) ask.

Each row's logits go through the request's processors (logit bias, repetition/presence/frequency penalties,
`min_tokens`, a structured-output grammar's mask), then greedy argmax or seeded sampling. Whatever a client
sent, one row can only fail itself: the sampler reports that row's error and the step goes on for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from splitserve.engine.params import SamplingParams, TokenLogprob
from splitserve.errors import InvalidRequestError

if TYPE_CHECKING:
    from splitserve.engine.request import Request


@dataclass(frozen=True)
class Sampled:
    token_id: int
    logprob: TokenLogprob | None


@dataclass(frozen=True)
class SamplingFailed:
    """This row could not be sampled; its request fails with `message`, the others go on."""

    message: str


def sample(logits: torch.Tensor, requests: list[Request]) -> list[Sampled | SamplingFailed]:
    """Pick one token per row of `logits` ([rows, vocab], fp32) for the request of that row."""
    logits = logits.float()
    # Logprobs are the model's own distribution, before any processor changed it (vLLM's default).
    wanted = {i: row for row, i in enumerate(i for i, r in enumerate(requests) if r.params.logprobs is not None)}
    logp = torch.log_softmax(logits[list(wanted)], dim=-1) if wanted else None
    failed: dict[int, str] = {}
    for i, request in enumerate(requests):
        try:
            _process(logits[i], request)
        except Exception as e:  # a row's failure is that request's alone
            failed[i] = f"sampling failed: {type(e).__name__}: {e}"
    tokens = logits.argmax(dim=-1).tolist()
    if any(not r.params.greedy for r in requests):
        # Per-request generators live on the CPU: sampling there keeps a seed's tokens the same on any device.
        rows = logits.cpu()
        for i, request in enumerate(requests):
            if not request.params.greedy and i not in failed:
                try:
                    tokens[i] = _sample_row(rows[i], request.params, request.generator)
                except Exception as e:
                    failed[i] = f"sampling failed: {type(e).__name__}: {e}"
    out: list[Sampled | SamplingFailed] = []
    for i, request in enumerate(requests):
        if i in failed:
            out.append(SamplingFailed(failed[i]))
            continue
        logprob = None
        if i in wanted:
            row = logp[wanted[i]]
            n = request.params.logprobs
            top = torch.topk(row, n) if n else None
            pairs = tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else ()
            logprob = TokenLogprob(tokens[i], row[tokens[i]].item(), pairs)
        out.append(Sampled(tokens[i], logprob))
    return out


def _process(row: torch.Tensor, request: Request) -> None:
    """Apply the request's logits processors to its row, in place."""
    p = request.params
    if p.logit_bias:
        ids, bias = zip(*p.logit_bias, strict=True)
        row[list(ids)] += torch.tensor(bias, dtype=row.dtype, device=row.device)
    if p.penalized:
        output = torch.tensor(request.output_token_ids, dtype=torch.long, device=row.device)
        counts = torch.bincount(output, minlength=row.shape[-1])[: row.shape[-1]].to(row.dtype)
        if p.repetition_penalty != 1:
            seen = counts > 0
            seen[torch.tensor(request.token_ids[: request.num_prompt_tokens], device=row.device)] = True
            penalized = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            row.copy_(torch.where(seen, penalized, row))
        if p.frequency_penalty or p.presence_penalty:
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    if len(request.output_token_ids) < p.min_tokens:
        banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(request.eos_token_ids))
        if banned:
            row[list(banned)] = float("-inf")
    if request.grammar is not None:
        request.grammar.mask(row)
    if (p.min_tokens or request.grammar is not None or p.logit_bias) and not torch.isfinite(row.max()):
        raise InvalidRequestError("no token is allowed next (the constraints exclude every token)")


def _sample_row(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    # Shift the best logit to 0 before dividing, so no inf - inf (NaN) can appear; a temperature under 1e-6 (which
    # float32 may round to 0) is 1e-6, where the distribution is already greedy to float precision.
    scores = (logits - logits.max()) / max(p.temperature, 1e-6)
    if 0 < p.top_k < scores.shape[-1]:
        kth = torch.topk(scores, p.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if p.top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = sorted_scores.softmax(-1)
        # Drop a token when the tokens more likely than it already reach top_p. The first always stays, even
        # when top_p is below the smallest float32 (1e-300 rounds to 0 there).
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        drop[0] = False
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())
