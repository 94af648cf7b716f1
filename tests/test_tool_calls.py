"""Tool calling's parts without a server: the request schema's checks, the prompt (native templates and the
Hermes fallback), the forced-call schemas, and the parsers, fed whole and split at every character."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from splitserve.model.tokenizer import encode_chat, load_tokenizer
from splitserve.router.http import tool_calls
from splitserve.router.http.openai_schema import ChatCompletionRequest, ChatMessage, Tool

QWEN_TEMPLATE = Path(__file__).parent / "templates" / "qwen2.5.jinja"  # Qwen 2.5's chat template (tools: Hermes)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                           "unit": {"enum": ["c", "f"]}},
                          "required": ["city", "unit"]}}}  # fmt: skip
SMALL_INT = {"type": "integer", "minimum": 0, "maximum": 99}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": SMALL_INT, "b": SMALL_INT}, "required": ["a", "b"]}}}  # fmt: skip
TOOLS = [Tool.model_validate(t) for t in (WEATHER, ADD)]
NAMES = frozenset(("get_weather", "add"))


def _run(extractor: tool_calls.CallExtractor, pieces: list[str]) -> tuple[str, list[tool_calls.CallDelta]]:
    content, deltas = [], []
    for piece in pieces:
        text, found = extractor.feed(piece)
        content.append(text)
        deltas += found
    text, found = extractor.finish()
    return "".join(content) + text, deltas + found


def _splits(text: str) -> list[list[str]]:
    """The text whole, one character at a time, and cut in two at every place."""
    return [[text], list(text), *([text[:i], text[i:]] for i in range(1, len(text)))]


def _joined(deltas: list[tool_calls.CallDelta]) -> list[tuple[str, str]]:
    """The calls that streamed deltas add up to, as a client puts them together: (name, arguments)."""
    calls: dict[int, list[str]] = {}
    for d in deltas:
        if d.id is not None:
            assert d.index not in calls and d.name
            calls[d.index] = [d.name, ""]
        calls[d.index][1] += d.arguments
    return [tuple(calls[i]) for i in sorted(calls)]


# --- parsers ---------------------------------------------------------------------------------------------

HERMES = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'


@pytest.mark.parametrize("pieces", _splits(HERMES))
def test_hermes_call_at_any_split(pieces):
    x = tool_calls.HermesExtractor(NAMES)
    content, deltas = _run(x, pieces)
    assert content == "Let me look.\n"
    assert _joined(deltas) == [("get_weather", '{"city": "Paris", "unit": "c"}')]
    assert [(c.name, c.arguments) for c in x.calls] == _joined(deltas) and x.unparsed == 0


@pytest.mark.parametrize("parallel", [True, False])
def test_hermes_several_calls_and_a_list_in_one_block(parallel):
    text = ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n\n'
            '<tool_call>[{"name": "add", "parameters": {"a": 3, "b": 4}}, '
            '{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}]</tool_call>\n')  # fmt: skip
    x = tool_calls.HermesExtractor(NAMES, parallel)
    content, deltas = _run(x, list(text))
    expected = [("add", '{"a": 1, "b": 2}'), ("add", '{"a": 3, "b": 4}'), ("get_weather", '{"city": "Oslo"}')]
    assert content == "" and _joined(deltas) == (expected if parallel else expected[:1])
    assert len({d.id for d in deltas}) == len(deltas)  # every call its own id


@pytest.mark.parametrize(
    ("text", "content", "unparsed"),
    [
        ("No tools needed: <tools> are fine.", "No tools needed: <tools> are fine.", 0),
        ("<tool_call>{not json}</tool_call> after", "<tool_call>{not json}</tool_call> after", 1),
        (
            '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
            '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
            1,
        ),
        (
            '<tool_call>{"name": "add", "arguments": [1]}</tool_call>',
            '<tool_call>{"name": "add", "arguments": [1]}</tool_call>',
            1,
        ),
        ('<tool_call>{"name": ["add"]}</tool_call>', '<tool_call>{"name": ["add"]}</tool_call>', 1),
        ("ends inside <tool_call>{", "ends inside <tool_call>{", 1),
        ("ends with <tool_c", "ends with <tool_c", 0),
    ],
)
def test_hermes_text_that_is_not_a_call_stays_content(text, content, unparsed):
    for pieces in _splits(text):
        x = tool_calls.HermesExtractor(NAMES)
        assert _run(x, pieces) == (content, []) and x.unparsed == unparsed


def test_hermes_block_left_open_at_the_end_is_a_call():
    """Models often stop (EOS) where the closing tag was due."""
    x = tool_calls.HermesExtractor(NAMES)
    content, deltas = _run(x, ['<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'])
    assert content == "" and _joined(deltas) == [("add", '{"a": 1, "b": 2}')]


@pytest.mark.parametrize(
    ("text", "calls"),
    [
        ('{"name": "add", "parameters": {"a": 1, "b": 2}}', [("add", '{"a": 1, "b": 2}')]),
        (
            '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "get_weather", "parameters": '
            '{"city": "Rome"}}',
            [("add", '{"a": 1, "b": 2}'), ("get_weather", '{"city": "Rome"}')],
        ),
    ],
)
def test_llama3_json_calls(text, calls):
    for pieces in _splits(text):
        x = tool_calls.Llama3JsonExtractor(NAMES)
        content, deltas = _run(x, pieces)
        assert content == "" and _joined(deltas) == calls


def test_llama3_json_content_streams_at_once_and_bad_json_is_content():
    x = tool_calls.Llama3JsonExtractor(NAMES)
    assert x.feed(" Hel") == (" Hel", []) and x.feed("lo {") == ("lo {", [])  # not a call: released as it comes
    x = tool_calls.Llama3JsonExtractor(NAMES)
    assert _run(x, ['{"name": "add", "parameters": {"a": 1']) == ('{"name": "add", "parameters": {"a": 1', [])
    assert x.unparsed == 1


def test_forced_list_releases_each_call_as_its_object_closes():
    text = '[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "get_weather", "arguments": {"city": "x"}}]'
    x = tool_calls.ForcedListExtractor(NAMES)
    first_close = text.index("}}") + 2
    released = [i for i in range(len(text)) if x.feed(text[i])[1]]
    assert released == [first_close - 1, len(text) - 2]
    assert [(c.name, c.arguments) for c in x.calls] == [("add", '{"a": 1, "b": 2}'), ("get_weather", '{"city": "x"}')]


def test_named_call_streams_its_arguments():
    x = tool_calls.NamedExtractor(NAMES, name="add")
    content, deltas = _run(x, ["", '{"a', '": 1,', ' "b": 2}'])
    assert content == "" and _joined(deltas) == [("add", '{"a": 1, "b": 2}')] and len(deltas) == 3


# --- forced calls' schemas -------------------------------------------------------------------------------


def test_forced_schemas_accept_calls_and_nothing_else():
    required = tool_calls.forced_schema(TOOLS, "required", parallel=True)
    jsonschema.validate([{"name": "add", "arguments": {"a": 1, "b": 2}}], required)
    jsonschema.validate([{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "get_weather",
                         "arguments": {"city": "Oslo", "unit": "f"}}], required)  # fmt: skip
    for wrong in ([], [{"name": "add", "arguments": {"a": 1}}], [{"name": "sub", "arguments": {"a": 1, "b": 2}}],
                  [{"name": "add", "arguments": {"a": 1, "b": 2}, "x": 1}]):  # fmt: skip
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, required)
    with pytest.raises(jsonschema.ValidationError):  # a list that goes on is cut (greedy models loop)
        jsonschema.validate([{"name": "add", "arguments": {"a": 1, "b": 2}}] * 9, required)
    single = tool_calls.forced_schema(TOOLS, "required", parallel=False)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "add", "arguments": {"a": 1, "b": 2}}] * 2, single)
    assert tool_calls.forced_schema(TOOLS, "add", parallel=True) == ADD["function"]["parameters"]


# --- the request's checks --------------------------------------------------------------------------------


def _request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 **fields})  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "where", "words"),
    [
        (
            {"tools": [{"type": "function", "function": {"name": "has space"}}]},
            ("tools", 0, "function", "name"),
            "should match pattern",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
            ("tools", 0, "function", "parameters"),
            "not a usable JSON Schema",
        ),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, ("tools", 0, "type"), "'function'"),
        ({"tools": [{"type": "function"}]}, ("tools", 0, "function"), "Field required"),
        ({"tools": [ADD, ADD]}, (), "unique (add more than once)"),
        (
            {"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "sub"}}},
            (),
            "tool_choice: no tool is named 'sub'",
        ),
        ({"tool_choice": "required"}, (), "tool_choice: required needs tools"),
        ({"tools": [ADD], "tool_choice": "always"}, ("tool_choice",), "Input should be"),
        (
            {"tools": [ADD], "tool_choice": "required", "response_format": {"type": "json_object"}},
            (),
            "response_format: a forced tool call",
        ),
        ({"messages": [{"role": "tool", "content": "21"}]}, ("messages", 0), "tool_call_id"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, ("messages", 0), "only assistant"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "c", "type": "function", "function": {"name": "add", "arguments": "{a: 1}"}}
                        ],
                    }
                ]
            },
            ("messages", 0, "tool_calls", 0, "function"),
            "JSON text",
        ),
    ],
)
def test_bad_tool_fields_are_refused_by_name(fields, where, words):
    with pytest.raises(ValidationError) as e:
        _request(**fields)
    errors = e.value.errors()
    assert any(tuple(err["loc"][: len(where)]) == where and words in err["msg"] for err in errors), errors


def test_tool_modes():
    assert _request().tool_mode is None and _request(tools=[ADD], tool_choice="none").tool_mode is None
    assert _request(tools=[ADD]).tool_mode == "auto" and not _request(tools=[ADD]).forced_tool_call
    assert _request(tools=[ADD], tool_choice="required").tool_mode == "required"
    named = _request(tools=[ADD], tool_choice={"type": "function", "function": {"name": "add"}})
    assert named.tool_mode == "add" and named.forced_tool_call


# --- the prompt ------------------------------------------------------------------------------------------

HISTORY = [
    {"role": "user", "content": "Weather in Oslo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": -3}'},
]


def test_templates_that_take_tools_render_them_and_the_history(smollm2, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((smollm2 / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text(QWEN_TEMPLATE.read_text())
    tokenizer = load_tokenizer(tmp_path)
    assert tool_calls.template_takes_tools(tokenizer.chat_template)
    assert tool_calls.parser_name(tokenizer.chat_template) == "hermes"
    messages = [ChatMessage.model_validate(m) for m in HISTORY]
    conversation, specs = tool_calls.template_input(messages, TOOLS, native=True)
    text, _ = encode_chat(tokenizer, conversation, specs)
    assert json.dumps(WEATHER) in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>' in text
    assert '<|im_start|>user\n<tool_response>\n{"temp": -3}\n</tool_response><|im_end|>' in text
    assert text.endswith("<|im_start|>assistant\n")


def test_templates_without_tools_get_them_in_the_system_message(smollm2):
    """SmolLM2's template knows nothing of tools: they, the calls and the results are written into messages."""
    tokenizer = load_tokenizer(smollm2)
    assert not tool_calls.template_takes_tools(tokenizer.chat_template)
    messages = [ChatMessage.model_validate(m) for m in HISTORY]
    conversation, specs = tool_calls.template_input(messages, TOOLS, native=False)
    assert specs is None and [m["role"] for m in conversation] == ["system", "user", "assistant", "user"]
    text, _ = encode_chat(tokenizer, conversation)
    assert text.startswith("<|im_start|>system\n# Tools\n") and '"name": "add"' in text
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n</tool_call>'
    assert f"<|im_start|>assistant\n{call}<|im_end|>" in text
    assert '<|im_start|>user\n<tool_response>\n{"temp": -3}\n</tool_response><|im_end|>' in text
    # Without tools, only the history is rewritten; a system message keeps its text, the tools after it.
    conversation, _ = tool_calls.template_input([ChatMessage(role="system", content="Be brief."), *messages[:1]],
                                                TOOLS, native=False)  # fmt: skip
    assert conversation[0]["content"].startswith("Be brief.\n\n# Tools")


FRAGMENTS = ["<tool_call>", "</tool_call>", "<tool_", '{"name": "add", "arguments": {"a": 1, "b": 2}}', '"name"',
             "[", "]", "{", "}", ", ", "\n", "text", "<|python_tag|>", ";", '{"name": ["add"]}', "ü"]  # fmt: skip


PARSERS = [tool_calls.HermesExtractor, tool_calls.Llama3JsonExtractor, tool_calls.ForcedListExtractor]


@given(st.lists(st.sampled_from(FRAGMENTS), max_size=12), st.lists(st.integers(0, 400), max_size=6),
       st.sampled_from(PARSERS))  # fmt: skip
@settings(max_examples=400, deadline=None)
def test_any_text_in_any_pieces_parses_as_it_does_whole(fragments, cuts, kind):
    """Whatever the model writes, however it is split into releases: no parser raises, and streaming gives the
    content and calls of the whole text (a parser decides only from what it has seen)."""
    text = "".join(fragments)
    bounds = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]
    whole, streamed = kind(NAMES), kind(NAMES)
    assert _run(streamed, pieces)[0] == _run(whole, [text])[0]
    assert [(c.name, c.arguments) for c in streamed.calls] == [(c.name, c.arguments) for c in whole.calls]
