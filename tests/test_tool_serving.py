"""Tool calling end to end, through the official `openai` client against `serve` (1 prefill + 1 decode):

- `auto` on a model whose template takes tools: a tiny Qwen 2 with Qwen 2.5's template, trained here (ten
  seconds) to answer one question with a Hermes call and another with text, so the parser meets real output;
- forced calls (`required`, a named function) on it, on a tiny random Llama and on the embedded model, sampled
  with several seeds, streamed and whole: every call parses and validates against its function's schema (the
  grammar's work);
- a multi-turn exchange with the calls and their results in the history, and bad tool definitions (400s that
  name the field).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import openai
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from splitserve.launcher import ServeProcess
from splitserve.model.tokenizer import encode_chat, load_tokenizer
from splitserve.router.http import tool_calls
from splitserve.router.http.openai_schema import ChatMessage, Tool
from tests import checkpoints
from tests.test_serving import ENGINE, idle_after  # noqa: F401 (every test leaves the cluster idle)
from tests.test_tool_calls import ADD, HISTORY, QWEN_TEMPLATE, WEATHER

TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PARIS_CALL = {"city": "Paris", "unit": "c"}
# What the tiny model learns to answer (greedy), each question asked with TOOLS.
LESSONS = {
    "Weather in Paris?": f'<tool_call>\n{{"name": "get_weather", "arguments": {json.dumps(PARIS_CALL)}}}\n</tool_call>',
    "Say hi.": "Hi there!",
}
IM_END = 2  # SmolLM2's tokenizer: <|im_end|>, the model's EOS


def _train_to_answer(folder: Path, tokenizer) -> None:
    """A tiny Qwen 2 trained until greedy decoding gives each lesson's answer, every token by a margin."""
    tools = [Tool.model_validate(t) for t in TOOLS]
    data = []
    for question, answer in LESSONS.items():
        conversation, specs = tool_calls.template_input([ChatMessage(role="user", content=question)], tools, True)
        data.append((encode_chat(tokenizer, conversation, specs)[1],
                     [*tokenizer(answer, add_special_tokens=False).input_ids, IM_END]))  # fmt: skip
    config = Qwen2Config(**{**checkpoints.COMMON, "vocab_size": 49152, "eos_token_id": IM_END,
                            "max_position_embeddings": 1024}, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(400):
        loss, learned = torch.zeros(()), True
        for prompt, answer in data:
            hidden = model.model(input_ids=torch.tensor([prompt + answer[:-1]])).last_hidden_state
            logits = model.lm_head(hidden[0, len(prompt) - 1 :])
            loss = loss + torch.nn.functional.cross_entropy(logits, torch.tensor(answer))
            top = logits.topk(2).values
            learned &= bool((logits.argmax(-1) == torch.tensor(answer)).all() and (top[:, 0] - top[:, 1]).min() > 2)
        if learned:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert learned, "the tiny model did not learn its answers"
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def tool_model(smollm2, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-tool-qwen")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2 / name, folder / name)
    (folder / "chat_template.jinja").write_text(QWEN_TEMPLATE.read_text())
    _train_to_answer(folder, load_tokenizer(folder))
    return folder


@pytest.fixture(scope="module")
def server(tool_model):
    s = ServeProcess(tool_model, ["--prefill", "1", "--decode", "1", *ENGINE], 2)
    yield s
    s.stop()


def _client(server: ServeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _ask(client: openai.OpenAI, messages: list[dict], stream: bool, **fields) -> tuple[str | None, list[tuple], str]:
    """(content, calls as (id, name, arguments), finish reason) of one choice, streamed or whole."""
    body = {"model": client.models.list().data[0].id, "messages": messages, "tools": TOOLS, **fields}
    if not stream:
        choice = client.chat.completions.create(**body).choices[0]
        calls = [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls or ()]
        return choice.message.content, calls, choice.finish_reason
    content, calls, finish = None, {}, None
    for chunk in client.chat.completions.create(**body, stream=True):
        delta = chunk.choices[0].delta
        if delta.content:
            content = (content or "") + delta.content
        for d in delta.tool_calls or ():
            if d.id:  # a call's first piece: its id and name
                assert d.index == len(calls) and d.type == "function" and d.function.name
                calls[d.index] = [d.id, d.function.name, ""]
            calls[d.index][2] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content, [tuple(c) for c in calls.values()], finish


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("stream", [False, True])
def test_auto_finds_the_models_call_and_leaves_text_alone(server, stream):
    client = _client(server)
    content, calls, finish = _ask(client, _user("Weather in Paris?"), stream, temperature=0, max_tokens=60)
    assert content is None and finish == "tool_calls"
    assert [(name, json.loads(arguments)) for _, name, arguments in calls] == [("get_weather", PARIS_CALL)]
    assert calls[0][0].startswith("call_")
    assert _ask(client, _user("Say hi."), stream, temperature=0, max_tokens=60) == ("Hi there!", [], "stop")
    # tool_choice none: the model is not told of the tools, and nothing is parsed.
    content, calls, _ = _ask(client, _user("Weather in Paris?"), stream, temperature=0, max_tokens=60,
                             tool_choice="none")  # fmt: skip
    assert calls == [] and "get_weather" not in (content or "")


def _check_forced(client: openai.OpenAI, question: str, seeds: range) -> None:
    """Forced calls, sampled: every call names a tool and its arguments validate against that tool's schema."""
    for seed in seeds:
        for stream in (False, True):
            for choice in ("required", {"type": "function", "function": {"name": "add"}}):
                content, calls, finish = _ask(client, _user(question), stream, tool_choice=choice, seed=seed,
                                              temperature=1.0, max_tokens=120, parallel_tool_calls=False)  # fmt: skip
                assert content is None and finish == "tool_calls" and len(calls) == 1, (choice, calls, finish)
                _, name, arguments = calls[0]
                assert name == "add" or (choice == "required" and name == "get_weather")
                jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_forced_calls_validate_on_a_tiny_model(server):
    _check_forced(_client(server), "What is 12 plus 30?", range(3))  # a question it was not trained on


def test_forced_calls_validate_on_a_tiny_random_model(tiny_chat_llama):
    """A random model, whose template (SmolLM2's) takes no tools: they go into the system message."""
    server = ServeProcess(tiny_chat_llama, ["--prefill", "1", "--decode", "1", *ENGINE], 2)
    try:
        _check_forced(_client(server), "What is 12 plus 30?", range(3))
        server.wait_idle(timeout=5)
    finally:
        server.stop()


@pytest.mark.slow
def test_forced_calls_validate_on_the_embedded_model():
    server = ServeProcess(None, [], num_workers=2)
    try:
        _check_forced(_client(server), "What is 12 plus 30? Or is it sunny in Rome?", range(3))
        server.wait_idle(timeout=5)
    finally:
        server.stop()


def test_a_conversation_with_tool_results(server, tool_model):
    """The history's calls and results reach the model through its template: the prompt the server counts is
    the template's rendering of them, and the next turn, whatever it holds, is well formed."""
    client = _client(server)
    _, calls, _ = _ask(client, _user("Weather in Paris?"), False, temperature=0, max_tokens=60)
    call_id, name, arguments = calls[0]
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    history = [*_user("Weather in Paris?"), {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": call_id, "content": '{"temp": 21}'}]  # fmt: skip
    answer = client.chat.completions.create(model=client.models.list().data[0].id, messages=history, tools=TOOLS,
                                            max_tokens=8, temperature=0)  # fmt: skip
    messages = [ChatMessage.model_validate(m) for m in history]
    conversation, specs = tool_calls.template_input(messages, [Tool.model_validate(t) for t in TOOLS], True)
    text, ids = encode_chat(load_tokenizer(tool_model), conversation, specs)
    assert '<tool_response>\n{"temp": 21}\n</tool_response>' in text and answer.usage.prompt_tokens == len(ids)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The same exchange with several results, forced to call again: still a call that validates.
    _, calls, _ = _ask(client, [*HISTORY, {"role": "tool", "tool_call_id": "call_2", "content": "sunny"}], False,
                       tool_choice="required", temperature=0, max_tokens=120, parallel_tool_calls=False)  # fmt: skip
    jsonschema.validate(json.loads(calls[0][2]), SCHEMAS[calls[0][1]])
    metrics = server.http.get("/metrics").text
    assert 'splitserve_tool_calls_total{outcome="parsed"}' in metrics


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools.0.function.name", "pattern"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
            "tools.0.function.parameters",
            "not a usable JSON Schema",
        ),
        ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "sub"}}}, None, "no tool is named"),
        ({"tool_choice": "required"}, None, "required needs tools"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0", "tool_call_id"),
    ],
)
def test_bad_tool_definitions_are_400s_naming_the_field(server, fields, param, words):
    body = {"model": _client(server).models.list().data[0].id, "messages": _user("hi"), **fields}
    r = server.http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"
    if param:
        assert error["param"] == param and param in error["message"]
