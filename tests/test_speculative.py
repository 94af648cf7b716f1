"""Speculative decoding (`--speculative ngram|suffix|draft`, engine/speculative.py, engine/draft_model.py):
drafted tokens verified in one step give the tokens of a run without speculation (greedy and seeded, with
penalties, logit bias, min_tokens, logprobs and a grammar), sampled tokens follow the model's distribution
(chi-square), the policy backs off, and no page leaks. The embedded model runs with serve's defaults (one
numerics: README 'Modes'). No smaller model with SmolLM2's tokenizer is at hand offline: its draft model is
itself (nearly every draft kept), and a tiny random model drafts for another (nearly none kept)."""

from __future__ import annotations

import math
import time

import pytest
import torch

from splitserve import LLM, SamplingParams
from splitserve.engine.config import EngineConfig
from splitserve.engine.params import StructuredOutput
from splitserve.engine.request import EngineRequest
from splitserve.engine.speculative import NgramIndex, Speculator
from splitserve.kernels import cpu_quant

DEFAULTS = dict(device="cpu", kv_cache_memory="128MiB")  # serve's defaults but for the KV cache's size
CODE = '''def fibonacci(n):
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    a, b = 0, 1
    for _ in range(n - 1):
        a, b = b, a + b
    return b


def factorial(n):
    """Return n!."""
    result = 1
    for i in range(2, n + 1):
        result *= i
    return result
'''
COPY = [{"role": "user", "content": f"Rename fibonacci to fib and print the whole code again:\n\n{CODE}"}]
QUOTE = [{"role": "user", "content": f"Quote the function factorial from this file exactly:\n\n{CODE}"}]


def test_ngram_index_continues_the_latest_earlier_occurrence_of_the_longest_match():
    index = NgramIndex(2, 3, [1, 2, 3, 4, 9, 2, 3, 5, 6, 1, 2, 3])
    assert index.continuation(index.tokens, 4) == [4, 9, 2, 3]  # 1 2 3 (n = 3) beats the later 2 3 -> 5
    index.extend([7])
    assert index.continuation(index.tokens, 4) == []  # "3 7" never occurred before the end
    index.extend([8, 3, 7])
    assert index.continuation(index.tokens, 2) == [8, 3]  # the end itself is no earlier occurrence
    assert NgramIndex(2, 4, [5, 5, 5]).continuation([5, 5, 5], 3) == [5]  # "5 5" overlapping the end
    other = NgramIndex(1, 2, [4, 9, 2, 3, 5])
    assert other.continuation([7, 2, 3], 2) == [5]  # a suffix from another sequence (--speculative suffix)


def test_the_policy_backs_off_requests_whose_drafts_fail_and_large_batches():
    spec = Speculator("ngram", 4, 1, 2, max_batch=2)
    llm_like = [_request(f"r{i}", [1, 2, 1, 2, 1]) for i in range(3)]
    assert spec.drafts(llm_like) == {}  # three decoding requests: more than max_batch
    assert spec.drafts(llm_like[:1]) == {"r0": [2, 1]}  # what followed the latest earlier "2 1"
    for _ in range(4):
        spec.verified(llm_like[0], 4, 0)
    assert spec.drafts(llm_like[:1]) == {}  # paused after its drafts failed
    assert spec.stats.drafted == 16 and spec.stats.accepted == 0
    opted_out = _request("o", [1, 2, 1, 2, 1], speculative=False)
    assert spec.drafts([opted_out]) == {}


@pytest.mark.parametrize("method", ["suffix", "ngram"])
def test_suffix_drafts_from_the_conversations_earlier_outputs(method):
    spec = Speculator(method, 4, 2, 3, max_batch=8)
    first = _request("a", [1, 2, 3], cache_key="conv")
    first.token_ids.extend([40, 41, 42, 43, 44, 45])
    first.finish_reason = "stop"
    spec.finished(first)
    again = _request("b", [9, 8, 40, 41], cache_key="conv")  # its own tokens hold no earlier "40 41"
    stranger = _request("c", [9, 8, 40, 41], cache_key="other")
    assert spec.drafts([again, stranger]) == ({"b": [42, 43, 44, 45]} if method == "suffix" else {})


def _request(request_id: str, tokens: list[int], cache_key: str | None = None, **params):
    from splitserve.engine.request import Request

    return Request.create(request_id, tokens, SamplingParams(max_tokens=64, **params), frozenset(), cache_key=cache_key)


def test_config_refuses_bad_speculative_options():
    with pytest.raises(ValueError, match="speculative must be"):
        EngineConfig(speculative="eagle")
    with pytest.raises(ValueError, match="ngram_min"):
        EngineConfig(ngram_min=3, ngram_max=2)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(num_speculative_tokens=0)
    for options in ({"speculative": "draft"}, {"speculative": "ngram", "draft_model": "x"}):
        with pytest.raises(ValueError, match="--speculative draft and --draft-model go together"):
            EngineConfig(**options)


def test_a_draft_model_of_another_vocabulary_is_refused(tiny_llama_gqa, smollm2):
    from splitserve.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="a vocabulary of 49152 tokens, the model's has 384"):
        LLM(tiny_llama_gqa, dtype="fp32", speculative="draft", draft_model=str(smollm2))


@pytest.mark.parametrize("draft", ["itself", "another"])
def test_a_draft_model_gives_the_tokens_of_a_run_without_it(tiny_llama_gqa, tiny_qwen2, draft):
    """A tiny Llama drafted for by itself (its greedy drafts nearly always kept: the draft proposes its argmax,
    so a sampled request keeps one with the probability the model gives it) or by a tiny random Qwen 2 of the
    same vocabulary (nearly never): greedy and seeded tokens of a run without speculation, with prompts long
    enough to take the draft's catch-up several passes, and every page back."""
    folder = tiny_llama_gqa if draft == "itself" else tiny_qwen2
    options = dict(dtype="fp32", page_size=4, max_num_batched_tokens=32, kv_cache_memory="2MiB")
    off = LLM(tiny_llama_gqa, **options)
    on = LLM(tiny_llama_gqa, **options, speculative="draft", draft_model=str(folder), num_speculative_tokens=4,
             speculative_max_batch=4)  # fmt: skip
    proposer = on.engine.speculator.proposer
    assert proposer.runner.num_pages == on.engine.runner.num_pages
    proposals = []  # (a request's tokens, its first drafted token)
    propose = proposer.propose

    def recorded(chunks):
        out = propose(chunks)
        proposals.extend((list(c.request.token_ids), c.draft[0]) for c in out if c.draft)
        return out

    proposer.propose = recorded
    prompts = [list(range(20, 90)), [5, 6, 7], list(range(100, 140))]
    stats = on.engine.speculator.stats
    for params in (SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
                   SamplingParams(max_tokens=24, temperature=0.8, seed=3, ignore_eos=True)):  # fmt: skip
        before = stats.drafted, stats.accepted
        want = [o.token_ids for o in off.generate(prompts, params, use_tqdm=False)]
        assert [o.token_ids for o in on.generate(prompts, params, use_tqdm=False)] == want
        drafted, accepted = stats.drafted - before[0], stats.accepted - before[1]
        assert drafted > 0
        if draft == "itself" and params.greedy:
            assert accepted >= 0.9 * drafted, (drafted, accepted)
    if draft == "itself":  # after the sampled run's rejections too, the draft's K/V held the right tokens:
        scorer = LLM(tiny_llama_gqa, **{**options, "max_num_batched_tokens": 256})
        for tokens, first in proposals[-30:]:  # its first token is the model's argmax after them
            assert int(scorer.engine.score(tokens)[-1].argmax()) == first
    assert on.engine.allocator.num_available == on.engine.allocator.capacity


@pytest.fixture(scope="module")
def pair() -> tuple[LLM, LLM]:
    """The embedded model in serve's default mode, without and with `--speculative ngram`."""
    if not cpu_quant.available():
        pytest.skip("no native CPU kernels here")
    off, on = LLM(**DEFAULTS), LLM(**DEFAULTS, speculative="ngram")
    assert on.engine.numerics_differ is None  # one numerics: verifying k + 1 rows is computing them one by one
    return off, on


CASES = {
    "greedy": SamplingParams(max_tokens=96, temperature=0),
    "seeded": SamplingParams(max_tokens=96, temperature=0.7, top_p=0.95, seed=11),
    "processed": SamplingParams(max_tokens=64, temperature=0.6, seed=5, presence_penalty=0.3, frequency_penalty=0.2,
                                repetition_penalty=1.1, logit_bias=((28, -2.0),), min_tokens=40, logprobs=2),
    "greedy-logprobs": SamplingParams(max_tokens=64, temperature=0, logprobs=3),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_speculation_gives_the_tokens_of_a_run_without_it(pair, case):
    off, on = pair
    params = CASES[case]
    before = on.engine.speculator.stats.accepted
    ref = off.chat([COPY, QUOTE], params, use_tqdm=False)
    got = on.chat([COPY, QUOTE], params, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert [o.logprobs for o in got] == [o.logprobs for o in ref]
    assert on.engine.speculator.stats.accepted > before  # drafts were verified and kept, not merely proposed


@pytest.mark.slow
def test_speculation_keeps_a_grammar_and_stop_tokens(pair):
    off, on = pair
    ask = [{"role": "user", "content": 'Reply with JSON {"a": [1, 2, 3], "b": [1, 2, 3], "c": [1, 2, 3]} again.'}]
    params = SamplingParams(max_tokens=80, temperature=0, structured=StructuredOutput("json_object"))
    before = on.engine.speculator.stats.drafted
    ref, got = off.chat(ask, params, use_tqdm=False)[0], on.chat(ask, params, use_tqdm=False)[0]
    assert got.token_ids == ref.token_ids and got.finish_reason == ref.finish_reason == "stop"
    assert on.engine.speculator.stats.drafted > before
    stop = ref.token_ids[20]  # a token the output reaches: it must end there, drafts after it dropped
    params = SamplingParams(max_tokens=80, temperature=0, stop_token_ids=(stop,))
    ref, got = off.chat(COPY, params, use_tqdm=False)[0], on.chat(COPY, params, use_tqdm=False)[0]
    assert got.token_ids == ref.token_ids and got.token_ids[-1] == stop


@pytest.mark.slow
def test_a_request_that_opts_out_drafts_nothing(pair):
    _, on = pair
    before = on.engine.speculator.stats.drafted
    on.chat(COPY, SamplingParams(max_tokens=32, temperature=0, speculative=False), use_tqdm=False)
    assert on.engine.speculator.stats.drafted == before


@pytest.mark.slow
def test_sampled_tokens_follow_the_models_distribution(tiny_llama_gqa):
    """Unseeded draws of 3 tokens with top_k 3, with speculation on (many steps verify drafts, and keep some):
    the counts of each 3-token output against its probability under the model (teacher forcing), chi-square at
    p > 0.001."""
    llm = LLM(tiny_llama_gqa, dtype="fp32", speculative="ngram", speculative_max_batch=64, ngram_min=1,
              max_num_seqs=64)  # fmt: skip
    start = [1, 11, 12, 13]  # then the model's own greedy text: what it samples next has occurred before
    greedy = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    prompt = start + llm.generate([start], greedy, use_tqdm=False)[0].token_ids
    params = SamplingParams(max_tokens=3, temperature=1.0, top_k=3, ignore_eos=True)
    draws = 1200
    outs = llm.generate([prompt] * draws, params, use_tqdm=False)
    assert llm.engine.speculator.stats.accepted > 200
    counts: dict[tuple[int, ...], int] = {}
    for o in outs:
        counts[tuple(o.token_ids)] = counts.get(tuple(o.token_ids), 0) + 1

    def probability(seq: tuple[int, ...]) -> float:
        logits = llm.engine.score(prompt + list(seq))[len(prompt) - 1 :]
        p = 1.0
        for i, token in enumerate(seq):
            top = torch.topk(logits[i], 3)
            probs = torch.softmax(top.values.double(), -1)
            hit = (top.indices == token).nonzero()
            p *= float(probs[hit[0, 0]]) if len(hit) else 0.0
        return p

    expected = {seq: probability(seq) for seq in counts}
    assert all(p > 0 for p in expected.values())  # every output is one top-3 sampling can give
    rest = 1 - sum(expected.values())
    chi2 = sum((counts[s] - draws * p) ** 2 / (draws * p) for s, p in expected.items()) + draws * max(rest, 0)
    dof = len(expected) - (0 if rest > 1e-9 else 1)
    assert chi2 < _chi2_quantile(dof, 0.999), (chi2, dof)


def _chi2_quantile(dof: int, q: float) -> float:
    """Wilson-Hilferty's approximation of the chi-square quantile (enough for a bound at p = 0.001)."""
    z = {0.999: 3.090}[q]
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.slow
@pytest.mark.parametrize("method", ["suffix", "draft"])
def test_served_speculation_1p1d_gives_the_tokens_of_a_run_without_it(pair, smollm2, method):
    """serve's defaults, 1 prefill + 1 decode worker, with `--speculative suffix`, or `draft` (the embedded model
    drafting for itself: the decode worker prefills the draft from the prompt, nothing of it crosses from the
    prefill worker): greedy and seeded streams of copying prompts equal the in-process run without speculation
    (one numerics: colocated or disaggregated, the same bits); a conversation's second turn (prompt_cache_key)
    drafts (with suffix, from the first's output); /metrics counts the drafted and accepted tokens."""
    from splitserve.launcher import ServeProcess
    from tests.test_serving import complete

    off, _ = pair
    args = ["--prefill", "1", "--decode", "1", "--fixed-roles", "--kv-cache-memory", "128MiB", "--speculative",
            method, *(["--draft-model", str(smollm2)] if method == "draft" else [])]  # fmt: skip
    server = ServeProcess(None, args, num_workers=2)
    try:
        model = server.http.get("/v1/models").json()["data"][0]["id"]
        for messages, params in [(COPY, CASES["greedy"]), (QUOTE, CASES["seeded"])]:
            body = {"model": model, "messages": messages, "max_tokens": params.max_tokens, "stream": True,
                    "temperature": params.temperature, "top_p": params.top_p, "seed": params.seed}  # fmt: skip
            _, ids, _ = complete(server.http, "/v1/chat/completions", body)
            assert ids == off.chat(messages, params, use_tqdm=False)[0].token_ids
        turn = {"model": model, "messages": QUOTE, "max_tokens": 48, "temperature": 0, "prompt_cache_key": "c1"}
        complete(server.http, "/v1/chat/completions", turn)  # retained pages and suffix memory alike
        deadline = time.monotonic() + 10  # the counters come with the decode worker's heartbeats
        while True:
            metrics = server.http.get("/metrics").text
            finished = _metric(metrics, "splitserve_spec_acceptance_count")  # requests that drafted, by acceptance
            if finished >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert finished == 3
        drafted, accepted = (_metric(metrics, f"splitserve_spec_{k}_tokens_total") for k in ("drafted", "accepted"))
        assert drafted > 0 and 0 < accepted <= drafted
        server.wait_idle(timeout=5)
    finally:
        server.stop()


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


@pytest.mark.slow
def test_a_resumed_request_speculates_on_to_the_same_tokens(pair):
    """A request resumed after tokens it streamed (a migration's `output_token_ids`) with speculation on goes on
    as the undisturbed run without it, greedy and seeded."""
    off, on = pair
    for case in ("greedy", "seeded"):
        params = CASES[case]
        prompt = on.tokenizer.apply_chat_template(COPY, tokenize=False, add_generation_prompt=True)
        ids = on.tokenizer(prompt, add_special_tokens=False).input_ids
        whole = off.generate([ids], params, use_tqdm=False)[0].token_ids
        on.engine.add_request(EngineRequest(f"resumed-{case}", ids, params, output_token_ids=whole[:30]))
        rest = []
        while on.engine.has_unfinished():
            rest += [u.token_id for u in on.engine.step()]
        assert whole[:30] + rest == whole


@pytest.mark.slow
def test_preemption_under_speculation_loses_nothing():
    """Eight copying requests in a KV cache too small for them all: requests are preempted and recomputed while
    others verify drafts; every output equals the run without speculation (with room for all), no page leaks."""
    if not cpu_quant.available():
        pytest.skip("no native CPU kernels here")
    roomy, tight = (
        LLM(**DEFAULTS),
        LLM(device="cpu", kv_cache_memory="32MiB", speculative="ngram", speculative_max_batch=8),
    )
    params = SamplingParams(max_tokens=80, temperature=0)
    convs = [COPY, QUOTE] * 4
    ref = roomy.chat(convs, params, use_tqdm=False)
    got = tight.chat(convs, params, use_tqdm=False)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert tight.engine.scheduler.num_preemptions > 0 and tight.engine.speculator.stats.accepted > 0
