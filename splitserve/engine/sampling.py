"""The sampler: turns a step's logits into next tokens, as each request's `SamplingParams` (params.py) ask.

Each row's logits go through the request's processors (logit bias, repetition/presence/frequency penalties,
`min_tokens`, a structured-output grammar's mask), then greedy argmax or sampling (seeded where asked), all rows
at once on the logits' device, with no per-row reads. Whatever a client sent, one row can only fail
itself: the sampler reports that row's error and the step goes on for the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from splitserve.engine.params import TokenLogprob
from splitserve.engine.request import Chunk, Request, Sampled, SamplingFailed
from splitserve.errors import InvalidRequestError


def sample(logits: torch.Tensor, requests: list[Request]) -> list[Sampled | SamplingFailed]:
    """Pick one token per row of `logits` ([rows, vocab], fp32) for the request of that row.

    Batched on the logits' device: greedy rows take the argmax, the others one draw for all of them
    (`_sample_rows`). The step waits on the device once, for its tokens; the logprobs, where asked, are copied
    back with them (and top-p checks once whether its candidates suffice)."""
    logits = logits.float()
    # Logprobs are the model's own distribution, before any processor changed it (vLLM's default).
    wanted = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    logp = torch.log_softmax(logits[wanted], dim=-1) if wanted else None
    failed: dict[int, str] = {}
    for i, request in enumerate(requests):
        try:
            _process(logits[i], request)
        except Exception as e:  # a row's failure is that request's alone
            failed[i] = f"sampling failed: {type(e).__name__}: {e}"
    tokens = logits.argmax(dim=-1)
    drawn = [i for i, r in enumerate(requests) if not r.params.greedy and i not in failed]
    if drawn:
        try:
            tokens[drawn] = _sample_rows(logits[drawn], [requests[i] for i in drawn])
        except Exception:  # one row's failure is that request's alone: find it, row by row
            for i in drawn:
                try:
                    tokens[i] = _sample_rows(logits[i : i + 1], [requests[i]])[0]
                except Exception as e:
                    failed[i] = f"sampling failed: {type(e).__name__}: {e}"
    logprobs = _logprobs(logp, tokens[wanted], [requests[i].params.logprobs for i in wanted]) if wanted else []
    token_ids = tokens.tolist()
    logprob_of = dict(zip(wanted, logprobs, strict=True))
    return [
        SamplingFailed(failed[i]) if i in failed else Sampled(token_ids[i], logprob_of.get(i))
        for i in range(len(requests))
    ]


def verify(logits: torch.Tensor, request: Request, draft: Sequence[int]) -> list[Sampled | SamplingFailed]:
    """The request's tokens from the logits of its last token and of its drafted tokens ([len(draft) + 1,
    vocab], engine/speculative.py): row j is sampled as `sample` samples it after the drafted tokens before it
    were taken (penalties, min_tokens, the grammar and a seeded generator see them), until a token differs
    from the draft (that token is the sampler's own, and the last), sampling fails, or the request ends. One
    draw per token returned, as without a draft. A request whose rows no processor changes has them all
    sampled at once (a seeded generator is then set back to one draw per token kept)."""
    if plain(request):  # no processor reads the tokens before a row: every row's token at once
        generator = request.generator
        state = generator.get_state() if generator is not None else None
        rows = [request] * logits.shape[0]
        tokens = (logits.argmax(dim=-1) if request.params.greedy else _sample_rows(logits.float(), rows)).tolist()
        kept = next((j for j, d in enumerate(draft) if tokens[j] != d), len(draft)) + 1
        if state is not None:  # it drew a number per row: leave it having drawn one per token kept
            generator.set_state(state)
            for _ in range(kept):
                request.draw()
        return [Sampled(t, None) for t in tokens[:kept]]
    out: list[Sampled | SamplingFailed] = []
    with request.tentatively() as take:
        for j in range(len(draft) + 1):
            (outcome,) = sample(logits[j : j + 1], [request])
            out.append(outcome)
            if isinstance(outcome, SamplingFailed) or j == len(draft) or outcome.token_id != draft[j]:
                break
            take(outcome)
            if request.finish_reason is not None:
                break
    return out


def _logprobs(logp: torch.Tensor, chosen: torch.Tensor, counts: list[int]) -> list[TokenLogprob]:
    """Each row's chosen token's logprob and its `counts[row]` most likely tokens, batched (a copy per field)."""
    k = max(counts)
    top = torch.topk(logp, k) if k else None
    values = logp.gather(1, chosen[:, None])[:, 0]
    host = [t.tolist() for t in (chosen, values, *((top.indices, top.values) if top is not None else ()))]
    out = []
    for row, n in enumerate(counts):
        pairs = tuple(zip(host[2][row][:n], host[3][row][:n], strict=True)) if n else ()
        out.append(TokenLogprob(host[0][row], host[1][row], pairs))
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


def plain(request: Request) -> bool:
    """Whether `request`'s next token needs none of `_process`'s logits processors, nor logprobs: then a
    captured decode step can draw it (`draw`) without the per-row work of `sample`."""
    p = request.params
    return (
        p.logprobs is None
        and not p.logit_bias
        and not p.penalized
        and request.grammar is None
        and request.num_tokens - request.num_prompt_tokens >= p.min_tokens
    )


def uniforms(requests: list[Request]) -> torch.Tensor:
    """One uniform number per request `[rows, 1]` (CPU) for this step's draw: a seeded request's from its own
    generator, so its tokens are the same in any batch and on any device."""
    uniform = torch.rand(len(requests), 1)
    for i, r in enumerate(requests):
        if r.generator is not None:
            uniform[i] = r.draw()
    return uniform


def draw(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """`sample`'s draw for rows that need no processors, as one fixed sequence of tensor operations with no
    host synchronisation (what a captured decode step runs): the parameters are columns `[rows, 1]`, with
    top_k 0 and top_p inf for none (1.0 could drop a tail token whose cumulative mass rounds to 1). Sorting the
    whole vocabulary replaces `_sample_rows`' data-dependent shortcuts; the tokens are the same for the same
    uniform numbers."""
    scores = _scaled(logits, temperature)
    scores = _top_k(scores, top_k, scores.shape[-1])
    return _pick(_top_p(scores, top_p, shortcut=False), uniform)


def _sample_rows(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """One token per row of `logits` by each request's temperature, top-k and top-p, batched.

    Inverse transform: a uniform number per row (`uniforms`), read against the row's cumulative distribution."""
    vocab, device = logits.shape[-1], logits.device

    def column(values: list[float], dtype: torch.dtype = logits.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)[:, None]

    scores = _scaled(logits, column([r.params.temperature for r in requests]))
    top_k = [r.params.top_k if 0 < r.params.top_k < vocab else 0 for r in requests]
    if any(top_k):
        scores = _top_k(scores, column(top_k, torch.long), max(top_k))
    nucleus = [i for i, r in enumerate(requests) if r.params.top_p < 1]
    if nucleus:
        scores[nucleus] = _top_p(scores[nucleus], column([requests[i].params.top_p for i in nucleus]))
    return _pick(scores, uniforms(requests).to(device, non_blocking=True))


def _scaled(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Logits over each row's temperature. The best logit is shifted to 0 first, so no inf - inf (NaN) can
    appear; a temperature under 1e-6 (which float32 may round to 0) is 1e-6, where the distribution is already
    greedy to float precision."""
    return (logits - logits.max(dim=-1, keepdim=True).values) / temperature.clamp(min=1e-6)


def _top_k(scores: torch.Tensor, top_k: torch.Tensor, k_max: int) -> torch.Tensor:
    """Each row's scores below its `top_k`-th best dropped (-inf); `top_k` a column, 0 for none, at most
    `k_max`."""
    kth = torch.topk(scores, k_max, dim=-1).values.gather(1, (top_k.clamp(min=1) - 1).clamp(max=k_max - 1))
    kth = kth.masked_fill(top_k == 0, float("-inf"))
    return scores.masked_fill(scores < kth, float("-inf"))


def _pick(scores: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Each row's uniform draw (a column) read against its cumulative distribution."""
    cdf = scores.softmax(-1).cumsum(-1)
    picks = torch.searchsorted(cdf, uniform.to(cdf.dtype) * cdf[:, -1:], right=True)[:, 0]
    # A draw past the last cumulative value (rounding) takes the last token that has any probability.
    return torch.minimum(picks, (cdf < cdf[:, -1:]).sum(-1))


def _top_p(scores: torch.Tensor, top_p: torch.Tensor, shortcut: bool = True) -> torch.Tensor:
    """Each row's scores with every token dropped (-inf) once the tokens more likely than it reach `top_p` (a
    column); the first always stays, even when top_p is below the smallest float32 (1e-300 rounds to 0 there).
    The kept tokens lead the row's sorted order, so where the 256 likeliest already reach top_p (the usual case)
    sorting those is enough (`shortcut`, which reads back whether they do); otherwise the whole row is sorted."""
    vocab = scores.shape[-1]
    total = scores.logsumexp(-1, keepdim=True)
    for candidates in dict.fromkeys((min(vocab, 256) if shortcut else vocab, vocab)):
        best, order = torch.topk(scores, candidates, dim=-1)  # sorted, most likely first
        probs = (best - total).exp()
        mass = probs.cumsum(-1)
        if candidates == vocab or bool((mass[:, -1:] >= top_p).all()):
            break
    drop = (mass - probs) >= top_p
    drop[:, 0] = False
    return torch.full_like(scores, float("-inf")).scatter(1, order, best.masked_fill(drop, float("-inf")))


def sample_chunks(logits: torch.Tensor, chunks: list[Chunk]) -> list[tuple[Request, Sampled | SamplingFailed]]:
    """The outcomes of a step's finishing chunks, from their rows' logits in order (a chunk's last token's row,
    then its draft's): one sampled token per chunk without a draft (all in one call), and what `verify` keeps of
    each draft, in the chunks' order."""
    firsts = [0]
    for c in chunks:
        firsts.append(firsts[-1] + 1 + len(c.draft))
    single = [i for i, c in enumerate(chunks) if not c.draft]
    outcomes = dict(zip(single, sample(logits[[firsts[i] for i in single]], [chunks[i].request for i in single]),
                        strict=True))  # fmt: skip
    results = []
    for i, c in enumerate(chunks):
        if c.draft:
            results.extend((c.request, o) for o in verify(logits[firsts[i] : firsts[i + 1]], c.request, c.draft))
        else:
            results.append((c.request, outcomes[i]))
    return results
