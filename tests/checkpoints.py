"""Tiny random checkpoints (Llama, Qwen 2 and Qwen 3 shapes) written with transformers: the test suite's fixtures and
`scripts/gpu_check.py` build their models here."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM


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
