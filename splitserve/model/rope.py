"""Rotary position embedding: a cos/sin table per position, computed as transformers does."""

from __future__ import annotations

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from splitserve.model.config import ModelConfig, rope_parameter_sets


def rope_tables(
    cfg: ModelConfig, dtype: torch.dtype, device: torch.device, layer_type: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables `[max_positions, head_dim]` in `dtype`, for every position the model can see (of the
    layers of `layer_type`, where the model's layer types have their own: Gemma 3)."""
    params = rope_parameter_sets(cfg.hf_config)[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float) / cfg.head_dim))
        scaling = 1.0
    else:  # linear, llama3, yarn: transformers owns the formulas
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg.hf_config, torch.device("cpu"), layer_type=layer_type)
    positions = torch.arange(cfg.max_position_embeddings, dtype=torch.float)
    freqs = torch.outer(positions, inv_freq.float())
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(device, dtype), (emb.sin() * scaling).to(device, dtype)
