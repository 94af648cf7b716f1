"""Tiny random checkpoints (Llama and Qwen2 shapes) written with transformers: the test suite's fixtures and
`scripts/gpu_check.py` build their models here."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


def save(model_cls, config, folder: Path, seed: int) -> Path:
    """A random fp32 checkpoint of `config` in `folder`."""
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    # Wider weights than the default init keep the logits apart, so greedy choices are not near-ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
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
