"""Greedy tokens equal Hugging Face transformers' `generate` (fp32, same weights), under continuous batching,
chunked prefill and preemption."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from splitserve.decode.engine import DecodeEngine
from splitserve.engine.config import EngineConfig
from splitserve.engine.kv_cache import page_bytes
from splitserve.engine.params import SamplingParams
from splitserve.engine.request import EngineRequest
from splitserve.model.config import ModelConfig
from tests.helpers import hf_greedy, run_staggered

MODELS = ["tiny_llama_gqa", "tiny_qwen2", "tiny_llama_untied", "tiny_qwen3", "tiny_mistral", "tiny_qwen2_sliding",
          "tiny_mixtral", "tiny_qwen2_moe", "tiny_qwen3_moe", "tiny_olmoe", "tiny_gemma3"]  # fmt: skip
PROMPT_LENS = [1, 3, 7, 12, 17, 25, 33, 48, 64]
ARRIVALS = [0, 0, 1, 3, 4, 6, 9, 12, 15]


def _workload(vocab: int, seed: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(8, vocab) for _ in range(n)] for n in PROMPT_LENS]
    max_tokens = [rng.randrange(6, 24) for _ in PROMPT_LENS]
    return prompts, max_tokens


def _check_against_hf(folder, engine_options: dict, seed: int = 0) -> DecodeEngine:
    engine = DecodeEngine(EngineConfig(model=str(folder), dtype="fp32", device="cpu", **engine_options))
    prompts, max_tokens = _workload(engine.model_config.vocab_size, seed)
    params = [SamplingParams(max_tokens=n, temperature=0) for n in max_tokens]
    ours, mixed_steps = run_staggered(engine, prompts, params, ARRIVALS)
    assert mixed_steps > 0, "no request ever joined a running batch"
    expected = hf_greedy(folder, prompts, max_tokens)
    for i, (got, want) in enumerate(zip(ours, expected, strict=True)):
        assert got == want, f"prompt {i} (len {len(prompts[i])}): {got} != {want}"
    return engine


@pytest.mark.parametrize("model", MODELS)
def test_greedy_matches_transformers(model, request):
    _check_against_hf(request.getfixturevalue(model), dict(page_size=8, max_num_batched_tokens=64))


@pytest.mark.parametrize("model", MODELS)
def test_greedy_matches_transformers_with_preemption(model, request):
    folder = request.getfixturevalue(model)
    cfg = ModelConfig.from_pretrained(folder)
    # far fewer than the workload's ~60 pages at its peak (sliding layers' pages hold a window's K/V: fewer yet)
    pages = 8 if any(cfg.layer_windows) else 24
    options = dict(page_size=8, max_num_batched_tokens=64, kv_cache_memory=pages * page_bytes(cfg, 8, torch.float32))
    engine = _check_against_hf(folder, options, seed=1)
    # (Gemma 3's pages hold one layer each: its sliding layers keep rings of pages of their own)
    layout = engine.runner.kv_layout
    assert engine.allocator.capacity == pages * cfg.num_layers // layout.layers_per_page
    # (a model whose every layer slides holds a ring of 2 pages a request at most: nothing to preempt)
    assert engine.scheduler.num_preemptions > 0 or (layout.has_rings and not layout.num_full)


def test_chunked_prefill_equals_unchunked(tiny_llama_gqa):
    prompt = [random.Random(5).randrange(8, 384) for _ in range(150)]
    params = SamplingParams(max_tokens=20, temperature=0)
    results = {}
    for budget in (16, 37, 512):
        engine = DecodeEngine(
            EngineConfig(model=str(tiny_llama_gqa), dtype="fp32", page_size=8, max_num_batched_tokens=budget)
        )
        chunk_sizes: list[int] = []
        execute = engine.runner.execute

        def recording_execute(chunks, execute=execute, sizes=chunk_sizes):
            sizes.extend(c.num_tokens for c in chunks)
            return execute(chunks)

        engine.runner.execute = recording_execute
        engine.add_request(EngineRequest("r", prompt, params))
        tokens = []
        while engine.has_unfinished():
            tokens += [u.token_id for u in engine.step()]
        results[budget] = tokens
        expected_prefill_chunks = -(-len(prompt) // budget)
        assert chunk_sizes[:expected_prefill_chunks] == [
            min(budget, len(prompt) - i * budget) for i in range(expected_prefill_chunks)
        ]
    assert results[16] == results[37] == results[512]
    assert results[512] == hf_greedy(tiny_llama_gqa, [prompt], [20])[0]


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    texts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a land far away, there lived a",
        "1, 2, 3, 4,",
        "The three primary colors are",
        "Water boils at a temperature of",
        "In machine learning, a transformer is a model architecture that",
        "Hello",
        "The quick brown fox jumps over the lazy dog. The quick brown fox",
    ]
    prompts = [tok(t).input_ids for t in texts]
    max_tokens = [12, 16, 10, 14, 12, 8, 16, 10, 12]
    params = [SamplingParams(max_tokens=n, temperature=0) for n in max_tokens]
    expected = hf_greedy(smollm2, prompts, max_tokens)
    cfg = ModelConfig.from_pretrained(smollm2)
    # Once with room to spare, once with 8 pages (the workload peaks near 20): preemption must happen.
    for pages in (None, 8):
        options = {} if pages is None else {"kv_cache_memory": pages * page_bytes(cfg, 16, torch.float32)}
        engine = DecodeEngine(
            EngineConfig(model=None, dtype="fp32", device="cpu", max_num_batched_tokens=32, **options)
        )
        ours, mixed = run_staggered(engine, prompts, params, [0, 0, 1, 2, 4, 5, 7, 9, 11])
        assert mixed > 0
        assert ours == expected
        assert (engine.scheduler.num_preemptions > 0) == (pages is not None)


@pytest.mark.parametrize("model", ["tiny_gemma3", "tiny_qwen2_moe"])
def test_logits_match_transformers(model, request):
    """fp32 logits of every prompt position equal transformers' (Gemma 3's soft cap, which greedy tokens cannot
    see, included), for a prompt far longer than Gemma's sliding window."""
    folder = request.getfixturevalue(model)
    engine = DecodeEngine(EngineConfig(model=str(folder), dtype="fp32", device="cpu", page_size=8))
    ids = [random.Random(6).randrange(8, 384) for _ in range(50)]
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        want = hf(torch.tensor([ids])).logits[0]
    if model == "tiny_gemma3":
        assert want.abs().max() < 30  # capped at 30
    torch.testing.assert_close(engine.score(ids), want, atol=1e-4, rtol=1e-4)
