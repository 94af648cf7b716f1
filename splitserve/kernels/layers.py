"""Fused layer kernels with one dispatch point each: residual add + RMSNorm, rotary embedding, the gated
MLP's activation, and the page copies kv_transfer uses when pages must be staged contiguously.

Each function runs its Triton kernel where `use_triton` says so (CUDA tensors, or SPLITSERVE_KERNELS), the
native CPU kernel (cpu_kernels.c) for fp32 CPU tensors where it builds, else the PyTorch reference below it,
which is also what the kernels are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitserve.kernels import cpu_kernels
from splitserve.kernels.dispatch import use_native, use_triton


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`h = x + residual` (or `x`), then `weight * rmsnorm(h)` normalised in fp32; returns (normed, h)."""
    if use_triton(x):
        from splitserve.kernels import triton_layers

        return triton_layers.add_rms_norm(x, residual, weight, eps)
    if use_native(x):
        return cpu_kernels.add_rms_norm(x, residual, weight, eps)
    return add_rms_norm_reference(x, residual, weight, eps)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    h = x if residual is None else x + residual
    f = h.float()
    f = f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)
    return weight * f.to(h.dtype), h


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` ([tokens, heads, head_dim]) by per-token `cos`/`sin` ([tokens, head_dim])."""
    if use_triton(x):
        from splitserve.kernels import triton_layers

        return triton_layers.rope(x, cos, sin)
    if use_native(x) and x.stride(2) == 1 and x.stride(1) == x.shape[2]:
        return cpu_kernels.rope_(x, cos, sin)  # in place: callers pass a fresh projection
    return rope_reference(x, cos, sin)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for `gate_up` = [..., 2 * size], gate first."""
    if use_triton(gate_up):
        from splitserve.kernels import triton_layers

        return triton_layers.silu_mul(gate_up)
    if use_native(gate_up):
        return cpu_kernels.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`gelu(gate) * up` (tanh approximation, Gemma's MLP) for `gate_up` = [..., 2 * size], gate first."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def copy_pages(src: torch.Tensor, src_ids: list[int], dst: torch.Tensor, dst_ids: list[int]) -> None:
    """Copy pages `src_ids` of `src` into pages `dst_ids` of `dst` (both `[pages, ...]`, pages of one shape):
    kv_transfer's gathers into and scatters out of staging buffers, and its pulls. On the CPU one memcpy per
    stretch consecutive on both sides (indexed copies run at a tenth of memcpy's speed there)."""
    if use_triton(dst):
        from splitserve.kernels import triton_layers

        triton_layers.copy_pages(src, src_ids, dst, dst_ids)
        return
    i = 0
    while i < len(src_ids):
        j = i + 1
        while j < len(src_ids) and src_ids[j] == src_ids[j - 1] + 1 and dst_ids[j] == dst_ids[j - 1] + 1:
            j += 1
        dst[dst_ids[i] : dst_ids[i] + j - i].copy_(src[src_ids[i] : src_ids[i] + j - i])
        i = j
