"""The disaggregated hand-off inside one process: a `PrefillEngine` computes prompts' KV and first tokens,
the pages are copied into a `DecodeEngine`'s reserved pages, and decoding continues there. Tokens equal
Hugging Face transformers (greedy) and the colocated engine (seeded sampling); reservations are refused
when the decode side is full; every page comes back."""

from __future__ import annotations

import random

import pytest
import torch

from splitserve.decode.engine import DecodeEngine, NoCapacityError
from splitserve.engine.config import EngineConfig
from splitserve.engine.kv_cache import page_bytes
from splitserve.engine.params import SamplingParams
from splitserve.engine.request import EngineRequest
from splitserve.kernels import kv_format
from splitserve.model.config import ModelConfig
from splitserve.prefill.engine import PrefillEngine
from tests.helpers import hf_greedy, run_staggered


def _disaggregated(prefill: PrefillEngine, decode: DecodeEngine, prompts, params) -> list[list[int]]:
    """Run prompts through prefill, hand the pages to decode (a copy standing in for the transfer)."""
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    reserved = {}
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        reserved[str(i)] = decode.reserve(EngineRequest(str(i), prompt, p))
        prefill.add_request(EngineRequest(str(i), prompt, p))
    pending = set(outputs)
    while prefill.has_work():
        for done in prefill.step():
            rid = done.request.request_id
            # The decode side reserved pages only past the prefix it holds cached: the prompt's last pages.
            sent = done.request.pages[len(done.request.pages) - len(reserved[rid]) :]
            kv_format.pages(decode.runner.kv_cache)[reserved[rid]] = kv_format.pages(prefill.runner.kv_cache)[sent]
            update = decode.start_decode(rid, done.token_id, done.logprob, done.generator_state)
            prefill.release(rid)
            outputs[rid].append(update.token_id)
            if update.finish_reason is not None:
                pending.discard(rid)
    while pending:
        for update in decode.step():
            outputs[update.request_id].append(update.token_id)
            if update.finish_reason is not None:
                pending.discard(update.request_id)
    return [outputs[str(i)] for i in range(len(prompts))]


@pytest.fixture
def engines(tiny_llama_gqa):
    # A small token budget: long prompts are prefilled in chunks, several prompts share a pass.
    cfg = EngineConfig(model=str(tiny_llama_gqa), dtype="fp32", device="cpu", page_size=8, max_num_batched_tokens=40)
    return PrefillEngine(cfg), DecodeEngine(cfg)


@pytest.mark.parametrize(
    "model", ["tiny_llama_gqa", "tiny_qwen3", "tiny_mixtral", "tiny_qwen2_moe", "tiny_olmoe", "tiny_gemma3"]
)
def test_handoff_equals_transformers(model, request):
    folder = request.getfixturevalue(model)
    cfg = EngineConfig(model=str(folder), dtype="fp32", device="cpu", page_size=8, max_num_batched_tokens=40)
    prefill, decode = PrefillEngine(cfg), DecodeEngine(cfg)
    rng = random.Random(3)
    lens = [1, 5, 8, 9, 16, 31, 64, 100]
    prompts = [[rng.randrange(8, 384) for _ in range(n)] for n in lens]
    max_tokens = [1, 2, 9, 17, 12, 20, 8, 15]
    params = [SamplingParams(max_tokens=n, temperature=0) for n in max_tokens]
    got = _disaggregated(prefill, decode, prompts, params)
    assert got == hf_greedy(folder, prompts, max_tokens)


def test_seeded_sampling_continues_the_same_sequence(engines, tiny_llama_gqa):
    """The sampler's state travels with the first token: disaggregated == colocated, token for token."""
    prefill, decode = engines
    prompts = [[9, 10, 11, 12, 13], list(range(20, 61))]
    params = [SamplingParams(max_tokens=12, temperature=1.0, top_k=50, seed=s) for s in (1, 2)]
    got = _disaggregated(prefill, decode, prompts, params)
    colocated, _ = run_staggered(decode, prompts, params, [0, 0])
    assert got == colocated


def test_reserve_refused_when_full(tiny_llama_gqa):
    page = page_bytes(ModelConfig.from_pretrained(tiny_llama_gqa), 8, torch.float32)
    cfg = EngineConfig(
        model=str(tiny_llama_gqa), dtype="fp32", device="cpu", page_size=8, max_num_seqs=2, kv_cache_memory=5 * page
    )
    decode = DecodeEngine(cfg)
    params = SamplingParams(max_tokens=4, temperature=0)
    decode.reserve(EngineRequest("a", [9] * 10, params))
    decode.reserve(EngineRequest("b", [9] * 10, params))
    with pytest.raises(NoCapacityError, match="batch slots"):
        decode.reserve(EngineRequest("c", [9] * 10, params))
    decode.abort("b")
    with pytest.raises(NoCapacityError, match="3 pages free"):
        decode.reserve(EngineRequest("c", [9] * 30, params))  # 4 pages
    decode.abort("a")
    assert decode.allocator.num_free == decode.allocator.capacity
    assert decode.scheduler.num_requests == 0
