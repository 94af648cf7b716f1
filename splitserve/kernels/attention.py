"""Paged attention, the one place the model calls: write a step's new K/V into pages, and attend each
query over its pages.

The KV cache is one page-major tensor `[num_pages, num_layers, 2, page_size, num_kv_heads, head_dim]`
(see docs/design.md). A step's tokens form one flat batch: first the decode rows (one query token each),
then the prefill chunks (several query tokens, possibly after a prefix already in pages).

Dispatch: Triton kernels for CUDA tensors; on the CPU the native decode attention (cpu_kernels.c, fp32) for
decode rows where it builds, and the PyTorch reference for the rest. `SPLITSERVE_KERNELS` overrides it:
`reference` (PyTorch only, also on CUDA, for comparison) or `triton` (also on the CPU, for tests under
`TRITON_INTERPRET=1`).
"""

from __future__ import annotations

import os

import torch

from splitserve.kernels import cpu_kernels, reference
from splitserve.kernels.metadata import PagedAttentionMetadata, PrefillSpan

__all__ = ["PagedAttentionMetadata", "PrefillSpan", "paged_attention", "use_triton", "write_kv"]


def _mode() -> str:
    mode = os.environ.get("SPLITSERVE_KERNELS", "auto")
    if mode not in ("auto", "reference", "triton"):
        raise ValueError(f"SPLITSERVE_KERNELS must be auto, reference or triton, got {mode!r}")
    return mode


def use_triton(t: torch.Tensor) -> bool:
    mode = _mode()
    return mode == "triton" or (mode == "auto" and t.is_cuda)


def use_native(t: torch.Tensor) -> bool:
    """The native CPU kernels (cpu_kernels.c) for fp32 CPU tensors, unless SPLITSERVE_KERNELS says otherwise."""
    return _mode() == "auto" and cpu_kernels.native(t)


def write_kv(
    kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, meta: PagedAttentionMetadata
) -> None:
    """Store the batch's new keys and values ([num_tokens, num_kv_heads, head_dim]) in their slots."""
    if use_triton(kv_cache):
        from splitserve.kernels import triton_attention

        triton_attention.write_kv(kv_cache, layer, k, v, meta)
    else:
        reference.write_kv(kv_cache, layer, k, v, meta)


def paged_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: PagedAttentionMetadata, scale: float
) -> torch.Tensor:
    """Attention of every query row ([num_tokens, num_heads, head_dim]) over its sequence's pages.

    The K/V of the batch's own tokens must already be written (`write_kv`).
    """
    if not use_triton(q):
        nd = meta.num_decode
        if nd and use_native(q) and cpu_kernels.decode_attention_supported(q, kv_cache):
            out = torch.empty_like(q)
            cpu_kernels.paged_decode_attention(q[:nd], kv_cache, layer, meta, scale, out=out[:nd])
            reference.prefill_attention(q, kv_cache, layer, meta, scale, out)
            return out
        return reference.paged_attention(q, kv_cache, layer, meta, scale)
    from splitserve.kernels import triton_attention

    out = torch.empty_like(q)
    if meta.num_decode:
        out[: meta.num_decode] = triton_attention.decode_attention(q, kv_cache, layer, meta, scale)
    triton_attention.prefill_attention(q, kv_cache, layer, meta, scale, out)
    return out
