"""Rotary position embedding: a cos/sin table per position, computed as transformers does."""

from __future__ import annotations

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from splitserve.model.config import ModelConfig


def rope_tables(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables `[max_positions, head_dim]` in `dtype`, for every position the model can see."""
    rope_type = cfg.hf_config.rope_parameters.get("rope_type", "default")
    if rope_type == "default":
        base = cfg.hf_config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float) / cfg.head_dim))
        scaling = 1.0
    else:  # linear, llama3, yarn: transformers owns the formulas
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg.hf_config, torch.device("cpu"))
    positions = torch.arange(cfg.max_position_embeddings, dtype=torch.float)
    freqs = torch.outer(positions, inv_freq.float())
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(device, dtype), (emb.sin() * scaling).to(device, dtype)
