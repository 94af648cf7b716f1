"""What a request asks for: `SamplingParams` (validated on construction, whoever builds them: the HTTP schema,
the `LLM` API, a message off the wire), structured-output constraints, the logprobs a token carries back, and
the checks of a prompt and its parameters against a model's limits. Free of torch and of the engine, so that
the router, which builds, checks and relays them, never loads the engine."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal

from splitserve.errors import InvalidRequestError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class Range:
    """A sampling parameter's allowed values: [low, high] (None: unbounded), or (low, high] when `open_low`."""

    low: float
    high: float | None = None
    open_low: bool = False

    def problem(self, name: str, value: float) -> str | None:
        """Why `value` is out of range, or None."""
        if self.open_low and not (self.low < value and (self.high is None or value <= self.high)):
            return f"{name} must be in ({self.low:g}, {self.high:g}], got {value}"
        if value < self.low:
            return f"{name} must be >= {self.low:g}, got {value}"
        if self.high is not None and value > self.high:
            return f"{name} must be <= {self.high:g}, got {value}"
        return None


# Every bounded sampling parameter's range: `SamplingParams` checks them, the HTTP schema (router/http/openai_schema.py)
# declares them, from here alike.
RANGES = {
    "max_tokens": Range(1),
    "min_tokens": Range(0),  # and at most max_tokens
    "temperature": Range(0),  # the HTTP API caps it at 2, as OpenAI's does
    "top_p": Range(0, 1, open_low=True),
    "top_k": Range(-1),  # -1 (or 0): off
    "seed": Range(INT64_MIN, INT64_MAX),
    "presence_penalty": Range(-2, 2),
    "frequency_penalty": Range(-2, 2),
    "repetition_penalty": Range(0.01, 2),
    "logit_bias": Range(-100, 100),  # each bias
    "logprobs": Range(0, MAX_LOGPROBS),
}


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

    def check(self) -> None:
        """Refuse a schema that is not a JSON Schema (InvalidRequestError), without compiling its grammar: what
        the router checks (the grammar engine imports torch; a worker compiles the grammar, and refuses a
        schema it cannot follow as invalid too)."""
        if self.schema is None:
            return
        try:
            problem = schema_problem(json.loads(self.schema))
        except ValueError as e:
            problem = str(e)
        if problem:
            raise InvalidRequestError(f"response_format: unusable JSON schema: {problem}", "response_format")


def schema_problem(schema: object) -> str | None:
    """Why `schema` (parsed JSON) is not a JSON Schema, or None."""
    import jsonschema

    if not isinstance(schema, (dict, bool)):
        return "a JSON schema is an object"
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        return e.message
    return None


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
    speculative: bool = True  # False: this request never proposes drafted tokens (--speculative)

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

        def bounded(name: str, value: float) -> None:
            problem = RANGES[name].problem(name, value)
            check(problem is None, problem or "", name)

        for name in ("max_tokens", "min_tokens", "top_k"):
            bounded(name, integer(name))
        check(self.min_tokens <= self.max_tokens, f"min_tokens must be at most max_tokens, got {self.min_tokens}",
              "min_tokens")  # fmt: skip
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            bounded(name, number(name))
        for name in ("seed", "logprobs"):
            if getattr(self, name) is not None:
                bounded(name, integer(name))
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in self.logit_bias))
        for _, bias in self.logit_bias:
            bounded("logit_bias", bias)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

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


def check_prompt(prompt_token_ids: list[int], max_model_len: int, vocab_size: int) -> None:
    """Raise InvalidRequestError unless the prompt is non-empty, in the vocabulary, and leaves room in the
    context for at least one generated token."""
    n = len(prompt_token_ids)
    if not n:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    if n >= max_model_len:
        raise InvalidRequestError(
            f"the prompt has {n} tokens; this model's context holds {max_model_len} "
            "(prompt and at least one generated token)",
            param="prompt",
            code="context_length_exceeded",
        )
    if any(not 0 <= t < vocab_size for t in prompt_token_ids):
        raise InvalidRequestError(f"prompt token ids must be in [0, {vocab_size})", param="prompt")


def check_params(params: SamplingParams, vocab_size: int) -> None:
    """Raise InvalidRequestError unless every token id the parameters name is in the vocabulary."""
    if any(not 0 <= t < vocab_size for t in params.token_ids()):
        raise InvalidRequestError(f"token ids in stop_token_ids and logit_bias must be in [0, {vocab_size})")
