"""Tiny random checkpoints (Llama, Qwen 2 and 3, mixtures of experts) written with transformers: the test
suite's fixtures and `scripts/gpu_check.py` build their models here."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)


def save(model_cls, config, folder: Path, seed: int, random_norms: bool = False) -> Path:
    """A random fp32 checkpoint of `config` in `folder`; `random_norms`: norm weights drawn around 1 too (not
    all ones, so that a norm applied with the wrong weight, or not at all, changes the tokens)."""
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    # Wider weights than the default init keep the logits apart, so greedy choices are not near-ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
            elif random_norms and "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    return folder


COMMON = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    max_position_embeddings=256,
    eos_token_id=7,
    bos_token_id=1,
    pad_token_id=0,
)


def tiny_llama_gqa(folder: Path) -> Path:
    """Llama with grouped-query attention (4 query heads per KV head), tied embeddings."""
    cfg = LlamaConfig(**COMMON, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    return save(LlamaForCausalLM, cfg, folder, seed=1)


def tiny_qwen2(folder: Path) -> Path:
    """Qwen2 with q/k/v bias and GQA."""
    cfg = Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return save(Qwen2ForCausalLM, cfg, folder, seed=2)


def tiny_qwen3(folder: Path) -> Path:
    """Qwen 3: per-head q/k RMS norms, no q/k/v bias, a head_dim (32) other than hidden / heads (16)."""
    cfg = Qwen3Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
    return save(Qwen3ForCausalLM, cfg, folder, seed=4, random_norms=True)


def tiny_chat_llama(folder: Path, tokenizer: Path) -> Path:
    """A tiny random Llama with the vocabulary of `tokenizer`'s folder (SmolLM2's) and its tokenizer and chat
    template, for serving text."""
    cfg = LlamaConfig(**{**COMMON, "vocab_size": 49152, "eos_token_id": 2, "max_position_embeddings": 512},
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    return with_tokenizer(save(LlamaForCausalLM, cfg, folder, seed=4), tokenizer)


def with_tokenizer(folder: Path, tokenizer: Path) -> Path:
    """`folder` with the tokenizer (and chat template) of the model folder `tokenizer`."""
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, folder / name)
    return folder


def tiny_llama_untied(folder: Path) -> Path:
    """Llama with untied embeddings, multi-head attention and Llama-3 rope scaling."""
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    cfg = LlamaConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, rope_parameters=rope
    )
    return save(LlamaForCausalLM, cfg, folder, seed=3)


def tiny_mistral(folder: Path) -> Path:
    """Mistral with a sliding window (8 positions, far shorter than the prompts) in every layer."""
    cfg = MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    return save(MistralForCausalLM, cfg, folder, seed=10)


def tiny_qwen2_sliding(folder: Path) -> Path:
    """Qwen2 with `use_sliding_window`: layer 0 global, layer 1 sliding (window 8; `max_window_layers` 1)."""
    cfg = Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                      sliding_window=8, max_window_layers=1)  # fmt: skip
    return save(Qwen2ForCausalLM, cfg, folder, seed=11)


# Mixtures of experts: 4 experts, 2 per token (the router's choices differ between tokens and layers).
EXPERTS = dict(num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2, tie_word_embeddings=False)


def tiny_mixtral(folder: Path) -> Path:
    """Mixtral: every layer's MLP a mixture, the chosen experts' weights renormalised."""
    cfg = MixtralConfig(**COMMON, **EXPERTS, num_local_experts=4)
    return save(MixtralForCausalLM, cfg, folder, seed=5, random_norms=True)


def tiny_qwen2_moe(folder: Path) -> Path:
    """Qwen 2 MoE: q/k/v bias, a gated shared expert beside the routed ones, weights not renormalised."""
    cfg = Qwen2MoeConfig(**COMMON, **EXPERTS, num_experts=4, moe_intermediate_size=48,
                         shared_expert_intermediate_size=80, norm_topk_prob=False)  # fmt: skip
    return save(Qwen2MoeForCausalLM, cfg, folder, seed=16, random_norms=True)


def tiny_qwen3_moe(folder: Path) -> Path:
    """Qwen 3 MoE: per-head q/k norms, layer 1 a dense MLP (`mlp_only_layers`), weights renormalised."""
    cfg = Qwen3MoeConfig(**COMMON, **EXPERTS, num_experts=4, moe_intermediate_size=48, head_dim=32,
                         norm_topk_prob=True, mlp_only_layers=[1])  # fmt: skip
    return save(Qwen3MoeForCausalLM, cfg, folder, seed=7, random_norms=True)


def tiny_olmoe(folder: Path) -> Path:
    """OLMoE: q and k each RMS-normalised across all their heads, weights not renormalised."""
    cfg = OlmoeConfig(**COMMON, **EXPERTS, num_experts=4, norm_topk_prob=False)
    return save(OlmoeForCausalLM, cfg, folder, seed=28, random_norms=True)


def tiny_gemma3(folder: Path, **overrides) -> Path:
    """Gemma 3: sliding-window layers (window 8, far shorter than the prompts) around a global one, each kind
    with its own rotary embedding (the global one linearly scaled), per-head q/k norms, sandwich norms (all
    stored as offsets from 1), scaled embeddings, a query scale apart from head_dim's, gelu-tanh, and soft-capped
    final logits. `overrides`: config fields (a vocabulary of a real tokenizer's size, say)."""
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 2.0}}  # fmt: skip
    cfg = Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 3, **overrides}, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                           query_pre_attn_scalar=24, rope_parameters=rope, final_logit_softcapping=30.0,
                           tie_word_embeddings=True)  # fmt: skip
    return save(Gemma3ForCausalLM, cfg, folder, seed=39, random_norms=True)


# Every builder above: the suite has a session fixture of each name (tests/conftest.py).
TINY_MODELS = ("tiny_llama_gqa", "tiny_qwen2", "tiny_llama_untied", "tiny_qwen3", "tiny_mistral", "tiny_qwen2_sliding",
               "tiny_mixtral", "tiny_qwen2_moe", "tiny_qwen3_moe", "tiny_olmoe", "tiny_gemma3")  # fmt: skip


# --- GGUF files of each tensor type ---------------------------------------------------------------------------------
# The embedded model cut to its first layers, with its decoder-layer matrices stored as another GGUF type: what
# `--quantization auto` maps each kind to is tested per kind (README, 'Modes'). Types the gguf package quantizes
# (Q4_0, Q4_1, Q8_0) come from the model's own weights; K-quants need rows of 256 inputs, which only the feed-forward
# down projection has (1,536 inputs; 576 elsewhere, as llama.cpp's K-quant files then keep a 32-block type there), so
# a K-quant file has `k_type` there and `other` elsewhere, its blocks random but valid (any bytes are, given finite
# scales): d and dmin small, 6-bit scales and mins, and values as drawn.

_K_BYTES = {"Q4_K": 144, "Q6_K": 210}  # bytes per block of 256


def _k_blocks(kind: str, rows: int, cols: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    n = rows * cols // 256
    blocks = rng.integers(0, 256, size=(n, _K_BYTES[kind]), dtype=np.uint8)
    scale = np.full((n, 1), 2e-3, dtype=np.float16).view(np.uint8)
    if kind == "Q4_K":  # d, dmin, 12 bytes of scales and mins, 128 of 4-bit values
        blocks[:, 0:2], blocks[:, 2:4] = scale, scale
    else:  # 128 + 64 bytes of 6-bit values, 16 int8 scales, d
        blocks[:, 192:208] = rng.integers(-40, 40, size=(n, 16)).astype(np.int8).view(np.uint8)
        blocks[:, 208:210] = scale
    return blocks.reshape(rows, cols // 256 * _K_BYTES[kind])


def gguf_variant(folder: Path, kind: str, layers: int = 2, other: str = "Q4_0") -> Path:
    """The embedded GGUF model's first `layers` layers, their matrices stored as `kind` (Q4_0, Q4_1, Q8_0, F16, or a
    K-quant: Q4_K, Q6_K, on the down projections, `other` elsewhere), as `folder/<kind>.gguf`."""
    import gguf
    import numpy as np

    from splitserve.model.checkpoint import default_model_path

    reader = gguf.GGUFReader(default_model_path())
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    path = folder / f"SmolLM2-{layers}L.{kind}.gguf"
    writer = gguf.GGUFWriter(path, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = layers if field.name == f"{arch}.block_count" else field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    for seed, tensor in enumerate(reader.tensors):
        parts = tensor.name.split(".")
        if parts[0] == "blk" and int(parts[1]) >= layers:
            continue
        data, qtype = tensor.data, tensor.tensor_type
        if parts[0] == "blk" and len(tensor.shape) == 2:
            weights = gguf.quants.dequantize(data, qtype)
            target = kind if kind not in _K_BYTES or parts[2] == "ffn_down" else other
            qtype = gguf.GGMLQuantizationType[target]
            if target in _K_BYTES:
                data = _k_blocks(target, *weights.shape, seed)
            elif target == "F16":
                data = weights.astype(np.float16)
            else:
                data = gguf.quants.quantize(weights, qtype)
        writer.add_tensor(tensor.name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
