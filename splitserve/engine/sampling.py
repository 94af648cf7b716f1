"""Sampling parameters, and the sampler that turns a step's logits into next tokens.

Each row's logits go through the request's processors (logit bias, repetition/presence/frequency penalties,
`min_tokens`, a structured-output grammar's mask), then greedy argmax or seeded sampling. Whatever a client
sent, one row can only fail itself: the sampler reports that row's error and the step goes on for the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from splitserve.errors import InvalidRequestError

if TYPE_CHECKING:
    from splitserve.engine.request import Request

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class StructuredOutput:
    """Constrain the output to JSON: any JSON object (`json_object`) or one matching `schema` (`json_schema`,
    the schema as JSON text)."""

    kind: Literal["json_object", "json_schema"]
    schema: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("json_object", "json_schema"):
            raise InvalidRequestError(f"structured output kind must be json_object or json_schema, got {self.kind!r}")
        if (self.kind == "json_schema") != (self.schema is not None):
            raise InvalidRequestError("a json_schema structured output needs its schema (and json_object none)")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token, and when to stop. temperature 0 means greedy."""

    max_tokens: int = 16
    min_tokens: int = 0  # EOS and stop_token_ids cannot be sampled before this many output tokens
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): no top-k filter
    seed: int | None = None  # makes this request's samples reproducible (a signed 64-bit integer)
    presence_penalty: float = 0.0  # subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and output (CTRL's rule)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; n >= 0: chosen token's logprob and the n most likely
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        def check(ok: bool, message: str, param: str) -> None:
            if not ok:
                raise InvalidRequestError(message, param=param)

        def integer(name: str) -> int:
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an integer", name)
            return value

        def number(name: str) -> float:
            """The field as a float (an integer too large for one is refused, not an error in a step)."""
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            try:
                as_float = float(value) if ok else math.nan
            except OverflowError:
                as_float = math.nan
            check(math.isfinite(as_float), f"{name} must be a finite number, got {value!r}", name)
            object.__setattr__(self, name, as_float)
            return as_float

        check(integer("max_tokens") >= 1, f"max_tokens must be >= 1, got {self.max_tokens}", "max_tokens")
        check(
            0 <= integer("min_tokens") <= self.max_tokens,
            f"min_tokens must be in [0, max_tokens], got {self.min_tokens}",
            "min_tokens",
        )
        check(number("temperature") >= 0, f"temperature must be >= 0, got {self.temperature}", "temperature")
        check(0 < number("top_p") <= 1, f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        check(integer("top_k") >= -1, f"top_k must be -1 (off) or >= 0, got {self.top_k}", "top_k")
        if self.seed is not None:
            check(INT64_MIN <= integer("seed") <= INT64_MAX, "seed must be a signed 64-bit integer", "seed")
        for name in ("presence_penalty", "frequency_penalty"):
            check(-2 <= number(name) <= 2, f"{name} must be in [-2, 2], got {getattr(self, name)}", name)
        check(
            0.01 <= number("repetition_penalty") <= 2,
            f"repetition_penalty must be in [0.01, 2], got {self.repetition_penalty}",
            "repetition_penalty",
        )
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in self.logit_bias))
        check(
            all(-100 <= b <= 100 for _, b in self.logit_bias),
            "logit_bias values must be in [-100, 100]",
            "logit_bias",
        )
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.logprobs is not None:
            check(
                0 <= integer("logprobs") <= MAX_LOGPROBS,
                f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}",
                "logprobs",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)

    def token_ids(self) -> list[int]:
        """Every token id these parameters name (to check against the vocabulary)."""
        return [*self.stop_token_ids, *(t for t, _ in self.logit_bias)]


@dataclass(frozen=True)
class TokenLogprob:
    """The sampled token's log-probability under the model, and the most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


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
