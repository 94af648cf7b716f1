"""The OpenAI request bodies the router accepts (pydantic, strict): every field is typed as OpenAI's API types it
(no `"4"` for an integer, no `true` for a number), bounded by what the engine can take, and a field this server
does not implement is refused by name, never ignored. `null` means the field's default, as in OpenAI's API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from splitserve.engine.params import RANGES

MAX_CHOICES = 64  # prompts x n in one request: bounded, like every queue here


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


def _check_unicode(value: Any, where: str) -> None:
    """Refuse strings that are not Unicode text (a lone surrogate such as "\\ud800" cannot be encoded)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{where or 'a string'} is not valid Unicode (a lone surrogate at {e.start})") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k, where)
            _check_unicode(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_unicode(v, f"{where}.{i}")


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchema(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    schema_: Annotated[dict[str, Any], Field(alias="schema")] = {}
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only then")
        return self


MAX_TEMPERATURE = 2.0  # OpenAI's API cap (the engine itself takes any temperature >= 0)


def _bounded(kind: type, name: str, high: float | None = None):
    """`kind` limited to the sampler's range for parameter `name` (engine/params.py's `RANGES`), or below `high`
    where the API caps it lower."""
    r = RANGES[name]
    return Annotated[kind, Field(**{"gt" if r.open_low else "ge": r.low}, le=r.high if high is None else high)]


TokenId = Annotated[int, Field(ge=0)]


class _Common(_Strict):
    """Fields both endpoints share, OpenAI's and vLLM's extensions (top_k, min_tokens, repetition_penalty,
    stop_token_ids, ignore_eos, return_token_ids)."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: _bounded(float, "temperature", MAX_TEMPERATURE) = 1.0
    top_p: _bounded(float, "top_p") = 1.0
    top_k: _bounded(int, "top_k") = -1  # -1 or 0 turn it off
    seed: _bounded(int, "seed") | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] = []
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    presence_penalty: _bounded(float, "presence_penalty") = 0.0
    frequency_penalty: _bounded(float, "frequency_penalty") = 0.0
    repetition_penalty: _bounded(float, "repetition_penalty") = 1.0
    logit_bias: Annotated[dict[str, _bounded(float, "logit_bias")], Field(max_length=1024)] | None = None
    min_tokens: _bounded(int, "min_tokens") = 0
    ignore_eos: bool = False  # generate max_tokens tokens whatever the model says
    return_token_ids: bool = False  # each choice also carries its token ids
    response_format: ResponseFormat | None = None
    # A conversation's key: its KV stays on the workers for `--cache-ttl` after each turn, and the next turn is
    # routed to it. `user` stands in for it when it is absent (OpenAI uses both to route to a warm cache).
    prompt_cache_key: Annotated[str, Field(max_length=256)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None

    @property
    def cache_key(self) -> str | None:
        return self.prompt_cache_key or self.user

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        _check_unicode(data, "")
        return data

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v and not all(k.isdigit() and len(k) < 10 for k in v):
            raise ValueError("logit_bias keys must be token ids (strings of digits)")
        return v


class CompletionRequest(_Common):
    prompt: str | Annotated[list[int], Field(max_length=1_000_000)] | list[str] | list[list[int]]
    max_tokens: _bounded(int, "max_tokens") = 16
    logprobs: _bounded(int, "logprobs") | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.best_of not in (None, 1) and self.best_of != self.n:
            raise ValueError("best_of: only best_of equal to n is supported")
        if self.suffix:
            raise ValueError("suffix: insertion (suffix) is not supported")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo: echo together with logprobs (prompt logprobs) is not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            return self
        if len(self.prompts()) * self.n > MAX_CHOICES:
            raise ValueError(f"prompt: at most {MAX_CHOICES} choices (prompts x n) per request")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request: one, or a batch (a list of strings or of token-id lists)."""
        p = self.prompt
        return list(p) if isinstance(p, list) and p and isinstance(p[0], (str, list)) else [p]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None  # a participant's name: the chat template decides whether it shows
    tool_call_id: str | None = None  # a tool message's call: shown to the model as the template does

    def as_template_input(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        extra = {"name": self.name, "tool_call_id": self.tool_call_id}
        return {**message, **{k: v for k, v in extra.items() if v is not None}}


class ChatCompletionRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: _bounded(int, "max_tokens") | None = None
    max_completion_tokens: _bounded(int, "max_tokens") | None = None
    logprobs: bool = False
    top_logprobs: _bounded(int, "logprobs") | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # only meaningful with tools, which are refused

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools: tool calling is not supported")
        if self.tool_choice not in (None, "none", "auto"):
            raise ValueError("tool_choice: tool calling is not supported")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class RoleChange(_Strict):
    """`POST /admin/workers/{id}/role`: move a worker to the other pool."""

    role: Literal["prefill", "decode"]
