"""Paged attention, the one place the model calls: rotate a step's new queries and keys and write its K/V into
pages, and attend each query over its pages.

The KV cache is one page-major tensor `[num_pages, num_layers, 2, page_size, num_kv_heads, head_dim]`
(see docs/design.md); its `num_layers` are a page's layers (every layer of the model, or those of one page group
when sliding-window layers keep rings of pages: engine/kv_layout.py), which `layer` indexes, and the metadata is
the layer's group's. A step's tokens form one flat batch: first the decode rows (one query token each), then the
prefill chunks (several query tokens, possibly after a prefix already in pages).

Dispatch (kernels/dispatch.py): Triton kernels for CUDA tensors; on the CPU the native paged attention
(cpu_kernels.c: fp32 queries over an fp32, fp16, bf16 or int8 cache, read as stored) for every row where it
builds, a prompt's rows each as a decode row at its position (so a token's attention is the same arithmetic in a
decode step and in a prompt chunk of any size), and the PyTorch reference for the rest (sliding windows, a
ring's prompt rows). The cache's dtype is `--kv-dtype`'s: writes convert to it, reads
from it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from splitserve.kernels import cpu_kernels, kv_format, reference
from splitserve.kernels.dispatch import use_native, use_triton
from splitserve.kernels.layers import add_rms_norm, rope
from splitserve.kernels.metadata import PagedAttentionMetadata, PrefillSpan

__all__ = ["PagedAttentionMetadata", "PrefillSpan", "QKNorm", "attend", "paged_attention", "rotate", "rotate_and_store"]


class QKNorm(NamedTuple):
    """RMS norms applied to each query and each key head before the rotary embedding (Qwen 3)."""

    q_weight: torch.Tensor  # [head_dim]
    k_weight: torch.Tensor
    eps: float


def rotate(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, kv_heads: int,
    qk_norm: QKNorm | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Split a `qkv` projection (`[tokens, (num_heads + 2 * kv_heads) * head_dim]`), normalise its query and key
    heads (`qk_norm`, when given) and rotate them by the tokens' `cos`/`sin`: the queries `[tokens, num_heads,
    head_dim]`, and the keys and values `[tokens, 2, kv_heads, head_dim]` (fp32 on CUDA)."""
    if use_triton(qkv):
        from splitserve.kernels import triton_attention

        return triton_attention.rotate(qkv, cos, sin, num_heads, kv_heads, qk_norm)
    n, dim = qkv.shape[0], qkv.shape[1] // (num_heads + 2 * kv_heads)
    qk = qkv[:, : (num_heads + kv_heads) * dim].view(n, -1, dim)
    if qk_norm is not None:
        q = add_rms_norm(qk[:, :num_heads].reshape(-1, dim), None, qk_norm.q_weight, qk_norm.eps)[0]
        k = add_rms_norm(qk[:, num_heads:].reshape(-1, dim), None, qk_norm.k_weight, qk_norm.eps)[0]
        qk = torch.cat((q.view(n, num_heads, dim), k.view(n, kv_heads, dim)), dim=1)
    qk = rope(qk, cos, sin)
    q, k = qk.split([num_heads, kv_heads], dim=1)
    return q, torch.stack((k, qkv[:, (num_heads + kv_heads) * dim :].view(n, kv_heads, dim)), dim=1)


def rotate_and_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    meta: PagedAttentionMetadata,
    num_heads: int,
    qk_norm: QKNorm | None = None,
) -> torch.Tensor:
    """`rotate`, then store the keys and values in the tokens' slots of `layer`; returns the queries. On CUDA one
    kernel does it."""
    if use_triton(kv_cache):
        from splitserve.kernels import triton_attention

        return triton_attention.rotate_and_store(qkv, cos, sin, kv_cache, layer, meta, num_heads, qk_norm)
    q, kv = rotate(qkv, cos, sin, num_heads, kv_cache.shape[4], qk_norm)
    reference.write_kv(kv_cache, layer, kv[:, 0], kv[:, 1], meta)
    return q


def attend(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    meta: PagedAttentionMetadata,
    num_heads: int,
    scale: float,
    window: int = 0,
    qk_norm: QKNorm | None = None,
) -> torch.Tensor:
    """A layer's attention from its `qkv` projection: rotate, store the new K/V, attend (`[tokens, num_heads,
    head_dim]`). Where a ring of pages holds the layer's K/V and the step has prefill rows (`meta.ring_writes`),
    those rows attend over their own K/V from the activations and store their span's last window only after
    attending: a ring holds a window, not a window and a pass."""
    if meta.ring_writes is None:
        q = rotate_and_store(qkv, cos, sin, kv_cache, layer, meta, num_heads, qk_norm)
        return paged_attention(q, kv_cache, layer, meta, scale, window)
    q, kv = rotate(qkv, cos, sin, num_heads, kv_cache.shape[4], qk_norm)
    kv_format.write(kv_cache, layer, kv[:, 0], kv[:, 1], meta.slot_pages, meta.slot_offsets)  # the decode rows'
    out = paged_attention(q, kv_cache, layer, meta, scale, window, fresh=kv)
    kv_format.write(kv_cache, layer, kv[:, 0], kv[:, 1], meta.ring_writes, meta.slot_offsets)
    return out


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    meta: PagedAttentionMetadata,
    scale: float,
    window: int = 0,
    fresh: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of every query row ([num_tokens, num_heads, head_dim]) over its sequence's pages; with a
    sliding `window` (> 0), over its last `window` positions only (Gemma 3's local layers).

    The K/V of the batch's own tokens must already be written (`rotate_and_store`), or for the prefill rows be in
    `fresh` (`attend`).
    """
    if not use_triton(q):
        if not window and fresh is None and use_native(q) and cpu_kernels.attention_supported(q, kv_cache):
            return cpu_kernels.paged_attention(q, kv_cache, layer, *meta.row_tables, scale)
        return reference.paged_attention(q, kv_cache, layer, meta, scale, window, fresh)
    from splitserve.kernels import triton_attention

    out = torch.empty_like(q)
    if meta.num_decode:
        triton_attention.decode_attention(q, kv_cache, layer, meta, scale, out=out, window=window)
    triton_attention.prefill_attention(q, kv_cache, layer, meta, scale, out, window=window, fresh=fresh)
    return out
