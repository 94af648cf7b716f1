"""One numerics for a token, wherever it is computed, in the mode serve's defaults pick (on this CPU: the native
quantized kernels; README, 'Modes'): a token's KV bytes and its logits are the same bits in a prompt chunk of
any size and in a decode step of any batch, so a batch gives every request the tokens it gets alone (greedy and
seeded sampling), prompt chunks of 16, 64 and 512 tokens write the same KV bytes and sample the same first token,
and a request resumed after tokens it streamed (migration: its prompt and those tokens prefilled again) goes on
exactly as the undisturbed one, colocated and disaggregated. Every test runs the embedded model with
`EngineConfig`'s defaults (serve's), a smaller KV cache aside."""

from __future__ import annotations

import pytest
import torch

from splitserve import LLM, SamplingParams
from splitserve.decode.engine import DecodeEngine
from splitserve.engine.config import EngineConfig
from splitserve.engine.request import EngineRequest
from splitserve.kernels import cpu_quant
from splitserve.prefill.engine import PrefillEngine
from tests.test_migration import PARAMS

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not cpu_quant.available(), reason="no native CPU kernels here")]

DEFAULTS = dict(device="cpu", kv_cache_memory="128MiB")  # serve's defaults but for the KV cache's size
TEXTS = [f"Write a short story about a {w} who learns to fly, in the style of a fairy tale told by an old sailor."
         for w in ("cat", "dog", "robot", "tree", "fish", "king", "child", "cloud")]  # fmt: skip


@pytest.fixture(scope="module")
def llm() -> LLM:
    llm = LLM(**DEFAULTS)
    assert llm.engine.config.resolved_quantization != "none"  # the quantized path, not the exact fp32 one
    return llm


def test_a_batch_gives_each_request_the_tokens_it_gets_alone(llm):
    prompts = [text * (1 + i % 3) for i, text in enumerate(TEXTS)] * 2  # 8 greedy, 8 seeded; lengths differ
    params = [SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)] * 8 + [
        SamplingParams(max_tokens=48, temperature=0.8, top_p=0.95, seed=100 + i, ignore_eos=True) for i in range(8)
    ]
    together = llm.generate(prompts, params, use_tqdm=False)
    alone = [llm.generate([p], s, use_tqdm=False)[0] for p, s in zip(prompts, params, strict=True)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert len({tuple(o.token_ids) for o in together[8:]}) == 8  # the seeds do sample differently


def _kv_by_position(engine, pages: list[int], positions: int) -> torch.Tensor:
    """The KV bytes of a request's first `positions` tokens: [positions, layers, 2, kv_heads, head_dim]."""
    kv = engine.runner.kv_cache[pages].transpose(1, 3)  # [pages, page_size, 2, layers, ...]
    return kv.flatten(0, 1)[:positions].transpose(1, 2).clone()


def test_prompt_chunks_of_any_size_and_decode_steps_write_the_same_kv_bytes(llm):
    """A decode engine prefills a prompt and decodes 40 tokens; prefill engines with chunks of 16, 64 and 512
    tokens then compute the prompt and those tokens again (a migration's prefill): every position's KV bytes and
    the next token are the same in all four."""
    prompt = llm.tokenizer.encode(" ".join(TEXTS) * 3)[:600]
    decode = llm.engine
    decode.add_request(EngineRequest("d", prompt, SamplingParams(max_tokens=41, temperature=0, ignore_eos=True)))
    out = []
    while len(out) < 41:
        out += [u.token_id for u in decode.step()]
        if len(out) == 40:
            request = decode._requests["d"]
            computed = request.num_computed_tokens
            reference = _kv_by_position(decode, request.pages, computed)
    while decode.has_unfinished():
        decode.step()
    assert computed == len(prompt) + 39  # the 40th token's KV is written by the step that samples the 41st
    for chunk in (16, 64, 512):
        prefill = PrefillEngine(EngineConfig(max_num_batched_tokens=chunk, **DEFAULTS))
        prefill.add_request(
            EngineRequest("p", prompt, SamplingParams(max_tokens=41, temperature=0), output_token_ids=out[:40])
        )
        done = []
        while prefill.has_work():
            done += prefill.step()
        (first,) = done
        assert first.token_id == out[40], chunk
        assert torch.equal(_kv_by_position(prefill, first.request.pages, computed), reference), chunk
        prefill.release("p")


@pytest.fixture(scope="module")
def engines():
    cfg = EngineConfig(page_size=8, max_num_batched_tokens=16, **DEFAULTS)
    return PrefillEngine(cfg), DecodeEngine(cfg)


@pytest.mark.parametrize("path", ["colocated", "disaggregated"])
@pytest.mark.parametrize("kind", sorted(PARAMS))
def test_a_resumed_request_continues_the_undisturbed_one(engines, kind, path):
    from tests.test_migration import _colocated, _disaggregated

    prefill, decode = engines
    params = PARAMS[kind]

    def run(resumed: list[int]) -> list[int]:
        return (
            _colocated(decode, params, resumed)
            if path == "colocated"
            else _disaggregated(prefill, decode, params, resumed)
        )

    whole = run([])
    assert len(whole) == 24
    for k in (1, 5, 8, 17, 23):
        assert run(whole[:k]) == whole[k:], k


def test_resuming_warns_only_where_the_mode_is_not_one_numerics(engines, tiny_llama_gqa, caplog):
    _, decode = engines
    assert decode.numerics_differ is None
    exact = DecodeEngine(EngineConfig(model=str(tiny_llama_gqa), dtype="fp32", device="cpu", page_size=8))
    assert "torch's GEMMs" in exact.numerics_differ
    int8_kv = DecodeEngine(EngineConfig(model=str(tiny_llama_gqa), device="cpu", kv_dtype="int8", page_size=8))
    assert "int8 KV cache" in int8_kv.numerics_differ
    params = SamplingParams(max_tokens=4, temperature=0)
    with caplog.at_level("WARNING", logger="splitserve.engine.core"):
        decode.add_request(EngineRequest("one", [1, 2, 3], params, output_token_ids=[4]))
        exact.add_request(EngineRequest("other", [1, 2, 3], params, output_token_ids=[4]))
    for engine in (decode, exact):
        while engine.has_unfinished():
            engine.step()
    warned = [r.getMessage() for r in caplog.records if "resumes after" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("request other resumes after 1 tokens"), warned
