"""How a KV cache stores one head's key or value for one token: a row of `head_dim` elements of the cache's
dtype (`--kv-dtype` fp32, fp16 or bf16), or, for int8, `head_dim` int8 values followed by their scale as fp16
(2 bytes), symmetric: value = int8 * scale, scale = absmax / 127. A scale per token and head needs no
coordination between writers (a page filled token by token never requantizes), and it sits inside the row, so
a page is still one contiguous region that moves between workers as it is stored.

Every implementation (the PyTorch reference here, the native CPU kernels, the Triton kernels) quantizes alike:
the scale rounded to fp16 first, then each value divided by it and rounded to nearest even.
"""

from __future__ import annotations

import torch

SCALE_BYTES = 2  # an int8 row's trailing fp16 scale


def row_elements(head_dim: int, dtype: torch.dtype) -> int:
    """Elements of one stored row (the cache tensor's last dimension)."""
    return head_dim + SCALE_BYTES if dtype == torch.int8 else head_dim


def head_dim(kv_cache: torch.Tensor) -> int:
    """The model's head dim, from a cache tensor `[..., row]`."""
    return kv_cache.shape[-1] - SCALE_BYTES if kv_cache.dtype == torch.int8 else kv_cache.shape[-1]


def encode(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `x` ([..., head_dim], any float dtype) as the cache stores them."""
    if dtype != torch.int8:
        return x.to(dtype)
    x = x.float()
    scale = (x.abs().amax(-1, keepdim=True) / 127).to(torch.float16)
    wide = scale.float()
    q = torch.where(wide > 0, x / torch.where(wide > 0, wide, 1.0), 0.0).round().clamp(-127, 127).to(torch.int8)
    return torch.cat((q, scale.view(torch.int8)), dim=-1)


def decode(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Stored rows ([..., row]) back as `dtype` values ([..., head_dim])."""
    if rows.dtype != torch.int8:
        return rows.to(dtype)
    scale = rows[..., -SCALE_BYTES:].contiguous().view(torch.float16).float()
    return (rows[..., :-SCALE_BYTES].float() * scale).to(dtype)
