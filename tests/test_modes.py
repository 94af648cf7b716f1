"""What `--dtype auto --quantization auto` (serve's defaults) runs for each kind of checkpoint (README, 'Modes'):
a test per row. On the CPU where the native kernels build, a 4-bit GGUF file runs its own 4-bit weights, exactly
(Q4_0, Q4_1 and Q4_K blocks come back bit for bit from the kernel's layout); every other kind runs int8 weights
(w8a8); the start-up line says what was chosen and why. Where the kernels cannot build, bf16 on CPUs with native
bf16, fp32 elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from splitserve import LLM, SamplingParams
from splitserve.engine import config
from splitserve.engine.config import EngineConfig
from splitserve.kernels import cpu_kernels, cpu_quant
from splitserve.model.checkpoint import resolve_model
from tests import checkpoints

pytestmark = pytest.mark.skipif(not cpu_quant.available(), reason="no native CPU kernels here")

# (kind, how it is made, the mode auto picks, its GGUF layer types, the down projections' weight bits)
GGUF_ROWS = [
    ("Q4_0", {}, "w4a8", ["Q4_0"], 4),
    ("Q4_1", {}, "w4a8", ["Q4_1"], 4),
    ("Q4_K", {"other": "Q4_0"}, "w4a8", ["Q4_0", "Q4_K"], 4),  # K-quants need rows of 256: 32-block types elsewhere
    ("Q6_K", {"other": "Q4_0"}, "w4a8", ["Q4_0", "Q6_K"], 8),  # a Q4_K_M file's wider matrices keep 8 bits
    ("Q6_K", {"other": "Q8_0"}, "w8a8", ["Q6_K", "Q8_0"], 8),
    ("Q8_0", {}, "w8a8", ["Q8_0"], 8),
    ("F16", {}, "w8a8", ["F16"], 8),
]
IDS = [f"{kind}+{made['other']}" if made else kind for kind, made, *_ in GGUF_ROWS]


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gguf-kinds")
    files = {}
    for name, (kind, made, *_) in zip(IDS, GGUF_ROWS, strict=True):
        (folder / name).mkdir()
        files[name] = checkpoints.gguf_variant(folder / name, kind, **made)
    return files


def _serves(model: str, **options) -> tuple[LLM, list[int]]:
    """The engine as serve's defaults build it, and its greedy tokens for a short prompt."""
    llm = LLM(model, device="cpu", kv_cache_memory="32MiB", **options)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    out = llm.generate([[1, 2, 3, 4, 5]], params, use_tqdm=False)
    assert len(out[0].token_ids) == 8
    return llm, out[0].token_ids


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "mode", "types", "down_bits"), [(i, r[2], r[3], r[4]) for i, r in zip(IDS, GGUF_ROWS, strict=True)]
)
def test_each_gguf_kind_runs_its_documented_mode(gguf_files, name, mode, types, down_bits):
    path = str(gguf_files[name])
    engine = EngineConfig(model=path, device="cpu")
    assert (engine.resolved_dtype, engine.resolved_quantization) == ("fp32", mode)
    line = engine.describe_dtype()
    assert f"{mode} weights (auto: a GGUF file of {'/'.join(types)} layers" in line
    assert cpu_kernels.instructions() in line
    llm, tokens = _serves(path)
    layers = {n: m for n, m in llm.engine.runner.model.named_modules() if isinstance(m, cpu_quant.QuantizedLinear)}
    bits = 4 if mode == "w4a8" else 8
    for name, layer in layers.items():
        want = 8 if name == "lm_head" else down_bits if name.endswith("down_proj") else bits
        assert layer.weight_bits == want, name
    weights = load_file(resolve_model(path) / "model.safetensors")
    for name, layer in layers.items():
        if layer.weight_bits == 4:  # the file's own 4-bit weights, every block exactly
            parts = _UNFUSED.get(name.split(".")[-1], [])
            want = [weights[f"{name.replace(ours, theirs)}.weight"] for ours, theirs in parts]
            assert torch.equal(layer.dequantized(), torch.cat(want) if want else weights[f"{name}.weight"]), name
    if len({m.weight_bits for m in layers.values()}) > 1:  # the fused step takes each matrix's own bits
        assert _serves(path, enforce_eager=True)[1] == tokens


# Our fused projections, as the checkpoint's tensors stacked.
_UNFUSED = {
    "qkv_proj": [("qkv_proj", "q_proj"), ("qkv_proj", "k_proj"), ("qkv_proj", "v_proj")],
    "gate_up_proj": [("gate_up_proj", "gate_proj"), ("gate_up_proj", "up_proj")],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_safetensors_checkpoint_of_any_dtype_runs_int8_weights(tmp_path, dtype):
    cfg = LlamaConfig(**checkpoints.COMMON, num_attention_heads=8, num_key_value_heads=2)
    checkpoints.save(LlamaForCausalLM, cfg, tmp_path, seed=3)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    model.save_pretrained(tmp_path)
    engine = EngineConfig(model=str(tmp_path), device="cpu")
    assert (engine.resolved_dtype, engine.resolved_quantization) == ("fp32", "w8a8")
    assert "w8a8 weights (auto: a safetensors checkpoint runs int8 weights" in engine.describe_dtype()
    _serves(str(tmp_path))


def test_an_explicit_dtype_or_no_quantization_keeps_the_weights_exact(smollm2):
    assert EngineConfig(device="cpu", dtype="fp32").resolved_quantization == "none"
    assert EngineConfig(device="cpu", quantization="none").resolved_quantization == "none"
    assert EngineConfig(device="cpu", dtype="fp32").describe_dtype() == "fp32"


@pytest.mark.parametrize("bf16", [True, False])
def test_without_native_kernels_auto_is_bf16_where_native_else_fp32(monkeypatch, bf16):
    monkeypatch.setattr(cpu_quant, "available", lambda: False)
    monkeypatch.setattr(config, "cpu_has_bf16", lambda: bf16)
    engine = EngineConfig(device="cpu")
    assert (engine.resolved_dtype, engine.resolved_quantization) == ("bf16" if bf16 else "fp32", "none")
    assert "no native kernels here" in engine.describe_dtype()
    # with the kernels, bf16 hardware does not matter: the quantized kernels are faster on every CPU measured
    monkeypatch.setattr(cpu_quant, "available", lambda: True)
    assert EngineConfig(device="cpu").resolved_dtype == "fp32"
    assert config.fast_dtype(torch.device("cuda")) == "bf16"
