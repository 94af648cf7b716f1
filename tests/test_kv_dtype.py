"""`--kv-dtype`: a KV cache stored narrower than the model computes (fp16 or bf16 under fp32 weights). A page
holds half the bytes, so the same memory holds twice the tokens; every CPU attention path reads the pages as
they are stored and agrees with the others token for token; pages move between workers as stored (half the
bytes on the link); workers whose pages differ in type do not pair."""

from __future__ import annotations

import random
import time

import pytest
import torch

from splitserve.bench import quality
from splitserve.bench.metrics import prometheus_total
from splitserve.engine.config import EngineConfig
from splitserve.engine.kv_cache import page_bytes
from splitserve.engine.params import SamplingParams
from splitserve.kernels import cpu_kernels, kv_format
from splitserve.launcher import ServeProcess
from splitserve.llm import LLM
from splitserve.model.checkpoint import resolve_model
from splitserve.model.config import ModelConfig
from splitserve.planner.link import resolve as resolve_link
from tests.helpers import run_staggered
from tests.test_serving import complete

NARROW = {"fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}


@pytest.mark.parametrize("kv_dtype", NARROW)
def test_a_narrower_cache_holds_more_tokens_and_does_not_pair_with_a_wider_one(tiny_llama_gqa, kv_dtype):
    """fp16/bf16 pages take half the bytes of fp32 ones; int8 a quarter, and a 4-byte scale per layer, K or V,
    and KV head."""
    wide = LLM(str(tiny_llama_gqa), dtype="fp32", kv_cache_memory="4MiB")
    narrow = LLM(str(tiny_llama_gqa), dtype="fp32", kv_dtype=kv_dtype, kv_cache_memory="4MiB")
    cache = narrow.engine.runner.kv_cache
    assert cache.dtype == NARROW[kv_dtype] and wide.engine.runner.kv_cache.dtype == torch.float32
    cfg = narrow.engine.model_config
    page, wide_page = (kv_format.pages(llm.engine.runner.kv_cache).shape[1] for llm in (narrow, wide))
    scales = cfg.num_layers * 2 * cfg.num_kv_heads * 4 if kv_dtype == "int8" else 0
    assert (page - scales) * (4 if kv_dtype == "int8" else 2) == wide_page
    assert narrow.engine.runner.num_pages == 4 * 2**20 // page > wide.engine.runner.num_pages * 1.9
    problem = narrow.engine.compat_key.mismatch(wide.engine.compat_key)
    assert problem == f"kv_dtype: {str(NARROW[kv_dtype]).removeprefix('torch.')!r} here, 'float32' there"
    assert EngineConfig(dtype="fp32", kv_dtype=kv_dtype).describe_dtype() == f"fp32, {kv_dtype} KV cache"
    with pytest.raises(ValueError, match="kv_dtype must be"):
        EngineConfig(kv_dtype="int3")


@pytest.mark.parametrize("kv_dtype", NARROW)
def test_every_path_reads_a_narrower_cache_alike(tiny_qwen2, kv_dtype, monkeypatch):
    """The PyTorch reference (pages converted to fp32, then SDPA), the native CPU kernels (pages read as stored,
    converted in registers) and the Triton kernels (under the interpreter here): the same greedy tokens over
    batches that mix decode rows with prefill chunks. The narrower cache changes the logits (it is not fp32),
    so the test also checks that it is in use."""
    rng = random.Random(5)
    prompts = [[rng.randrange(8, 384) for _ in range(n)] for n in (1, 9, 23, 40, 70)]
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)] * len(prompts)
    outputs, logits = {}, {}
    # The Triton engine (slow under the interpreter) for int8, whose rows and scales it writes and reads itself;
    # its fp16/bf16 reads and writes are the kernel tests' (tests/test_kernels.py).
    triton = [("triton", kv_dtype)] if kv_dtype == "int8" else []
    for mode, kv in (("reference", kv_dtype), ("auto", kv_dtype), *triton, ("auto", "fp32")):
        monkeypatch.setenv("SPLITSERVE_KERNELS", mode)
        llm = LLM(str(tiny_qwen2), dtype="fp32", kv_dtype=kv, page_size=16, max_num_batched_tokens=24)
        outputs[mode, kv], mixed = run_staggered(llm.engine, prompts, params, [0, 1, 2, 4, 4])
        assert mixed > 0
        logits[mode, kv] = llm.engine.score(prompts[2])  # 23 tokens
    assert (
        outputs["reference", kv_dtype]
        == outputs["auto", kv_dtype]
        == outputs.get(("triton", kv_dtype), outputs["auto", kv_dtype])
    )
    narrow, wide = logits["auto", kv_dtype], logits["auto", "fp32"]
    assert not torch.equal(narrow, wide)  # the pages were stored narrower
    tol = 0.2 if kv_dtype == "int8" else 0.05
    torch.testing.assert_close(narrow, wide, atol=tol, rtol=0.05)


@pytest.mark.skipif(cpu_kernels.library() is None, reason="no native CPU kernels here (no AVX2/FMA or compiler)")
@pytest.mark.parametrize("kv_dtype", NARROW)
def test_the_fused_decode_step_writes_and_reads_a_narrower_cache_as_the_layer_by_layer_path(tiny_qwen2, kv_dtype):
    """The fused native step converts K/V into the cache in C (rounding to nearest even, as torch does), the
    layer-by-layer path in torch: the same tokens, logprobs bit for bit, and the same pages byte for byte."""
    prompts = [[11, 12, 13], list(range(30, 70)), [5] * 9]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=3)
    runs = {}
    for eager in (True, False):
        llm = LLM(str(tiny_qwen2), dtype="fp32", kv_dtype=kv_dtype, quantization="w8a8", page_size=4,
                  enforce_eager=eager, prefix_caching=False)  # fmt: skip
        assert (llm.engine.runner.model.fused_decode is None) == eager
        kv_format.pages(llm.engine.runner.kv_cache).zero_()
        outs = llm.generate(prompts, params, use_tqdm=False)
        pages = kv_format.pages(llm.engine.runner.kv_cache).clone()  # values, and an int8 cache's scales
        runs[eager] = ([o.token_ids for o in outs], [o.logprobs for o in outs], pages)
    assert runs[True][0] == runs[False][0] and runs[True][1] == runs[False][1]
    assert torch.equal(runs[True][2], runs[False][2])
    assert runs[False][2].count_nonzero() > 0


@pytest.mark.slow
@pytest.mark.parametrize("kv_dtype", ["fp16", "int8"])
def test_served_pools_move_the_narrower_pages_as_stored(tiny_chat_llama, kv_dtype):
    """1P+1D with --kv-dtype fp16 or int8: greedy tokens equal the colocated engine's with the same cache (the
    decode worker appends to the last page it received: an int8 page's scales came with it), and the prefill
    worker sent the prompt's pages as stored: half of what fp32 pages take for fp16, a quarter and the scales
    for int8."""
    args = ["--prefill", "1", "--decode", "1", "--dtype", "fp32", "--kv-dtype", kv_dtype, "--page-size", "8",
            "--no-prefix-caching"]  # fmt: skip
    prompt = list(range(100, 181))  # 81 tokens: 11 pages
    local = LLM(str(tiny_chat_llama), dtype="fp32", kv_dtype=kv_dtype, page_size=8)
    [want] = local.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
    server = ServeProcess(tiny_chat_llama, args, num_workers=2)
    try:
        model = server.http.get("/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        _, tokens, _ = complete(server.http, "/v1/completions", body)
        assert tokens == want.token_ids
        server.wait_idle(timeout=5)
        sent = 0.0
        for _ in range(20):  # the workers' next heartbeats carry their counters
            sent = prometheus_total(server.http.get("/metrics").text, "splitserve_kv_bytes_sent_total")
            if sent:
                break
            time.sleep(0.3)
        cfg = local.engine.model_config
        scales = cfg.num_layers * 2 * cfg.num_kv_heads * 4 if kv_dtype == "int8" else 0
        assert sent == 11 * page_bytes(cfg, 8, NARROW[kv_dtype])
        assert sent - 11 * scales == 11 * page_bytes(cfg, 8, torch.float32) / (4 if kv_dtype == "int8" else 2)
        # `splitserve plan --link URL` learns the link from these transfers
        link = resolve_link(server.url)
        assert link.bandwidth > 0 and link.source == f"learned from {sent / 1e6:.3g} MB sent by {server.url}"
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "limit"), [("kv-fp16", 0.01), ("kv-bf16", 0.03), ("kv-int8", 0.03)])
def test_a_narrower_cache_keeps_the_embedded_models_quality(smollm2, mode, limit):
    """Fewer KV bytes a token, perplexity within 1% of the fp32 cache's for fp16 and 3% for int8 (the issue's
    targets; bf16 held to 3%)."""
    (q,) = quality.compare(None, [mode])
    print(f"{mode}: top-1 agreement {q.agreement:.1%}, perplexity {q.reference_perplexity:.3f} -> {q.perplexity:.3f}")
    assert abs(q.perplexity_change) <= limit and q.agreement >= 0.9
    config = ModelConfig.from_pretrained(resolve_model(None))
    page_size = EngineConfig().page_size
    fewer = page_bytes(config, page_size, torch.float32) / page_size / q.kv_bytes_per_token
    values = page_size * config.head_dim  # an int8 block's values per head, and a 4-byte scale
    assert fewer == (2 if mode != "kv-int8" else 4 * values / (values + 4)) and fewer > (
        3.98 if mode == "kv-int8" else 0
    )
