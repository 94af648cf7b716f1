"""Quantized linear layers on the CPU (int8 weights: weight-only `int8`, `w8a8` and `w8a7` with 8- and 7-bit
activations; 4-bit weights: `w4a8`): the AVX2 kernel equals its reference, the quantized engine's greedy tokens
equal transformers' on the same (dequantized) weights, the fused decode step equals the layer-by-layer one, the
embedded GGUF model's Q4_1 weights come back exactly from 4 bits, and on the embedded model every mode keeps
quality: top-1 agreement with the unquantized model >= 90% and perplexity within 5% on a fixed text."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from splitserve import LLM, SamplingParams
from splitserve.bench import quality
from splitserve.engine.config import CPU_QUANTIZATIONS
from splitserve.kernels import cpu_quant

pytestmark = pytest.mark.skipif(not cpu_quant.available(), reason="no int8 CPU kernel here (no AVX2/FMA or compiler)")


def _quantized_activations(x: torch.Tensor, bits: int) -> torch.Tensor:
    """What the w8a8 (w8a7) kernel computes with instead of `x`: each block of 32 values of a row (the last one
    zero-padded) rounded to 255 (127) levels of its largest magnitude, in fp32 as the kernel rounds."""
    rows, k = x.shape
    levels = 2 ** (bits - 1) - 1
    blocks = torch.nn.functional.pad(x, (0, -k % 32)).view(rows, -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / levels
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return ((blocks * inv).round() * d).view(rows, -1)[:, :k]


MODES = CPU_QUANTIZATIONS  # mode: (weight bits, activation bits)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16, 48, 49, 70, 128, 129])
@pytest.mark.parametrize(("k", "n", "bias"), [(64, 96, False), (72, 30, True), (13, 5, True), (576, 1537, False)])
def test_kernel_equals_its_reference(rows, k, n, bias, mode):
    torch.manual_seed(rows * 1000 + n)
    linear = nn.Linear(k, n, bias=bias)
    weight_bits, bits = MODES[mode]
    q = cpu_quant.QuantizedLinear(linear, bits, weight_bits)
    x = torch.randn(rows, k)
    # A decode step's rows run the int8 kernel; a prefill's many rows the fp32 weights.
    weight = q.dequantized() if rows <= q.max_rows else linear.weight
    if bits != 32 and rows <= q.max_rows:
        x_used = _quantized_activations(x, bits)
        assert (x_used - x).abs().max() > 0  # the reference does quantize
    else:
        x_used = x
    want = x_used.double() @ weight.double().t() + (linear.bias.double() if bias else 0)
    got = q(x)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    torch.testing.assert_close(got.double(), want, atol=1e-4 * math.sqrt(k), rtol=1e-4)
    assert q(x.view(1, rows, k)).shape == (1, rows, n)  # leading dimensions are kept


@pytest.mark.parametrize("mode", MODES)
def test_vnni_and_avx2_builds_give_the_same_bytes(mode):
    """The kernels built for this CPU (VNNI's vpdpbusd where it has it, on 512-bit vectors with AVX512), for plain
    AVX2 (`x86-64-v3`: maddubs and madd) and, where the CPU has it, for AVX-VNNI (256-bit vpdpbusd) give
    byte-equal outputs, from a decode row to a prompt's many rows. On a CPU without VNNI the builds take the AVX2
    path, and the test still checks that they agree."""
    from splitserve.kernels import cpu_kernels

    avx2 = cpu_kernels.library("x86-64-v3")
    assert cpu_kernels.instructions(avx2) == "AVX2"
    builds = [avx2]
    if "avx_vnni" in Path("/proc/cpuinfo").read_text().split():  # the 256-bit-only VNNI of CPUs without AVX512
        builds.append(cpu_kernels.library("x86-64-v3", ("-mavxvnni",)))
        assert cpu_kernels.instructions(builds[-1]) == "AVX-VNNI"
    torch.manual_seed(7)
    weight_bits, bits = MODES[mode]
    for k, n in ((576, 1536), (72, 30), (72, 36)):  # 36: an odd number of 8-channel groups
        q = cpu_quant.QuantizedLinear(nn.Linear(k, n), bits, weight_bits)
        for rows in (1, 3, 4, 17, 64, 300) if bits != 32 else (1, 3, cpu_quant.KERNEL_MAX_ROWS):
            x = torch.randn(rows, k) * 3
            native = q(x)
            for build in builds:
                q._lib = build
                assert torch.equal(q(x), native), (cpu_kernels.instructions(build), k, n, rows)
            q._lib = cpu_kernels.library()


@pytest.mark.parametrize(("n", "k"), [(4, 32), (5, 13), (30, 72), (1537, 576)])
def test_packing_round_trips(n, k):
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    packed = cpu_quant.pack(w)
    assert packed.numel() == -(-n // 4) * 4 * -(-k // 32) * 32
    assert torch.equal(cpu_quant.unpack(packed, n, k), w)
    if n >= 4 and k >= 32:  # a block of 32 inputs holds 4 channels' weights one after another
        assert torch.equal(packed[:128].view(4, 32), w[:4, :32])
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    packed4 = cpu_quant.pack4(q)
    assert packed4.numel() == -(-n // 8) * 8 * -(-k // 32) * 16
    assert torch.equal(cpu_quant.unpack4(packed4, n, k), q)
    if n >= 8 and k >= 32:  # the first run of 32 bytes: inputs 0-3 (low nibbles) and 16-19 (high) of 8 channels
        assert torch.equal(packed4[:32].view(8, 4) & 15, q[:8, :4])
        assert torch.equal(packed4[:32].view(8, 4) >> 4, q[:8, 16:20])


def test_quantize_round_trips_within_half_a_step():
    w = torch.randn(40, 64) * torch.linspace(0.01, 10, 40)[:, None]
    qweight, scale = cpu_quant.quantize(w)
    assert qweight.dtype == torch.int8 and qweight.abs().max() <= 127
    assert ((qweight.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()
    q, d, m = cpu_quant.quantize4(w)
    assert q.dtype == torch.uint8 and q.max() <= 15 and d.shape == m.shape == (40, 2)
    back = (q.float().view(40, 2, 32) * d[..., None] + m[..., None]).view(40, 64)
    assert ((back - w).abs().view(40, 2, 32) <= d[..., None] / 2 + 1e-6).all()
    # weights that are 4-bit already (a GGUF model's Q4_1) come back exactly
    assert torch.equal(cpu_quant.quantize4(back)[0], q)


@pytest.mark.slow
def test_the_embedded_models_q4_1_weights_come_back_exactly_from_4_bits(smollm2):
    def model(quantization: str) -> nn.Module:
        llm = LLM(str(smollm2), dtype="fp32", quantization=quantization, kv_cache_memory="16MiB")
        return llm.engine.runner.model

    exact = dict(model("none").named_modules())
    quantized = model("w4a8")
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, cpu_quant.QuantizedLinear)}
    assert sum(m.weight_bits == 4 for m in layers.values()) == 4 * quantized.cfg.num_layers
    for name, layer in layers.items():
        if layer.weight_bits == 4:
            assert torch.equal(layer.dequantized(), exact[name].weight), name
    assert layers["lm_head"].weight_bits == 8  # the LM head stays 8-bit, as the file's Q8_0 embedding table


@pytest.mark.parametrize("model", ["tiny_llama_gqa", "tiny_qwen3", "tiny_gemma3", "tiny_mixtral", "tiny_qwen2_moe"])
def test_int8_engine_equals_transformers_on_the_same_weights(model, request):
    """Quantization changes the weights, nothing else: transformers' model with every linear layer's weight
    (and every expert's) replaced by its int8 round trip makes the same greedy tokens as the int8 engine (whose
    steps here all have at most KERNEL_MAX_ROWS rows, so every one runs on the int8 weights). Qwen 3's and
    Gemma 3's layers keep the layer-by-layer path (the fused native step has neither); a mixture's router stays
    exact (a changed score would change which experts run)."""
    folder = request.getfixturevalue(model)
    llm = LLM(str(folder), dtype="fp32", quantization="int8", page_size=8)
    runner_model = llm.engine.runner.model
    assert isinstance(runner_model.lm_head, cpu_quant.QuantizedLinear)
    if runner_model.cfg.num_experts:
        moe = runner_model.model.layers[0].mlp
        assert isinstance(moe.experts[0].gate_up_proj, cpu_quant.QuantizedLinear)
        assert isinstance(moe.gate.weight, nn.Parameter)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def round_trip(w: torch.Tensor) -> torch.Tensor:
        q, s = cpu_quant.quantize(w)
        return q.float() * s[:, None]

    with torch.no_grad():
        for name, module in list(hf.named_modules()):
            if isinstance(module, nn.Linear):
                module.weight = nn.Parameter(round_trip(module.weight))  # also unties the LM head from the embedding
            elif name.endswith(".experts"):  # [experts, out, in] tensors: each expert's matrix row by row
                for p in (module.gate_up_proj, module.down_proj):
                    p.copy_(torch.stack([round_trip(w) for w in p]))
    prompts = [[11, 12, 13, 14], [40, 41], [100, 200, 300, 150, 20, 21, 22] * 5]
    assert sum(map(len, prompts)) <= cpu_quant.KERNEL_MAX_ROWS
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
        assert out.token_ids == ids[len(prompt) :]


class _Counting:
    """Wraps a FusedDecoder, counting the steps it ran."""

    def __init__(self, fused):
        self.fused, self.calls = fused, 0

    def takes(self, *args):
        return self.fused.takes(*args)

    def __call__(self, *args):
        self.calls += 1
        return self.fused(*args)


@pytest.mark.parametrize("quantization", MODES)
@pytest.mark.parametrize("model", ["tiny_llama_gqa", "tiny_qwen2"])
def test_fused_decode_step_equals_layer_by_layer(model, quantization, request):
    """The fused native decode step runs the same kernels in the same order as the layer-by-layer path
    (`--enforce-eager`): the same tokens and the same logprobs, bit for bit (Qwen2 has q/k/v biases)."""
    path = str(request.getfixturevalue(model))
    eager = LLM(path, dtype="fp32", quantization=quantization, page_size=4, enforce_eager=True)
    fused = LLM(path, dtype="fp32", quantization=quantization, page_size=4)
    assert eager.engine.runner.model.fused_decode is None
    counting = _Counting(fused.engine.runner.model.fused_decode)
    fused.engine.runner.model.fused_decode = counting
    prompts = [[11, 12, 13], list(range(30, 70)), [5] * 9, list(range(200, 217))]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=3)
    a = eager.generate(prompts, params, use_tqdm=False)
    b = fused.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.logprobs for o in a] == [o.logprobs for o in b]
    assert counting.calls >= 19  # every step after the prompts' was fused


@pytest.mark.slow
@pytest.mark.parametrize("quantization", MODES)
def test_quantization_keeps_the_embedded_models_quality(smollm2, quantization):
    (q,) = quality.compare(None, [quantization])
    print(f"{quantization}, {q.tokens} tokens: top-1 agreement {q.agreement:.1%}, "
          f"perplexity {q.reference_perplexity:.3f} -> {q.perplexity:.3f}")  # fmt: skip
    assert q.agreement >= 0.9
    assert abs(q.perplexity_change) <= 0.05
