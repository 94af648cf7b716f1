"""The OpenAI request bodies the router accepts (pydantic, strict): every field is typed as OpenAI's API types it
(no `"4"` for an integer, no `true` for a number), bounded by what the engine can take, and a field this server
does not implement is refused by name, never ignored. `null` means the field's default, as in OpenAI's API."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from splitserve.engine.params import RANGES, schema_problem

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
    speculative: bool = True  # false: no speculative decoding for this request (where the server runs it)
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


class FunctionDefinition(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of the arguments object (absent: no arguments)
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _a_json_schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            problem = schema_problem(v)
            if problem:
                raise ValueError(f"not a usable JSON Schema: {problem}")
        return v


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(_Strict):
    """A call the assistant made, as a client sends it back in the conversation's history."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    @field_validator("function")
    @classmethod
    def _json_arguments(cls, v: FunctionCall) -> FunctionCall:
        try:
            json.loads(v.arguments)
        except ValueError:
            raise ValueError("function.arguments must be JSON text") from None
        return v


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None  # a participant's name: the chat template decides whether it shows
    tool_call_id: str | None = None  # a tool message's call: shown to the model as the template does
    tool_calls: list[ToolCall] | None = None  # an assistant message's calls

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls: only assistant messages carry tool calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool_call_id: a tool message names the call it answers")
        return self

    @property
    def text(self) -> str:
        content = self.content
        return "".join(part.text for part in content) if isinstance(content, list) else content or ""


class ChatCompletionRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: _bounded(int, "max_tokens") | None = None
    max_completion_tokens: _bounded(int, "max_tokens") | None = None
    logprobs: bool = False
    top_logprobs: _bounded(int, "logprobs") | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _tools(self) -> ChatCompletionRequest:
        names = [t.function.name for t in self.tools or ()]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"tools: function names must be unique ({', '.join(twice)} more than once)")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice: no tool is named {choice.function.name!r}")
        if choice == "required" and not names:
            raise ValueError("tool_choice: required needs tools")
        if self.forced_tool_call and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format: a forced tool call (tool_choice) already decides the output's form")
        return self

    @property
    def tool_mode(self) -> str | None:
        """How this request's output may hold tool calls: None (no tools, or tool_choice none), "auto",
        "required", or the name of the function it must call."""
        choice = self.tool_choice
        if not self.tools or choice == "none":
            return None
        return choice.function.name if isinstance(choice, NamedToolChoice) else choice or "auto"

    @property
    def forced_tool_call(self) -> bool:
        return self.tool_mode not in (None, "auto")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class RoleChange(_Strict):
    """`POST /admin/workers/{id}/role`: move a worker to the other pool."""

    role: Literal["prefill", "decode"]
