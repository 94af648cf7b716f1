"""Request migration inside the engines: a request resumed on another engine after the tokens an earlier attempt
generated (its prompt and those tokens prefilled again, its sampler where that attempt left it) continues
exactly as the undisturbed request would have: greedy, seeded sampling, penalties and min_tokens alike, on
the colocated path and the disaggregated hand-off."""

from __future__ import annotations

import pytest

from splitserve.decode.engine import DecodeEngine
from splitserve.engine.config import EngineConfig
from splitserve.engine.params import SamplingParams
from splitserve.errors import InvalidRequestError
from splitserve.prefill.engine import PrefillEngine
from tests.helpers import hf_greedy

PROMPT = [11, 42, 7, 300, 5, 19, 8, 77, 120, 3, 64, 9, 250]
PARAMS = {
    "greedy": SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
    "seeded": SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True),
    "penalized": SamplingParams(
        max_tokens=24,
        temperature=1.2,
        top_k=40,
        seed=-7,
        presence_penalty=0.8,
        frequency_penalty=0.3,
        repetition_penalty=1.2,
        min_tokens=20,
    ),
}


@pytest.fixture(scope="module")
def engines(tiny_llama_gqa):
    cfg = EngineConfig(model=str(tiny_llama_gqa), dtype="fp32", device="cpu", page_size=8, max_num_batched_tokens=16)
    return PrefillEngine(cfg), DecodeEngine(cfg)


def _colocated(decode: DecodeEngine, params: SamplingParams, resumed: list[int]) -> list[int]:
    decode.add_request("r", PROMPT, params, output_token_ids=resumed)
    out = []
    while decode.has_unfinished():
        out += [u.token_id for u in decode.step()]
    return out


def _disaggregated(prefill: PrefillEngine, decode: DecodeEngine, params: SamplingParams, resumed: list[int]):
    pages = decode.reserve("r", PROMPT, params, output_token_ids=resumed)
    prefill.add_request("r", PROMPT, params, output_token_ids=resumed)
    done = []
    while prefill.has_work():
        done += prefill.step()
    (first,) = done
    sent = first.request.pages[len(first.request.pages) - len(pages) :]
    decode.runner.kv_cache[pages] = prefill.runner.kv_cache[sent]
    prefill.release("r")
    out = [decode.start_decode("r", first.token_id, first.logprob, first.generator_state).token_id]
    while decode.has_unfinished():
        out += [u.token_id for u in decode.step()]
    return out


@pytest.mark.parametrize("path", ["colocated", "disaggregated"])
@pytest.mark.parametrize("kind", sorted(PARAMS))
def test_a_resumed_request_continues_the_undisturbed_one(engines, tiny_llama_gqa, kind, path):
    prefill, decode = engines
    params = PARAMS[kind]

    def run(p: SamplingParams, resumed: list[int]) -> list[int]:
        return _colocated(decode, p, resumed) if path == "colocated" else _disaggregated(prefill, decode, p, resumed)

    whole = run(params, [])
    assert len(whole) == 24
    if kind == "greedy":
        assert whole == hf_greedy(tiny_llama_gqa, [PROMPT], [24])[0]
    for k in (1, 5, 8, 17, 23):  # the resumed part crosses page boundaries (page size 8)
        assert run(params, whole[:k]) == whole[k:], k


def test_a_resumed_request_must_leave_tokens_to_generate(engines):
    _, decode = engines
    with pytest.raises(InvalidRequestError, match="none left"):
        decode.add_request("r", PROMPT, SamplingParams(max_tokens=3), output_token_ids=[1, 2, 3])
    with pytest.raises(InvalidRequestError, match="prompt token ids"):
        decode.add_request("r", PROMPT, SamplingParams(max_tokens=3), output_token_ids=[10**6])
