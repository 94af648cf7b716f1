"""The `LLM` API: sampling options, stopping, logprobs, aborts, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from splitserve import LLM, InvalidRequestError, ModelLoadError, SamplingParams
from splitserve.decode.engine import DecodeEngine
from splitserve.engine.config import EngineConfig
from splitserve.engine.request import EngineRequest

PROMPTS = [[11, 12, 13, 14], [40, 41], [100, 200, 300, 150, 20, 21, 22]]


@pytest.fixture(scope="module")
def llm(tiny_llama_gqa) -> LLM:
    return LLM(str(tiny_llama_gqa), dtype="fp32", page_size=8)


def _tokens(outs):
    return [o.token_ids for o in outs]


def test_outputs_come_back_in_prompt_order_with_finish_reasons(llm):
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == PROMPTS
    assert all(len(o.token_ids) == 5 and o.finish_reason == "length" for o in outs)
    assert all(o.text is None for o in outs)  # the tiny model has no tokenizer


def test_seeded_sampling_is_reproducible_per_request(llm):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    first = _tokens(llm.generate(PROMPTS, params, use_tqdm=False))
    # Same seed, different batch company: the same tokens.
    alone = _tokens(llm.generate(PROMPTS[1], params, use_tqdm=False))
    assert alone[0] == first[1]
    other = _tokens(
        llm.generate(
            PROMPTS[1], SamplingParams(max_tokens=12, temperature=1.0, seed=99, ignore_eos=True), use_tqdm=False
        )
    )
    assert other[0] != first[1]


def test_a_seeded_request_draws_the_same_tokens_in_any_batch(llm):
    """Sampling is batched; a seeded request's randomness is its own, whatever else (greedy, unseeded, other
    top-k/top-p) shares its steps."""
    seeded = SamplingParams(max_tokens=10, temperature=0.9, top_k=20, top_p=0.9, seed=5, ignore_eos=True)
    [alone] = _tokens(llm.generate(PROMPTS[0], seeded, use_tqdm=False))
    company = [
        SamplingParams(max_tokens=10, temperature=1.3, top_k=3, ignore_eos=True),
        SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.7, top_p=0.5, seed=1, ignore_eos=True),
    ]
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[0]]
    batch = _tokens(llm.generate(prompts, [company[0], seeded, company[1], company[2]], use_tqdm=False))
    assert batch[1] == alone


def test_the_batched_draw_follows_each_rows_distribution():
    from types import SimpleNamespace

    from splitserve.engine.sampling import _sample_rows

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    rows = 20_000
    plain = SamplingParams(temperature=1.0)
    top2 = SamplingParams(temperature=1.0, top_k=2)
    requests = [SimpleNamespace(params=plain if i % 2 else top2, generator=None) for i in range(rows)]
    tokens = _sample_rows(probs.log().expand(rows, 4).clone(), requests)
    freq_plain = torch.bincount(tokens[1::2], minlength=4) / (rows / 2)
    freq_top2 = torch.bincount(tokens[::2], minlength=4) / (rows / 2)
    assert (freq_plain - probs).abs().max() < 0.02
    assert (freq_top2 - torch.tensor([0.625, 0.375, 0, 0])).abs().max() < 0.02 and freq_top2[2:].sum() == 0


def test_top_p_keeps_the_tokens_a_full_sort_keeps():
    """`_top_p` sorts only the 256 likeliest tokens where they reach top_p (peaked rows), else the whole row (flat
    ones): either way it keeps what sorting the whole row keeps."""
    from splitserve.engine.sampling import _top_p

    torch.manual_seed(0)
    top_p = torch.tensor([[0.5], [0.9], [0.99], [1e-30], [0.7]])
    for spread in (0.1, 8.0):
        scores = torch.randn(5, 5000) * spread
        best, order = scores.sort(-1, descending=True)
        probs = best.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[:, 0] = False
        want = scores.scatter(1, order, best.masked_fill(drop, float("-inf")))
        got = _top_p(scores, top_p)
        assert torch.equal(got.isinf(), want.isinf()) and torch.equal(got[~got.isinf()], scores[~want.isinf()])
        assert (got.isfinite().sum(-1)[3] == 1) and (spread > 1 or got.isfinite().sum(-1)[2] > 256)


def test_top_k_1_and_tiny_top_p_are_greedy(llm):
    greedy = _tokens(llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0), use_tqdm=False))
    top_k = _tokens(llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=1.5, top_k=1), use_tqdm=False))
    top_p = _tokens(llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=1.5, top_p=1e-6), use_tqdm=False))
    assert greedy == top_k == top_p


def test_sampling_follows_the_distribution(llm):
    # With top_k=2 every sample is one of the two most likely first tokens, and both show up.
    model = AutoModelForCausalLM.from_pretrained(llm.engine.model_path, dtype=torch.float32)
    with torch.no_grad():
        top2 = set(model(torch.tensor([PROMPTS[0]])).logits[0, -1].topk(2).indices.tolist())
    params = [SamplingParams(max_tokens=1, temperature=5.0, top_k=2, seed=s) for s in range(40)]
    firsts = {o.token_ids[0] for o in llm.generate([PROMPTS[0]] * 40, params, use_tqdm=False)}
    assert firsts == top2


def test_stop_token_ids_and_eos(llm):
    [free] = llm.generate(PROMPTS[2], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), use_tqdm=False)
    stop_at = free.token_ids[3]
    first_hit = free.token_ids.index(stop_at)
    [stopped] = llm.generate(
        PROMPTS[2], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(stop_at,)), use_tqdm=False
    )
    assert stopped.token_ids == free.token_ids[: first_hit + 1] and stopped.finish_reason == "stop"


def test_logprobs_match_transformers(llm):
    [out] = llm.generate(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0, logprobs=2), use_tqdm=False)
    assert len(out.logprobs) == 3
    model = AutoModelForCausalLM.from_pretrained(llm.engine.model_path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[0] + out.token_ids])).logits[0]
    logp = torch.log_softmax(logits[len(PROMPTS[0]) - 1 : -1], dim=-1)
    for i, lp in enumerate(out.logprobs):
        assert lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(logp[i, lp.token_id].item(), abs=1e-4)
        assert [t for t, _ in lp.top] == logp[i].topk(2).indices.tolist()
        assert lp.top[0][0] == lp.token_id  # greedy picks the most likely


def test_abort_frees_pages(tiny_llama_gqa):
    engine = DecodeEngine(EngineConfig(model=str(tiny_llama_gqa), dtype="fp32", page_size=4))
    engine.add_request(EngineRequest("a", PROMPTS[2], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)))
    engine.add_request(EngineRequest("b", PROMPTS[0], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)))
    engine.step()
    engine.step()
    assert engine.allocator.num_free < engine.allocator.capacity
    engine.abort("a")
    engine.abort("b")
    engine.abort("never-existed")
    assert not engine.has_unfinished()
    assert engine.allocator.num_free == engine.allocator.capacity


def test_generation_stops_at_the_context_limit(tiny_llama_gqa):
    llm = LLM(str(tiny_llama_gqa), dtype="fp32", page_size=8, max_model_len=20)
    [out] = llm.generate([5] * 15, SamplingParams(max_tokens=100, temperature=0, ignore_eos=True), use_tqdm=False)
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], SamplingParams(), "empty"),
        ([5] * 256, SamplingParams(), "context holds 256"),
        ([5, 384], SamplingParams(), "token ids must be in"),
    ],
)
def test_bad_prompts_are_rejected_and_nothing_is_queued(llm, prompt, params, message):
    with pytest.raises(InvalidRequestError, match=message):
        llm.generate([PROMPTS[0], prompt], params, use_tqdm=False)
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_tokens=0), "max_tokens must be >= 1"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(top_p=1.5), "top_p must be in"),
        (dict(temperature=-1), "temperature must be >= 0"),
        (dict(top_k=-5), "top_k"),
    ],
)
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


def test_unknown_model_path(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        LLM(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        LLM(str(tmp_path))
