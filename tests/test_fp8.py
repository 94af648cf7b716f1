"""FP8 weights (`--quantization fp8`, a CUDA mode): the kernel's math against its reference on the CPU (Triton
under TRITON_INTERPRET=1, see conftest), the tensor-core path's (`torch._scaled_mm`, which also runs on the
CPU), the engine's greedy tokens with the fp8 layers against the same model with its weights rounded as they
see them, a clear refusal where fp8 cannot run, and the embedded model's quality with its weights rounded.
The kernel tests also run natively on a GPU (`TRITON_INTERPRET=0`, as `scripts/gpu_check.sh` runs them)."""

from __future__ import annotations

import os

import pytest
import torch

from splitserve.bench import quality
from splitserve.engine.config import EngineConfig
from splitserve.engine.params import SamplingParams
from splitserve.kernels import fp8
from splitserve.llm import LLM

NATIVE = os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available()
DEVICE = torch.device("cuda" if NATIVE else "cpu")
# On a GPU, fp32 dots run in tf32 (Triton's default) and the tensor-core path's output is bf16.
TOLERANCE = 2e-2 if NATIVE else 1e-4


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40])
def test_the_weight_only_kernel_multiplies_by_the_weights_as_dequantized(rows):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(48, 72, generator=g) * torch.rand(48, 1, generator=g)  # channels of different ranges
    x = torch.randn(rows, 72, generator=g)
    qweight, scale = fp8.quantize(weight)
    assert qweight.dtype == torch.float8_e4m3fn and scale.shape == (48,)
    rounded = fp8.dequantize(qweight, scale)
    assert (rounded - weight).abs().max() <= weight.abs().amax(1, keepdim=True).max() / 16  # 3 mantissa bits
    got = fp8.fp8_linear(x.to(DEVICE), qweight.to(DEVICE), scale.to(DEVICE)).cpu()
    torch.testing.assert_close(got, x @ rounded.T, rtol=TOLERANCE / 10, atol=TOLERANCE / 10)


def test_the_tensor_core_path_quantizes_each_row_and_multiplies_the_same_weights():
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(32, 64, generator=g), torch.randn(24, 64, generator=g) * torch.rand(24, 1, generator=g)
    qweight, scale = fp8.quantize(weight)
    x_rounded = fp8.dequantize(*fp8.quantize(x))  # each row through fp8 with its own scale
    want = x_rounded @ fp8.dequantize(qweight, scale).T
    dtype = torch.bfloat16 if NATIVE else torch.float32  # what the GPU's rowwise-scaled fp8 GEMM writes
    got = fp8.scaled_mm(x.to(DEVICE, dtype), qweight.to(DEVICE), scale.to(DEVICE)).float().cpu()
    torch.testing.assert_close(got, want, rtol=TOLERANCE, atol=TOLERANCE)


def test_fp8_is_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match=r"--quantization fp8: it needs a CUDA device of compute capability 8\.9"):
        EngineConfig(quantization="fp8", device="cpu")


@pytest.mark.skipif(NATIVE, reason="the CPU proof: on a GPU the GPU check times the real thing")
def test_the_engine_with_fp8_layers_gives_the_tokens_of_its_rounded_weights(tiny_llama_gqa, monkeypatch):
    """On the CPU (the check that refuses it lifted): every pass of at most 16 rows goes through the Triton
    kernel, which must give the greedy tokens of the same model in fp32 with its weights rounded through fp8."""
    monkeypatch.setattr(fp8, "unsupported", lambda device: None)
    options = dict(dtype="fp32", device="cpu", page_size=4, max_num_batched_tokens=16, kv_cache_memory="4MiB")
    ours = LLM(str(tiny_llama_gqa), quantization="fp8", **options)
    layers = ours.engine.runner.model.model.layers
    assert all(isinstance(layer.mlp.down_proj, fp8.Fp8Linear) for layer in layers)
    assert not isinstance(ours.engine.runner.model.lm_head, fp8.Fp8Linear)
    reference = LLM(str(tiny_llama_gqa), quantization="none", **options)
    fp8.round_weights(reference.engine.runner.model.model.layers)
    prompts = [[11, 12, 13], list(range(30, 44)), [5] * 9]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    got = [o.token_ids for o in ours.generate(prompts, params, use_tqdm=False)]
    want = [o.token_ids for o in reference.generate(prompts, params, use_tqdm=False)]
    assert got == want
    unrounded = LLM(str(tiny_llama_gqa), quantization="none", **options)
    assert [o.token_ids for o in unrounded.generate(prompts, params, use_tqdm=False)] != want, (
        "rounding changes no token here: the comparison would not see a kernel that ignores the scales"
    )


@pytest.mark.slow
@pytest.mark.skipif(NATIVE, reason="a CPU measure")
def test_fp8_weights_keep_the_embedded_models_perplexity_within_1_percent(smollm2):
    (q,) = quality.compare(None, ["fp8"])
    print(f"fp8, {q.tokens} tokens: top-1 agreement {q.agreement:.1%}, "
          f"perplexity {q.reference_perplexity:.3f} -> {q.perplexity:.3f}")  # fmt: skip
    assert abs(q.perplexity_change) <= 0.01
