"""OpenAI tool calling on any chat model: the tools put into the prompt, the grammar that forces a call, and
the parsers that find the calls in what the model writes, whole or as it streams.

- **The prompt.** A chat template that takes `tools` (Qwen, Llama 3.1+, Hermes, ...) renders them, and the
  assistant's earlier calls and the tools' results, its own way. Otherwise (SmolLM2's template, for one) the
  tools go into the system message in the Hermes format, earlier calls into the assistant's text as
  `<tool_call>` blocks and results into user turns as `<tool_response>` blocks.
- **Forced calls.** `tool_choice` `required` or a named function constrains the output with a JSON schema
  (the grammar engine of `response_format`): a list of `{"name", "arguments"}` calls, or the named function's
  arguments object. So even a model too weak to follow the format writes calls that parse and validate.
- **Calls the model chooses** (`auto`) are parsed from its text: Hermes/Qwen `<tool_call>{...}</tool_call>`
  (one call, or a list of them, per block) or Llama 3's JSON (`{"name": ..., "parameters": ...}`, `;` between
  calls). Text that looks like a call but is not one (bad JSON, a function no tool names) stays content.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from splitserve.router.http.openai_schema import ChatMessage, Tool
from splitserve.router.http.output import overlap

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
MAX_FORCED_CALLS = 8  # calls in one answer to tool_choice required
_PYTHON_TAG = "<|python_tag|>"


# --- the prompt ------------------------------------------------------------------------------------------


def template_takes_tools(template: str | None) -> bool:
    """Whether a chat template renders a `tools` argument (it names the variable)."""
    return template is not None and "tools" in template


def parser_name(template: str | None, choice: str = "auto") -> str:
    """The parser for a model's calls: `choice` (`--tool-call-parser`), or the format its template teaches."""
    if choice != "auto":
        return choice
    return "llama3_json" if template is not None and _PYTHON_TAG in template else "hermes"


def template_input(messages: Sequence[ChatMessage], tools: Sequence[Tool] | None, native: bool
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:  # fmt: skip
    """The conversation and tools as `apply_chat_template` takes them: for a template that renders tools
    (`native`) as it expects them, otherwise written into the messages (the tools, `None`, in the system
    message)."""
    specs = [t.model_dump(exclude_none=True) for t in tools or ()]
    if native:
        return [_native(m) for m in messages], specs or None
    conversation: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "tool":
            response = f"<tool_response>\n{m.text}\n</tool_response>"
            if conversation and conversation[-1].get("tool_results"):
                conversation[-1]["content"] += "\n" + response  # one user turn for a run of results
            else:
                conversation.append({"role": "user", "content": response, "tool_results": True})
            continue
        message = _plain(m)
        if m.tool_calls:
            blocks = [_block(c.function.name, json.loads(c.function.arguments)) for c in m.tool_calls]
            message["content"] = "\n".join([message["content"], *blocks] if message["content"] else blocks)
        conversation.append(message)
    for message in conversation:
        message.pop("tool_results", None)
    if specs:
        if conversation and conversation[0]["role"] == "system":
            conversation[0]["content"] += "\n\n" + _tools_prompt(specs)
        else:
            conversation.insert(0, {"role": "system", "content": _tools_prompt(specs)})
    return conversation, None


def _block(name: str, arguments: dict[str, Any]) -> str:
    return f"{_OPEN}\n{json.dumps({'name': name, 'arguments': arguments})}\n{_CLOSE}"


def _plain(m: ChatMessage) -> dict[str, Any]:
    message = {"role": "system" if m.role == "developer" else m.role, "content": m.text}
    return {**message, **({"name": m.name} if m.name is not None else {})}


def _native(m: ChatMessage) -> dict[str, Any]:
    message = _plain(m)
    if m.tool_call_id is not None:
        message["tool_call_id"] = m.tool_call_id
    if m.tool_calls:  # templates index the arguments as a mapping (vLLM and transformers pass them so)
        message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.function.name, "arguments": json.loads(c.function.arguments)}} for c in m.tool_calls]  # fmt: skip
    return message


def _tools_prompt(specs: list[dict[str, Any]]) -> str:
    """Hermes' function-calling system prompt (what Qwen 2.5's template writes)."""
    listed = "\n".join(json.dumps(s) for s in specs)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n" + listed
            + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
            "<args-json-object>}\n</tool_call>")  # fmt: skip


# --- forced calls ----------------------------------------------------------------------------------------


def forced_schema(tools: Sequence[Tool], mode: str, parallel: bool) -> dict[str, Any]:
    """The JSON schema of the output when a call is forced: `mode` is "required" or a function's name."""
    if mode != "required":
        function = next(t.function for t in tools if t.function.name == mode)
        return _parameters(function.parameters)
    calls = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                               "arguments": _parameters(t.function.parameters)},
              "required": ["name", "arguments"], "additionalProperties": False} for t in tools]  # fmt: skip
    # At most MAX_FORCED_CALLS: a model that would go on listing calls (greedy ones loop) stops there.
    return {"type": "array", "items": {"anyOf": calls}, "minItems": 1, "maxItems": MAX_FORCED_CALLS if parallel else 1}


def _parameters(schema: dict[str, Any] | None) -> dict[str, Any]:
    return schema if schema is not None else {"type": "object", "properties": {}}


# --- calls in the output ---------------------------------------------------------------------------------


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class CallDelta:
    """A piece of a streamed call, as one entry of OpenAI's `delta.tool_calls`: the first piece of a call
    carries its id and name, the rest more of its arguments."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None

    def as_openai(self) -> dict[str, Any]:
        function = {"name": self.name, "arguments": self.arguments} if self.name else {"arguments": self.arguments}
        head = {"id": self.id, "type": "function"} if self.id else {}
        return {"index": self.index, **head, "function": function}


Output = tuple[str, list[CallDelta]]  # content released, call pieces


@dataclass
class CallExtractor:
    """One choice's text, as it is released, turned into content and tool calls."""

    names: frozenset[str]  # the tools' functions: a call to another is not a call
    parallel: bool = True  # False: the first call only
    calls: list[ToolCall] = field(default_factory=list)
    unparsed: int = 0  # text that looked like a call but was not one

    def feed(self, text: str) -> Output:
        raise NotImplementedError

    def finish(self) -> Output:
        """The output ended: what was held back."""
        raise NotImplementedError

    def _found(self, found: list[tuple[str, str]] | None, raw: str) -> Output:
        """Calls parsed from `raw` (None: it was not calls, so it is content)."""
        if found is None:
            self.unparsed += 1
            return raw, []
        deltas = []
        for name, arguments in found:
            if self.calls and not self.parallel:
                break
            call = ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, arguments)
            deltas.append(CallDelta(len(self.calls), arguments, call.id, name))
            self.calls.append(call)
        return "", deltas

    def _parse(self, text: str) -> list[tuple[str, str]] | None:
        """(name, arguments) of the call, or list of calls, that `text` is as JSON; None if it is not."""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        calls = value if isinstance(value, list) else [value]
        out = []
        for c in calls:
            if not isinstance(c, dict) or not isinstance(c.get("name"), str) or c["name"] not in self.names:
                return None
            arguments = c.get("arguments", c.get("parameters", {}))
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except ValueError:
                    return None
            if not isinstance(arguments, dict):
                return None
            out.append((c["name"], json.dumps(arguments, ensure_ascii=False)))
        return out or None


@dataclass
class HermesExtractor(CallExtractor):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (a list of calls in one block too);
    the text around them is content (only space between calls is dropped)."""

    _held: str = ""
    _inside: bool = False

    def feed(self, text: str) -> Output:
        self._held += text
        content, deltas = [], []
        while True:
            if self._inside:
                end = self._held.find(_CLOSE)
                if end < 0:
                    break
                body, self._held, self._inside = self._held[:end], self._held[end + len(_CLOSE) :], False
                text, found = self._found(self._parse(body), _OPEN + body + _CLOSE)
                content.append(text)
                deltas += found
                continue
            start = self._held.find(_OPEN)
            cut = start if start >= 0 else len(self._held) - overlap(self._held, _OPEN)
            content.append(self._content(self._held[:cut]))
            if start < 0:
                self._held = self._held[cut:]
                break
            self._held, self._inside = self._held[start + len(_OPEN) :], True
        return "".join(content), deltas

    def finish(self) -> Output:
        held, self._held = self._held, ""
        if not self._inside:
            return self._content(held), []
        self._inside = False  # an unclosed block: the model ended (EOS) where the closing tag was due
        return self._found(self._parse(held), _OPEN + held)

    def _content(self, text: str) -> str:
        """Text outside the blocks: space between or after calls is dropped."""
        return "" if self.calls and not text.strip() else text


@dataclass
class Llama3JsonExtractor(CallExtractor):
    """Llama 3's calls: the whole output is JSON objects with `name` and `parameters` (`;` between them),
    after `<|python_tag|>` or not. An output that starts otherwise is content, streamed as it comes."""

    _held: str = ""
    _content_only: bool = False

    def feed(self, text: str) -> Output:
        if self._content_only:
            return text, []
        self._held += text
        start = self._held.lstrip().removeprefix(_PYTHON_TAG).lstrip()
        if not start or start[0] == "{" or _PYTHON_TAG.startswith(self._held.lstrip()):
            return "", []  # could still be a call: held until the end
        self._content_only = True
        held, self._held = self._held, ""
        return held, []

    def finish(self) -> Output:
        held, self._held = self._held, ""
        if self._content_only or not held.strip():
            return held, []
        body = held.strip().removeprefix(_PYTHON_TAG)
        parts = [self._parse(p) for p in body.split(";") if p.strip()]
        found = None if not parts or None in parts else [c for p in parts for c in p]
        return self._found(found, held)


@dataclass
class ForcedListExtractor(CallExtractor):
    """`tool_choice: required`: the output is a JSON list of `{"name", "arguments"}` calls (the grammar
    makes it so); each call is released as soon as its object is complete."""

    _text: str = ""
    _pos: int = 0  # where the next call's object starts, or before it (space, "[" or ",")

    def feed(self, text: str) -> Output:
        self._text += text
        deltas: list[CallDelta] = []
        decoder = json.JSONDecoder()
        while "}" in text:
            pos = self._pos
            while pos < len(self._text) and self._text[pos] in " \n\t[,":
                pos += 1
            try:
                value, end = decoder.raw_decode(self._text, pos)
            except ValueError:
                break
            self._pos = end
            deltas += self._found(self._parse(json.dumps(value)), "")[1]
        return "", deltas

    def finish(self) -> Output:
        return "", []


@dataclass
class NamedExtractor(CallExtractor):
    """`tool_choice` naming a function: the output is its arguments object, streamed as it is written."""

    name: str = ""

    def feed(self, text: str) -> Output:
        if not text:
            return "", []
        if not self.calls:
            call = ToolCall(f"call_{uuid.uuid4().hex[:24]}", self.name, text)
            self.calls.append(call)
            return "", [CallDelta(0, text, call.id, self.name)]
        self.calls[0].arguments += text
        return "", [CallDelta(0, text)]

    def finish(self) -> Output:
        return "", []


def extractor(tools: Sequence[Tool], mode: str, parallel: bool, parser: str) -> CallExtractor:
    """The extractor for one choice of a request whose tool mode (`ChatCompletionRequest.tool_mode`) is `mode`."""
    names = frozenset(t.function.name for t in tools)
    if mode == "required":
        return ForcedListExtractor(names, parallel)
    if mode != "auto":
        return NamedExtractor(names, name=mode)
    return (Llama3JsonExtractor if parser == "llama3_json" else HermesExtractor)(names, parallel)
