"""Nothing a client sends can hurt another request: property-based tests throw random sampling parameters at
the engine and random JSON at both HTTP endpoints; a sampler that fails on one row fails that request alone;
a bug met while placing one request fails that request, not the queue behind it. Afterwards the engine and the
cluster answer a normal request correctly, with no page leaked."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitserve.decode.engine import DecodeEngine
from splitserve.engine import sampling
from splitserve.engine.config import EngineConfig
from splitserve.engine.params import SamplingParams, StructuredOutput, check_params
from splitserve.engine.request import EngineRequest
from splitserve.errors import InvalidRequestError
from splitserve.kv_transfer.messages import CompatKey
from splitserve.launcher import ServeProcess
from splitserve.prefill.engine import PrefillEngine
from splitserve.protocol import KvStats, Load, Role, WorkerInfo
from splitserve.router.cluster.cluster import Cluster
from splitserve.router.cluster.jobs import ErrorEvent
from splitserve.router.cluster.membership import Worker
from splitserve.router.cluster.options import RouterOptions
from tests.helpers import hf_greedy
from tests.test_serving import ENGINE

PROMPT = [11, 12, 13, 14, 15]

# Numbers a client could send, the nasty ones included.
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1e-300, 5e-324, -0.0, 1e-8, 1e-5, 0.01, 2.0, 1e300]),
    st.integers(min_value=-(2**70), max_value=2**70),
)
integers = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([0, 1, -1, 2**63 - 1]))


@st.composite
def sampling_kwargs(draw) -> dict:
    kwargs = {}
    for name, strategy in [
        ("max_tokens", st.integers(min_value=-2, max_value=12)),
        ("min_tokens", st.integers(min_value=-1, max_value=12)),
        ("temperature", numbers),
        ("top_p", numbers),
        ("top_k", integers),
        ("seed", st.one_of(st.none(), integers)),
        ("presence_penalty", numbers),
        ("frequency_penalty", numbers),
        ("repetition_penalty", numbers),
        ("logit_bias", st.lists(st.tuples(st.integers(-5, 400), numbers), max_size=3)),
        ("stop_token_ids", st.lists(st.integers(-5, 400), max_size=3)),
        ("ignore_eos", st.booleans()),
        ("logprobs", st.one_of(st.none(), st.integers(-2, 25))),
    ]:
        if draw(st.booleans()):
            kwargs[name] = draw(strategy)
    return kwargs


@pytest.fixture(scope="module")
def engine(tiny_llama_gqa) -> DecodeEngine:
    return DecodeEngine(EngineConfig(model=str(tiny_llama_gqa), dtype="fp32", page_size=4, max_num_seqs=8))


@pytest.fixture(scope="module")
def greedy_reference(tiny_llama_gqa) -> list[int]:
    return hf_greedy(tiny_llama_gqa, [PROMPT], [8])[0]


def _run(engine: DecodeEngine, requests: dict[str, SamplingParams]) -> dict[str, tuple[list[int], str]]:
    for request_id, params in requests.items():
        engine.add_request(EngineRequest(request_id, PROMPT, params))
    out: dict[str, list[int]] = {r: [] for r in requests}
    finish: dict[str, str] = {}
    for _ in range(200):
        if not engine.has_unfinished():
            break
        for u in engine.step():
            if u.finish_reason != "error":
                out[u.request_id].append(u.token_id)
            if u.finish_reason is not None:
                finish[u.request_id] = u.finish_reason
    assert not engine.has_unfinished(), "the engine did not finish"
    return {r: (out[r], finish[r]) for r in requests}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(sampling_kwargs(), min_size=1, max_size=4))
def test_random_sampling_params_never_break_the_engine(engine, greedy_reference, batch):
    """Each parameter set is refused with InvalidRequestError, or runs to the end; a greedy request sharing
    the batch comes out exactly as transformers' greedy output."""
    requests = {}
    for i, kwargs in enumerate(batch):
        try:
            params = SamplingParams(**kwargs)
            check_params(params, engine.model_config.vocab_size)
        except InvalidRequestError:
            continue
        requests[f"r{i}"] = params
    requests["greedy"] = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    results = _run(engine, requests)
    assert results["greedy"] == (greedy_reference, "length")
    for request_id, (tokens, finish) in results.items():
        assert finish in ("stop", "length"), (request_id, requests[request_id], finish)
        assert all(0 <= t < engine.model_config.vocab_size for t in tokens)
    assert engine.allocator.num_free == engine.allocator.capacity


def test_a_failing_row_fails_its_request_alone(engine, greedy_reference, monkeypatch):
    real = sampling._sample_rows

    def flaky(logits, requests):  # fails any batch with the bad request in it
        if any(r.params.seed == 666 for r in requests):
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, requests)

    monkeypatch.setattr(sampling, "_sample_rows", flaky)
    bad = SamplingParams(max_tokens=8, temperature=1.0, seed=666)
    good = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    drawn = SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)  # sampled in the bad one's batch

    def run(requests: dict[str, SamplingParams]) -> list:
        for request_id, params in requests.items():
            engine.add_request(EngineRequest(request_id, PROMPT, params))
        updates = []
        while engine.has_unfinished():
            updates += engine.step()
        return updates

    updates = run({"bad": bad, "good": good, "drawn": drawn})
    [failed] = [u for u in updates if u.request_id == "bad"]
    assert failed.finish_reason == "error" and "probability tensor" in failed.error
    assert [u.token_id for u in updates if u.request_id == "good"] == greedy_reference
    alone = [u.token_id for u in run({"alone": drawn}) if u.request_id == "alone"]
    assert [u.token_id for u in updates if u.request_id == "drawn"] == alone and len(alone) == 8
    assert engine.allocator.num_free == engine.allocator.capacity


def test_a_failing_row_in_prefill_frees_its_pages(tiny_llama_gqa, monkeypatch):
    monkeypatch.setattr(sampling, "_sample_rows", lambda *a: 1 / 0)
    prefill = PrefillEngine(EngineConfig(model=str(tiny_llama_gqa), dtype="fp32", page_size=4))
    prefill.add_request(EngineRequest("bad", PROMPT, SamplingParams(temperature=1.0)))
    prefill.add_request(EngineRequest("good", PROMPT, SamplingParams(temperature=0)))
    done = {d.request.request_id: d for d in prefill.step()}
    assert done["bad"].error and "ZeroDivisionError" in done["bad"].error and done["good"].error is None
    prefill.release("good")
    assert prefill.allocator.num_free == prefill.allocator.capacity


def test_extreme_temperatures_and_top_p_sample_like_greedy(engine, greedy_reference):
    """1e-300 used to divide the logits into inf - inf = NaN, or round top_p to 0 in float32 and drop every token."""
    requests = {
        "t": SamplingParams(max_tokens=8, temperature=1e-300, seed=1, ignore_eos=True),
        "p": SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-300, seed=2, ignore_eos=True),
        "sub": SamplingParams(max_tokens=8, temperature=5e-324, top_p=5e-324, ignore_eos=True),
    }
    for tokens, finish in _run(engine, requests).values():
        assert (tokens, finish) == (greedy_reference, "length")


def test_bad_schema_is_refused_by_the_engine(engine, tiny_chat_llama):
    with pytest.raises(InvalidRequestError, match="no tokenizer"):
        engine.add_request(EngineRequest("x", PROMPT, SamplingParams(structured=StructuredOutput("json_object"))))
    chat_engine = DecodeEngine(EngineConfig(model=str(tiny_chat_llama), dtype="fp32", page_size=4))
    for schema in ['{"type": 5}', "[1, 2]", "not json"]:
        with pytest.raises(InvalidRequestError, match="response_format: unusable JSON schema"):
            chat_engine.add_request(
                EngineRequest("x", PROMPT, SamplingParams(structured=StructuredOutput("json_schema", schema)))
            )
    assert not engine.has_unfinished() and not chat_engine.has_unfinished()


# --- the HTTP endpoints ------------------------------------------------------------------------------------

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers.filter(lambda x: x == x and abs(x) != float("inf")),
              st.text(max_size=20)),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children,
                                                                                max_size=4)),
    max_leaves=12,
)  # fmt: skip
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "seed", "stop", "stop_token_ids", "n", "presence_penalty", "frequency_penalty", "repetition_penalty",
          "logit_bias", "min_tokens", "ignore_eos", "return_token_ids", "response_format", "logprobs",
          "top_logprobs", "echo", "stream", "stream_options", "tools", "tool_choice", "user", "best_of"]  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_chat_llama):
    s = ServeProcess(tiny_chat_llama, ["--prefill", "1", "--decode", "1", *ENGINE], num_workers=2)
    yield s
    s.stop()


schemas = st.one_of(
    json_values,
    st.fixed_dictionaries({"type": st.just("object"), "properties": st.dictionaries(
        st.text(max_size=6), st.one_of(json_values, st.sampled_from([
            {"type": "string", "maxLength": 4}, {"type": "integer", "minimum": 3}, {"$ref": "#/nope"},
            {"enum": [1, "a", None]}, {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}])),
        max_size=3)}, optional={"required": st.lists(st.text(max_size=6), max_size=2)}),
)  # fmt: skip


@st.composite
def tool_fields(draw) -> dict:
    names = draw(st.lists(st.sampled_from(["f", "get_weather", "a-b", "x y", ""]), min_size=0, max_size=3))
    tools = [{"type": "function", "function": {"name": n, **({"parameters": draw(schemas)} if draw(st.booleans())
                                                              else {})}} for n in names]  # fmt: skip
    choice = draw(st.one_of(st.sampled_from(["auto", "none", "required"]), st.builds(
        lambda n: {"type": "function", "function": {"name": n}}, st.sampled_from(["f", "g"]))))  # fmt: skip
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": draw(st.sampled_from(
        ['{"x": 1}', "{}", "not json", "[1]"]))}}  # fmt: skip
    history = draw(st.sampled_from([
        [{"role": "user", "content": "hi"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]},
         {"role": "tool", "tool_call_id": "c1", "content": "42"}],
        [{"role": "tool", "content": "no id"}]]))  # fmt: skip
    return {"tools": tools, "tool_choice": choice, "parallel_tool_calls": draw(st.booleans()), "messages": history,
            "max_tokens": 12}  # fmt: skip


@st.composite
def request_bodies(draw, model: str) -> tuple[str, bytes]:
    chat = draw(st.booleans())
    base = {"model": model, "max_tokens": 3}
    base |= {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    for name in draw(st.lists(st.sampled_from([*FIELDS, "surprise"]), max_size=4)):
        base[name] = draw(json_values)
    if chat and draw(st.booleans()):  # tool calling: well-formed requests around odd schemas, names and history
        base |= draw(tool_fields())
    if draw(st.integers(0, 9)) == 0:  # now and then not a request object at all
        return chat, json.dumps(draw(json_values)).encode()
    return chat, json.dumps(base).encode()


@pytest.mark.slow
def test_random_json_never_breaks_the_cluster(server, tiny_chat_llama):
    model = server.http.get("/v1/models").json()["data"][0]["id"]
    want = hf_greedy(tiny_chat_llama, [[5, 6, 7]], [4])[0]
    statuses: dict[int, int] = {}

    @settings(max_examples=300, deadline=None)
    @given(request_bodies(model))
    def one(case):
        chat, body = case
        path = "/v1/chat/completions" if chat else "/v1/completions"
        r = server.http.post(path, content=body, headers={"content-type": "application/json"}, timeout=60)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code in (200, 400, 404), (body, r.status_code, r.text)
        if r.status_code != 200:
            assert r.json()["error"]["message"], r.text
        elif "text/event-stream" in r.headers["content-type"]:
            assert r.text.rstrip().endswith("data: [DONE]"), r.text

    one()
    assert statuses.get(200) and statuses.get(400), statuses  # both kinds of answer were exercised
    # ...and the cluster serves the next client as before, with every page free.
    r = server.http.post(
        "/v1/completions",
        json={
            "model": model,
            "prompt": [5, 6, 7],
            "max_tokens": 4,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
    )
    assert r.json()["choices"][0]["token_ids"] == want
    server.wait_idle(timeout=10)


def test_a_bug_placing_one_request_fails_it_alone(monkeypatch):
    """A seed beyond 64 bits used to raise inside placement, leave the request at the head of the queue and fail
    every request after it. Whatever raises there now fails that request alone, with a 500 naming the error."""
    cluster = Cluster(RouterOptions(model="m"))
    try:
        key = CompatKey(model="m", dtype="float32", page_size=16, num_layers=2, num_kv_heads=2, head_dim=8)
        info = WorkerInfo("both-1", Role.BOTH, "m", 512, 16, 100, 8, key, 1, "host")
        cluster.workers["both-1"] = Worker(info, Load(100, 0, 0, 0), KvStats(), time.monotonic())
        sent = []

        def send(worker, message):
            if getattr(message, "params", None) is not None and message.params.seed == 666:
                raise OverflowError("int too big to convert")
            sent.append(message)

        monkeypatch.setattr(cluster, "_send", send)
        bad = cluster.submit([1, 2, 3], SamplingParams(seed=666))
        good = cluster.submit([1, 2, 3], SamplingParams())
        error = bad.events.get_nowait()
        assert isinstance(error, ErrorEvent) and error.status == 500 and "OverflowError" in error.message
        # The failed request's worker is told to drop it (Abort); the next one was placed.
        assert [(type(m).__name__, m.job) for m in sent] == [("Abort", bad.wire_id), ("Generate", good.wire_id)]
        assert not cluster.queue
        assert set(cluster.workers["both-1"].jobs) == {good.wire_id}
    finally:
        cluster._socket.close()
        cluster._context.term()
