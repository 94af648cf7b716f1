"""PyTorch reference for paged attention: the CPU path, and what the Triton kernels are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitserve.kernels import kv_format
from splitserve.kernels.metadata import PagedAttentionMetadata


def write_kv(
    kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, meta: PagedAttentionMetadata
) -> None:
    """Store the batch's new keys and values ([num_tokens, num_kv_heads, head_dim]) in their slots, as the
    cache stores them (`kv_format`)."""
    runs = meta.kv_runs if kv_cache.dtype == torch.int8 else None
    kv_format.write(kv_cache, layer, k, v, meta.slot_pages, meta.slot_offsets, runs)


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
    sliding `window`, over its last `window` positions only (its own included).

    The K/V of the batch's own tokens must already be written (`write_kv`), or for prefill rows be in `fresh`.
    """
    out = torch.empty_like(q)
    nd = meta.num_decode
    if nd:
        out[:nd] = _decode_attention(q[:nd], kv_cache, layer, meta, scale, window)
    prefill_attention(q, kv_cache, layer, meta, scale, out, window, fresh)
    return out


def prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    meta: PagedAttentionMetadata,
    scale: float,
    out: torch.Tensor,
    window: int = 0,
    fresh: torch.Tensor | None = None,
) -> None:
    """The prefill spans' rows of `out`: each span's queries over its context (causal within the chunk; within
    the sliding `window` where one is given). `fresh` (`[num_tokens, 2, kv_heads, dim]`): the step's own K/V,
    read from there rather than from the pages (a ring stores them only after the step attends)."""
    for span in meta.prefills:
        rows = slice(span.query_start, span.query_start + span.query_len)
        kv = kv_format.read(kv_cache, layer, span.page_ids, q.dtype)  # [pages, 2, page_size, kv_heads, dim]
        k = kv[:, 0].flatten(0, 1)[: span.context_len]
        v = kv[:, 1].flatten(0, 1)[: span.context_len]
        if fresh is not None:
            prefix = span.context_len - span.query_len
            k = torch.cat((k[:prefix], fresh[rows, 0].to(q.dtype)))
            v = torch.cat((v[:prefix], fresh[rows, 1].to(q.dtype)))
        k, v = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        mask = span.causal_mask
        if window:
            q_pos = torch.arange(span.context_len - span.query_len, span.context_len, device=q.device)[:, None]
            keys = torch.arange(span.context_len, device=q.device)[None, :]
            mask = (keys <= q_pos) & (keys > q_pos - window)
        o = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1).unsqueeze(0),
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=True,
        )
        out[rows] = o.squeeze(0).transpose(0, 1)


def _decode_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: PagedAttentionMetadata, scale: float, window: int
) -> torch.Tensor:
    """One query token per sequence: gather every sequence's pages into one padded batch (each page is one
    contiguous block of the page-major cache, so the gather is a block copy) and attend with SDPA, the query
    heads sharing a KV head together (GQA); padding past each context length (and keys before a sliding
    window) is masked."""
    nd, _, dim = q.shape
    kv = kv_format.read(kv_cache, layer, meta.decode_page_table, q.dtype)  # [nd, pages, 2, page_size, kv_heads, dim]
    kv_heads, span = kv.shape[4], kv.shape[1] * kv.shape[3]
    k = kv[:, :, 0].reshape(nd, span, kv_heads, dim).transpose(1, 2)
    v = kv[:, :, 1].reshape(nd, span, kv_heads, dim).transpose(1, 2)
    mask = meta.decode_mask
    if window:
        keys = torch.arange(span, device=q.device)[None, :]
        mask = mask & (keys >= (meta.decode_context_lens[:, None] - window)).view(nd, 1, 1, span)
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=mask, scale=scale, enable_gqa=True
    )  # [nd, heads, 1, dim]
    return out.squeeze(2)
