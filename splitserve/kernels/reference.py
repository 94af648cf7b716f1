"""PyTorch reference for paged attention: the CPU path, and what the Triton kernels are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitserve.kernels.metadata import PagedAttentionMetadata


def write_kv(
    kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, meta: PagedAttentionMetadata
) -> None:
    """Store the batch's new keys and values ([num_tokens, num_kv_heads, head_dim]) in their slots."""
    kv_cache[:, layer, 0][meta.slot_pages, meta.slot_offsets] = k
    kv_cache[:, layer, 1][meta.slot_pages, meta.slot_offsets] = v


def paged_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: PagedAttentionMetadata, scale: float
) -> torch.Tensor:
    """Attention of every query row ([num_tokens, num_heads, head_dim]) over its sequence's pages.

    The K/V of the batch's own tokens must already be written (`write_kv`).
    """
    out = torch.empty_like(q)
    nd = meta.num_decode
    if nd:
        out[:nd] = _decode_attention(q[:nd], kv_cache[:, layer], meta, scale)
    k_pages, v_pages = kv_cache[:, layer, 0], kv_cache[:, layer, 1]  # [num_pages, page_size, kv_heads, dim]
    for span in meta.prefills:
        rows = slice(span.query_start, span.query_start + span.query_len)
        k = k_pages[span.page_ids].flatten(0, 1)[: span.context_len].transpose(0, 1).unsqueeze(0)
        v = v_pages[span.page_ids].flatten(0, 1)[: span.context_len].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1).unsqueeze(0),
            k,
            v,
            attn_mask=span.causal_mask,
            is_causal=span.causal_mask is None,
            scale=scale,
            enable_gqa=True,
        )
        out[rows] = o.squeeze(0).transpose(0, 1)
    return out


def _decode_attention(
    q: torch.Tensor, layer_cache: torch.Tensor, meta: PagedAttentionMetadata, scale: float
) -> torch.Tensor:
    """One query token per sequence: gather every sequence's pages into one padded batch laid out
    `[kv_head * sequence, T, dim]`, so the query heads sharing a KV head meet its K/V in one batched
    matmul. Softmax in fp32; padding past each context length is masked."""
    nd, num_heads, dim = q.shape
    kv_heads = layer_cache.shape[3]
    group = num_heads // kv_heads
    # [num_pages, 2, page_size, kv_heads, dim] -> [2, kv_heads, nd, max_pages, page_size, dim]
    kv = layer_cache.permute(1, 3, 0, 2, 4)[:, :, meta.decode_page_table]
    span = kv.shape[3] * kv.shape[4]
    k = kv[0].reshape(kv_heads * nd, span, dim)
    v = kv[1].reshape(kv_heads * nd, span, dim)
    qg = q.view(nd, kv_heads, group, dim).transpose(0, 1).reshape(kv_heads * nd, group, dim)
    scores = torch.bmm(qg, k.transpose(1, 2)).float() * scale  # [kv_heads * nd, group, T]
    scores.view(kv_heads, nd, group, span).masked_fill_(~meta.decode_mask.view(1, nd, 1, span), float("-inf"))
    out = torch.bmm(scores.softmax(dim=-1).to(v.dtype), v)  # [kv_heads * nd, group, dim]
    return out.view(kv_heads, nd, group, dim).transpose(0, 1).reshape(nd, num_heads, dim)
