"""Every OpenAI/vLLM request field the router accepts does what it says, end to end over HTTP on a real 1P+1D
cluster: penalties, logit_bias, min_tokens, stop_token_ids (each against an independent greedy reference on
transformers' model), n > 1, prompt lists, echo, response_format (every output parsed), and the served model
name. Fields the server does not implement are refused by name (tests/test_serving.py)."""

from __future__ import annotations

import json

import pytest
import torch

from splitserve.launcher import ServeProcess
from tests.helpers import hf_greedy, hf_greedy_processed
from tests.test_serving import ENGINE, complete, sse_events

NAME = "my-served-model"
EOS = 2  # tiny_chat_llama's


@pytest.fixture(scope="module")
def server(tiny_chat_llama):
    s = ServeProcess(tiny_chat_llama, ["--prefill", "1", "--decode", "1", "--served-model-name", NAME, *ENGINE], 2)
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def idle_after(server):
    yield
    server.wait_idle(timeout=5)


PROMPT = [300, 301, 302, 4000, 17, 2500, 999]


def _ids(server, **fields) -> tuple[list[int], str]:
    body = {"model": NAME, "prompt": PROMPT, "temperature": 0, **fields}
    _, ids, finish = complete(server.http, "/v1/completions", body)
    return ids, finish


def test_served_model_name_start_messages_and_access_log(server):
    assert [m["id"] for m in server.http.get("/v1/models").json()["data"]] == [NAME]
    r = server.http.post("/v1/completions", json={"model": "tiny-chat-llama0", "prompt": "hi"})
    assert r.status_code == 404 and NAME in r.json()["error"]["message"]
    logs = server.logs()
    assert f"splitserve router: model tiny-chat-llama0 served as {NAME}, HTTP on {server.url}" in logs
    for role in ("prefill", "decode"):  # each worker says what it runs, where and in which dtype
        assert f"splitserve {role}-" in logs and "on cpu in fp32," in logs
    assert '"POST /v1/completions HTTP/1.1" 404' in logs  # -v: the access log


@pytest.mark.parametrize(
    ("repetition", "frequency", "presence"), [(1.3, 0, 0), (1, 0.7, 0), (1, 0, 0.4), (1.3, 0.7, 0.4)]
)
def test_penalties_equal_a_reference(server, tiny_chat_llama, repetition, frequency, presence):
    # A random model never repeats itself; a logit bias on one token makes it, so the penalties have work to do.
    bias = {1234: 5.0}

    def processed(penalize: bool):
        def process(logits, prompt, output):
            logits[1234] += bias[1234]
            if not penalize:
                return logits
            counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=logits.shape[0]).float()
            seen = counts > 0
            seen[prompt] = True
            logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
            return logits - frequency * counts - presence * (counts > 0).float()

        return hf_greedy_processed(tiny_chat_llama, PROMPT, 16, process, set())

    want = processed(penalize=True)
    assert want != processed(penalize=False), "the penalties change nothing here: the test would prove nothing"
    got, _ = _ids(server, max_tokens=16, ignore_eos=True, repetition_penalty=repetition, frequency_penalty=frequency,
                  presence_penalty=presence, logit_bias={"1234": 5.0}, stream=True)  # fmt: skip
    assert got == want


def test_logit_bias_equals_a_reference(server, tiny_chat_llama):
    bias = {1234: 100.0, 777: 5.0}

    def biased(logits, prompt, output):
        for t, b in bias.items():
            logits[t] += b
        return logits

    want = hf_greedy_processed(tiny_chat_llama, PROMPT, 6, biased, set())
    assert want[0] == 1234
    got, _ = _ids(server, max_tokens=6, ignore_eos=True, logit_bias={str(t): b for t, b in bias.items()})
    assert got == want


def test_stop_token_ids_and_min_tokens(server, tiny_chat_llama):
    plain = hf_greedy(tiny_chat_llama, [PROMPT], [20])[0]
    stop = plain[2]
    got, finish = _ids(server, max_tokens=20, stop_token_ids=[stop])
    assert got == plain[: plain.index(stop) + 1] and finish == "stop"

    def no_stop_yet(logits, prompt, output):
        if len(output) < 12:
            logits[[stop, EOS]] = float("-inf")
        return logits

    want = hf_greedy_processed(tiny_chat_llama, PROMPT, 20, no_stop_yet, {stop, EOS})
    got, _ = _ids(server, max_tokens=20, stop_token_ids=[stop], min_tokens=12, stream=True)
    assert got == want and len(got) >= 12 and stop not in got[:11]


@pytest.mark.parametrize("stream", [False, True])
def test_n_and_prompt_lists(server, tiny_chat_llama, stream):
    prompts = [PROMPT, [5, 6, 7, 8, 9]]
    want = hf_greedy(tiny_chat_llama, prompts, [8, 8])
    body = {"model": NAME, "prompt": prompts, "n": 2, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "stream": stream}  # fmt: skip
    choices = _choices(server, "/v1/completions", body)
    assert sorted(choices) == [0, 1, 2, 3]
    # Choice index = prompt index * n + sample index, as OpenAI numbers them.
    assert [choices[i]["token_ids"] for i in range(4)] == [want[0], want[0], want[1], want[1]]


def test_n_seeded_samples_differ_and_match_single_requests(server):
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 10, "temperature": 1.0, "seed": 41, "n": 3,
            "ignore_eos": True, "return_token_ids": True}  # fmt: skip
    choices = _choices(server, "/v1/completions", body)
    samples = [choices[i]["token_ids"] for i in range(3)]
    assert len({tuple(s) for s in samples}) == 3
    for i in range(3):  # choice i samples with seed + i, as vLLM does
        single = _choices(server, "/v1/completions", {**body, "n": 1, "seed": 41 + i})
        assert single[0]["token_ids"] == samples[i]


def test_chat_n_streams_every_choice(server):
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "n": 3,
            "temperature": 0.8, "seed": 3, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with server.http.stream("POST", "/v1/chat/completions", json=body) as r:
        events = sse_events(r)
    finishes = {c["index"]: c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]}
    assert finishes == {0: "length", 1: "length", 2: "length"}
    assert events[-1]["usage"]["completion_tokens"] == 15


@pytest.mark.parametrize("stream", [False, True])
def test_echo(server, stream):
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0, "echo": True,
            "stream": stream}  # fmt: skip
    text, _, _ = complete(server.http, "/v1/completions", body)
    plain, _, _ = complete(server.http, "/v1/completions", {**body, "echo": False})
    assert text == "Once upon a time" + plain


SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
    "required": ["ok", "color"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_always_parses(server, stream):
    """A random model follows the schema only because the grammar makes it: every output parses and fits."""
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    for seed in range(4):
        body = {"model": NAME, "messages": [{"role": "user", "content": f"Answer {seed}"}], "max_tokens": 40,
                "temperature": 1.0, "seed": seed, "response_format": fmt, "stream": stream}  # fmt: skip
        text, _, finish = complete(server.http, "/v1/chat/completions", body)
        value = json.loads(text)
        assert set(value) == {"ok", "color"} and isinstance(value["ok"], bool) and value["color"] in SCHEMA[
            "properties"]["color"]["enum"]  # fmt: skip
        assert finish == "stop"


def _choices(server, path: str, body: dict) -> dict[int, dict]:
    """Each choice's text (or content), token ids and finish reason, by index, streamed or whole."""
    out: dict[int, dict] = {}
    if not body.get("stream"):
        r = server.http.post(path, json=body)
        assert r.status_code == 200, r.text
        return {c["index"]: c for c in r.json()["choices"]}
    with server.http.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        for event in sse_events(r):
            for c in event["choices"]:
                slot = out.setdefault(c["index"], {"token_ids": [], "finish_reason": None})
                slot["token_ids"] += c.get("token_ids", [])
                slot["finish_reason"] = c["finish_reason"] or slot["finish_reason"]
    return out
