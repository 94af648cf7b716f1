"""The SLO benchmark's parts without a server: workloads (exact token counts, arrival statistics), the
metrics on hand-made timings (vLLM's definitions), and a short run against a tiny real cluster."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import statistics
import time

import pytest

from splitserve.bench import metrics, workloads
from splitserve.bench.client import Record, Target, run
from splitserve.bench.workloads import LengthDist
from splitserve.model.tokenizer import load_tokenizer
from splitserve.slo import SLO


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return load_tokenizer(smollm2)


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def test_prompts_have_exact_token_counts(tokenizer):
    rng = random.Random(0)
    for n in (1, 2, 7, 64, 333, 1000):
        assert _count(tokenizer, workloads.text_of_length(tokenizer, n, rng)) == n
    reqs = workloads.synthetic(tokenizer, 20, LengthDist("uniform:10,300"), LengthDist("fixed:5"), rng)
    assert all(_count(tokenizer, r.prompt) == r.prompt_tokens for r in reqs)
    assert {r.max_tokens for r in reqs} == {5}
    chat = workloads.synthetic(tokenizer, 5, LengthDist("fixed:40"), LengthDist("fixed:5"), rng, chat=True)
    assert all(_count(tokenizer, r.messages[0]["content"]) == 40 for r in chat)
    ids = workloads.synthetic(tokenizer, 5, LengthDist("fixed:40"), LengthDist("fixed:5"), rng, token_ids=True)
    assert all(len(r.prompt) == 40 for r in ids)


def test_length_distributions():
    rng = random.Random(1)
    assert {LengthDist("fixed:12").sample(rng) for _ in range(10)} == {12}
    u = [LengthDist("uniform:10,20").sample(rng) for _ in range(2000)]
    assert min(u) == 10 and max(u) == 20
    n = [LengthDist("normal:200,20").sample(rng) for _ in range(4000)]
    assert abs(statistics.fmean(n) - 200) < 2 and abs(statistics.stdev(n) - 20) < 2
    ln = [LengthDist("lognormal:100,0.5").sample(rng) for _ in range(4000)]
    assert abs(statistics.median(ln) - 100) < 5
    assert min(LengthDist("normal:1,50", max_len=30).sample(rng) for _ in range(200)) >= 1
    for bad in ("uniform:1", "gauss:1,2", "fixed:x", "fixed"):
        with pytest.raises(ValueError):
            LengthDist(bad)


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_arrivals_have_the_rate_and_burstiness_asked_for(burstiness):
    times = workloads.arrival_times(20000, 5.0, burstiness, random.Random(2))
    gaps = [b - a for a, b in itertools.pairwise(times)]
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(1 / 5, rel=0.03)
    # Gamma gaps with shape k: coefficient of variation 1/sqrt(k) (1 for Poisson).
    assert statistics.stdev(gaps) / mean == pytest.approx(burstiness**-0.5, rel=0.05)
    assert workloads.arrival_times(5, float("inf"), 1.0, random.Random(0)) == [0.0] * 5


def test_shared_prefix_and_multi_turn(tokenizer):
    rng = random.Random(3)
    reqs = workloads.shared_prefix(tokenizer, 3, 4, 100, LengthDist("fixed:10"), LengthDist("fixed:4"), rng)
    assert len(reqs) == 12
    prefixes = {r.prompt.split("\n")[0] for r in reqs}
    assert len(prefixes) == 3 and all(_count(tokenizer, p) == 100 for p in prefixes)
    sessions = workloads.multi_turn(tokenizer, 2, 3, LengthDist("fixed:8"), LengthDist("fixed:4"), rng)
    assert len(sessions) == 2 and all(len(s.follow_ups) == 2 for s in sessions)
    assert [t.turn for t in (sessions[0], *sessions[0].follow_ups)] == [0, 1, 2]
    shared = workloads.multi_turn(tokenizer, 2, 2, LengthDist("fixed:8"), LengthDist("fixed:4"), rng, system_len=50)
    systems = [s.messages[0] for s in shared]
    assert (
        systems[0] == systems[1] and systems[0]["role"] == "system" and _count(tokenizer, systems[0]["content"]) == 50
    )
    assert [m["role"] for m in shared[0].follow_ups[0].messages] == ["user"]  # the client adds the history
    alone = workloads.multi_turn(tokenizer, 1, 2, LengthDist("fixed:8"), LengthDist("fixed:4"), rng, 50, history=False)
    assert [m["role"] for m in alone[0].messages] == ["user"] and not alone[0].with_history


def test_sharegpt_file(tokenizer, tmp_path):
    long_answer = "word " * 50
    data = [
        {"conversations": [{"from": "human", "value": "Tell me a story about a cat please"},
                           {"from": "gpt", "value": long_answer}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": long_answer}]},  # too short
        {"conversations": [{"from": "gpt", "value": "starts with the model"}]},  # no human turn first
        {"conversations": [{"from": "human", "value": "What is the capital of France, and why?"},
                           {"from": "gpt", "value": "Paris, because history made it so."}]},
    ]  # fmt: skip
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    reqs = workloads.sharegpt(path, tokenizer, 10, random.Random(0))
    assert len(reqs) == 2
    for r in reqs:
        assert r.prompt_tokens == _count(tokenizer, r.prompt)
        assert r.max_tokens in (_count(tokenizer, long_answer), _count(tokenizer, "Paris, because history made it so."))
    chat = workloads.sharegpt(path, tokenizer, 1, random.Random(0), chat=True)
    assert len(chat) == 1 and chat[0].messages[0]["role"] == "user" and chat[0].prompt is None
    path.write_text("[]")
    with pytest.raises(ValueError, match="no usable"):
        workloads.sharegpt(path, tokenizer, 10, random.Random(0))


def _record(sent, chunks, end, n, error=None) -> Record:
    return Record(prompt_tokens=10, max_tokens=n, sent=sent, chunk_times=chunks, end=end, output_tokens=n, error=error)


def test_metrics_on_hand_made_timings():
    records = [
        _record(0.0, [0.5, 0.6, 0.7, 0.8], 0.8, 4),  # TTFT 0.5, TPOT 0.1, ITL 0.1 x3, E2EL 0.8
        _record(1.0, [1.2, 1.5], 1.5, 2),  # TTFT 0.2, TPOT 0.3, ITL 0.3, E2EL 0.5
        _record(2.0, [3.0], 3.0, 1),  # TTFT 1.0, no TPOT, E2EL 1.0
        _record(2.0, [], 2.1, 0, error="HTTP 503"),
    ]
    s = metrics.summarize(records, duration_s=4.0, slo=SLO.parse("ttft=0.6,tpot=150ms"))
    assert s["completed"] == 3 and s["failed"] == 1
    assert s["request_throughput"] == pytest.approx(3 / 4)
    assert s["output_throughput"] == pytest.approx(7 / 4)
    assert s["total_token_throughput"] == pytest.approx((7 + 30) / 4)
    assert s["mean_ttft"] == pytest.approx((0.5 + 0.2 + 1.0) / 3)
    assert s["p50_ttft"] == pytest.approx(0.5)
    assert s["p90_ttft"] == pytest.approx(0.5 + 0.8 * 0.5)  # linear between ranks, as numpy
    assert s["mean_tpot"] == pytest.approx(0.2)
    assert s["mean_itl"] == pytest.approx((0.1 * 3 + 0.3) / 4)
    assert s["p99_e2el"] == pytest.approx(0.8 + 0.98 * 0.2)
    # Only the first meets both limits: goodput 1 request in 4 s; attainment 1 of 4 (failures count).
    assert s["goodput"] == pytest.approx(0.25)
    assert s["slo_attainment"] == pytest.approx(0.25)


def test_slo_parsing():
    assert SLO.parse("ttft=0.5,tpot=50ms") == SLO(ttft=0.5, tpot=0.05)
    assert SLO.parse("e2el=2") == SLO(e2el=2.0)
    assert not SLO.parse(None)
    for bad in ("ttft", "latency=1", "ttft=abc"):
        with pytest.raises(ValueError):
            SLO.parse(bad)


def test_benchmark_against_a_real_cluster(tiny_chat_llama, tmp_path):
    from splitserve.launcher import ServeProcess
    from tests.test_serving import ENGINE

    server = ServeProcess(tiny_chat_llama, ["--prefill", "1", "--decode", "1", *ENGINE], num_workers=2)
    try:
        tokenizer = load_tokenizer(tiny_chat_llama)
        rng = random.Random(4)
        reqs = workloads.synthetic(tokenizer, 8, LengthDist("uniform:5,60"), LengthDist("fixed:6"), rng)
        workloads.assign_arrivals(reqs, 20.0, 1.0, rng)
        model = server.http.get("/v1/models").json()["data"][0]["id"]
        records, duration = asyncio.run(run(Target(server.url, model), reqs, progress=False))
        assert all(r.ok and r.output_tokens == 6 and len(r.chunk_times) >= 1 for r in records), records
        s = metrics.summarize(records, duration, SLO(ttft=30.0))
        assert s["completed"] == 8 and s["slo_attainment"] == 1.0

        # The CLI: a two-rate sweep with chat and multi-turn, results JSON and charts.
        out = tmp_path / "res.json"
        argv = ["bench", "--url", server.url, "--endpoint", "chat", "--workload", "multi-turn", "--turns", "2",
                "--num-requests", "3", "--input-len", "fixed:12", "--output-len", "fixed:4", "--rate", "5,10",
                "--slo", "ttft=30", "--tokenizer", str(tiny_chat_llama), "--output", str(out), "--plot",
                str(tmp_path / "chart"), "--no-progress", "--system-len", "40", "--cache-keys",
                "--min-tokens"]  # fmt: skip
        from splitserve.cli import main

        assert main(argv) == 0
        result = json.loads(out.read_text())
        assert [r["rate"] for r in result["runs"]] == [5.0, 10.0]
        assert all(len(r["records"]) == 6 and r["summary"]["failed"] == 0 for r in result["runs"])
        assert all(x["output_tokens"] == 4 for r in result["runs"] for x in r["records"])  # by min_tokens
        time.sleep(0.6)  # the heartbeats carry the workers' cache counters
        # The shared system prompt and each session's first turn were found in the workers' caches.
        assert sum(w["prefix_cache_hits"] for w in server.workers()) >= 40
        assert (tmp_path / "chart-attainment.png").stat().st_size > 10_000
        assert (tmp_path / "chart-cdf.png").stat().st_size > 10_000
        server.wait_idle()
    finally:
        server.stop()
