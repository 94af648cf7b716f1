"""Triton kernels for attention over the paged KV cache: write new K/V into pages, decode attention
(flash-decoding: split-K over the context, then a reduction), and prefill attention over ragged chunks
whose prefix is already in pages.

Decode attention's split count is a function of the step's shapes (`decode_splits`), so a captured decode
step launches a fixed grid. The cache is `[num_pages, num_layers, 2, page_size, num_kv_heads, head_dim]`;
programs read K/V in tiles of 64 tokens, looking up each token's page in the page table, so a tile may span
pages (and the matmul tiles do not shrink with the page size). Softmax runs in fp32. The query heads sharing
a KV head are processed together, so each K/V page is loaded once per group. On the CPU these run under
`TRITON_INTERPRET=1` (tests); there, bf16 arithmetic is wrong, so the tests use fp32 and fp16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.metadata import PagedAttentionMetadata


def _check_tile_sizes(page_size: int, head_dim: int) -> None:
    # A page is one tile of the attention matmuls, and GPUs want tiles of at least 16 (power-of-2) rows.
    for name, value in (("page size", page_size), ("head dim", head_dim)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"the Triton attention kernels need a power-of-2 {name} >= 16, got {value}")


@triton.jit
def _rotate_store_kernel(
    qkv_ptr, cos_ptr, sin_ptr, q_ptr, cache_ptr, pages_ptr, offsets_ptr, q_norm_ptr, k_norm_ptr, layer, eps,
    stride_n, stride_cn, stride_qn, stride_qh,
    stride_cp, stride_cl, stride_ckv, stride_cs, stride_ch,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr, QK_NORM: tl.constexpr,
    STAGED: tl.constexpr,
):  # fmt: skip
    """One (token, head) of a `qkv` projection row: a query head rotated into `q`, or a KV head's key rotated
    and its value copied into the token's slot of the cache (one launch for the rotary embedding and the
    K/V write, which a decode step repeats in every layer). With QK_NORM each query and key head is
    RMS-normalised first (in fp32, scaled in the model dtype, as transformers does). STAGED (an int8 cache):
    `cache_ptr` is a `[tokens, 2, kv_heads, head_dim]` buffer the keys and values go to instead, for
    `_store_int8_kernel` to quantize page by page."""
    n = tl.program_id(0)
    h = tl.program_id(1)
    i = tl.arange(0, HALF)
    src = qkv_ptr + n * stride_n + h * 2 * HALF
    lo, hi = tl.load(src + i), tl.load(src + HALF + i)
    if QK_NORM:
        w = q_norm_ptr if h < NUM_HEADS else k_norm_ptr
        lo_f, hi_f = lo.to(tl.float32), hi.to(tl.float32)
        inv = tl.rsqrt((tl.sum(lo_f * lo_f, 0) + tl.sum(hi_f * hi_f, 0)) / (2 * HALF) + eps)
        lo = tl.load(w + i) * (lo_f * inv).to(lo.dtype)
        hi = tl.load(w + HALF + i) * (hi_f * inv).to(hi.dtype)
    cos_lo, cos_hi = tl.load(cos_ptr + n * stride_cn + i), tl.load(cos_ptr + n * stride_cn + HALF + i)
    sin_lo, sin_hi = tl.load(sin_ptr + n * stride_cn + i), tl.load(sin_ptr + n * stride_cn + HALF + i)
    rot_lo, rot_hi = lo * cos_lo - hi * sin_lo, hi * cos_hi + lo * sin_hi
    if h < NUM_HEADS:
        dst = q_ptr + n * stride_qn + h * stride_qh
        tl.store(dst + i, rot_lo.to(dst.dtype.element_ty))
        tl.store(dst + HALF + i, rot_hi.to(dst.dtype.element_ty))
    else:
        kvh = h - NUM_HEADS
        if STAGED:
            dst = cache_ptr + n * stride_cp + kvh * stride_ch
        else:
            page = tl.load(pages_ptr + n).to(tl.int64)
            offset = tl.load(offsets_ptr + n).to(tl.int64)
            dst = cache_ptr + page * stride_cp + layer * stride_cl + offset * stride_cs + kvh * stride_ch
        v = src + NUM_KV_HEADS * 2 * HALF  # the value head sits kv_heads heads after its key head
        # converted to the cache's dtype (--kv-dtype, maybe narrower than the model's), rounded to nearest even
        tl.store(dst + stride_ckv + i, tl.load(v + i).to(dst.dtype.element_ty))
        tl.store(dst + stride_ckv + HALF + i, tl.load(v + HALF + i).to(dst.dtype.element_ty))
        tl.store(dst + i, rot_lo.to(dst.dtype.element_ty))
        tl.store(dst + HALF + i, rot_hi.to(dst.dtype.element_ty))


@triton.jit
def _round_even(x):
    """x rounded to the nearest integer, ties to even, for |x| < 2**22 (adding 1.5 * 2**23 leaves no fraction
    bits: the add rounds as IEEE does)."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _store_int8_kernel(
    new_ptr, cache_ptr, pages_ptr, firsts_ptr, starts_ptr, counts_ptr, layer,
    stride_nn, stride_nkv, stride_nh,
    stride_cp, stride_cl, stride_ckv, stride_cs, stride_ch,
    PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, ONE_TOKEN_RUNS: tl.constexpr,
):  # fmt: skip
    """One (run of new tokens in one page, KV head, K or V) into an int8 cache (kernels/kv_format.py): the
    page's scale becomes max(old, absmax / 127), the rows already there requantized when it grew, the new rows
    quantized. ONE_TOKEN_RUNS (a decode step): run r is token r, its slot `pages_ptr[r]`, `firsts_ptr[r]`."""
    r = tl.program_id(0)
    kvh = tl.program_id(1)
    kv = tl.program_id(2)
    page = tl.load(pages_ptr + r).to(tl.int64)
    first = tl.load(firsts_ptr + r).to(tl.int64)
    start = r if ONE_TOKEN_RUNS else tl.load(starts_ptr + r).to(tl.int64)
    count = 1 if ONE_TOKEN_RUNS else tl.load(counts_ptr + r).to(tl.int64)
    slot = tl.arange(0, PAGE_SIZE)
    d = tl.arange(0, HEAD_DIM)
    block = cache_ptr + page * stride_cp + layer * stride_cl + kv * stride_ckv
    scale_ptr = (block + PAGE_SIZE * stride_cs + kvh * 4).to(tl.pointer_type(tl.float32))
    old = tl.where(first > 0, tl.load(scale_ptr), 0.0)
    is_new = (slot >= first) & (slot < first + count)
    is_old = slot < first
    src = new_ptr + (start + slot - first)[:, None] * stride_nn + kv * stride_nkv + kvh * stride_nh + d[None, :]
    x = tl.load(src, mask=is_new[:, None], other=0.0).to(tl.float32)
    scale = tl.maximum(old, tl.math.div_rn(tl.max(tl.max(tl.abs(x), 1), 0), 127.0))
    step = tl.where(scale > 0, scale, 1.0)
    addr = block + slot[:, None] * stride_cs + kvh * stride_ch + d[None, :]
    stored = tl.load(addr, mask=is_old[:, None], other=0).to(tl.float32)
    # IEEE division (`/` is approximate on a GPU), then round to nearest even: as torch quantizes
    requantized = tl.where(scale > old, _round_even(tl.math.div_rn(stored * old, step)), stored)
    quantized = tl.minimum(tl.maximum(_round_even(tl.math.div_rn(x, step)), -127.0), 127.0)
    rows = tl.where(is_new[:, None], quantized, requantized)
    tl.store(addr, rows.to(tl.int8), mask=(is_new | is_old)[:, None])
    tl.store(scale_ptr, scale)


def rotate(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, kv_heads: int, qk_norm=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotated queries `[tokens, num_heads, head_dim]` of `qkv` and its rotated keys and values, staged in
    fp32 as `[tokens, 2, kv_heads, head_dim]` for a store of their own."""
    n, dim = qkv.shape[0], qkv.shape[1] // (num_heads + 2 * kv_heads)
    q = torch.empty(n, num_heads, dim, dtype=qkv.dtype, device=qkv.device)
    staged = torch.empty(n, 2, kv_heads, dim, dtype=torch.float32, device=qkv.device)
    if n:
        _launch_rotate(qkv, cos, sin, q, staged, None, 0, num_heads, kv_heads, qk_norm)
    return q, staged


def _launch_rotate(qkv, cos, sin, q, dst, meta, layer, num_heads, kv_heads, qk_norm) -> None:
    """`_rotate_store_kernel` into the cache (`meta`'s slots) or, without `meta`, into a staging buffer."""
    staged = meta is None
    c = (dst.stride(0), 0, dst.stride(1), 0, dst.stride(2)) if staged else dst.stride()
    pages, offsets = (q, q) if staged else (meta.slot_pages, meta.slot_offsets)  # (unread when staged)
    q_norm, k_norm, eps = qk_norm if qk_norm is not None else (qkv, qkv, 0.0)
    _rotate_store_kernel[(qkv.shape[0], num_heads + kv_heads)](
        qkv, cos, sin, q, dst, pages, offsets, q_norm, k_norm, layer, eps,
        qkv.stride(0), cos.stride(0), q.stride(0), q.stride(1),
        c[0], c[1], c[2], c[3], c[4],
        NUM_HEADS=num_heads, NUM_KV_HEADS=kv_heads, HALF=q.shape[2] // 2, QK_NORM=qk_norm is not None,
        STAGED=staged,
    )  # fmt: skip


def rotate_and_store(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor, layer: int,
    meta: PagedAttentionMetadata, num_heads: int, qk_norm=None,
) -> torch.Tensor:  # fmt: skip
    """The rotated queries `[tokens, num_heads, head_dim]` of `qkv` (`[tokens, (heads + 2 kv_heads) *
    head_dim]`, rows contiguous); the rotated keys and the values go into the tokens' slots of `layer`.
    `qk_norm`: an `attention.QKNorm`, or None."""
    n, kv_heads, dim = qkv.shape[0], kv_cache.shape[4], kv_cache.shape[5]
    if kv_cache.dtype != torch.int8:
        q = torch.empty(n, num_heads, dim, dtype=qkv.dtype, device=qkv.device)
        if n:
            _launch_rotate(qkv, cos, sin, q, kv_cache, meta, layer, num_heads, kv_heads, qk_norm)
        return q
    q, staged = rotate(qkv, cos, sin, num_heads, kv_heads, qk_norm)
    if n:
        # A decode step's tokens each start their own run (one token per sequence; its starts and counts go
        # unread): no host sync to find runs, so the step stays capturable as a CUDA graph.
        one = not meta.prefills
        runs = (meta.slot_pages, meta.slot_offsets, meta.slot_pages, meta.slot_pages) if one else meta.kv_runs
        c = kv_cache.stride()
        _store_int8_kernel[(len(runs[0]), kv_heads, 2)](
            staged, kv_cache, *runs, layer, staged.stride(0), staged.stride(1), staged.stride(2),
            c[0], c[1], c[2], c[3], c[4], PAGE_SIZE=kv_cache.shape[3], HEAD_DIM=dim, ONE_TOKEN_RUNS=one,
        )  # fmt: skip
    return q


@triton.jit
def _attend_tile(q, k, v, allowed, m, denom, acc, scale, PRECISION: tl.constexpr):
    """One online-softmax step: fold a tile of keys (where `allowed`) into the running max `m`,
    denominator and accumulator of each query row."""
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    scores = tl.where(allowed, scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, 1))
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # rows that see no key yet
    alpha = tl.exp(m - m_safe)
    probs = tl.exp(scores - m_safe[:, None])
    denom = denom * alpha + tl.sum(probs, 1)
    acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
    return m_new, denom, acc


@triton.jit
def _attend_keys(
    q, q_pos, lowest, m, denom, acc, cache_ptr, table_row_ptr, first, context, layer, kvh, scale,
    stride_cp, stride_cl, stride_ckv, stride_cs, stride_ch,
    fresh_ptr, fresh_row, own_start, stride_fn, stride_fkv, stride_fh,
    TILE: tl.constexpr, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
    CAUSAL: tl.constexpr, KV_INT8: tl.constexpr, FRESH: tl.constexpr,
):  # fmt: skip
    """Fold the context's keys at positions [first, first + TILE) into the queries' online softmax: K and V of
    KV head `kvh`, read from the sequence's pages (a tile may span pages). Keys before `lowest` (a sliding
    window's start: one for all queries, or a column of one per query) are not seen. With CAUSAL, query row i
    sees only keys at or before its position `q_pos[i]`. FRESH: the keys from `own_start` on (the span's own)
    come from `fresh_ptr` (`[tokens, 2, kv_heads, head_dim]`, position `own_start` at row `fresh_row`): a ring
    of pages stores them only after attending."""
    positions = first + tl.arange(0, TILE)
    valid = positions < context
    stored = valid
    if FRESH:
        stored = valid & (positions < own_start)
    d = tl.arange(0, HEAD_DIM)
    page = tl.load(table_row_ptr + positions // PAGE_SIZE, mask=stored, other=0).to(tl.int64)
    blocks = cache_ptr + page * stride_cp + layer * stride_cl
    addr = blocks[:, None] + (positions % PAGE_SIZE)[:, None] * stride_cs + kvh * stride_ch + d[None, :]
    k = tl.load(addr, mask=stored[:, None], other=0.0)
    v = tl.load(addr + stride_ckv, mask=stored[:, None], other=0.0)
    if KV_INT8:  # each block's fp32 scales follow its values (kernels/kv_format.py); int8 pointers count bytes
        k_scales = (blocks + PAGE_SIZE * stride_cs + kvh * 4).to(tl.pointer_type(tl.float32))
        v_scales = (blocks + stride_ckv + PAGE_SIZE * stride_cs + kvh * 4).to(tl.pointer_type(tl.float32))
        k = k.to(tl.float32) * tl.load(k_scales, mask=stored, other=0.0)[:, None]
        v = v.to(tl.float32) * tl.load(v_scales, mask=stored, other=0.0)[:, None]
    k, v = k.to(q.dtype), v.to(q.dtype)  # a narrower --kv-dtype is read as the queries' type
    if FRESH:
        own = (valid & (positions >= own_start))[:, None]
        src = fresh_ptr + (fresh_row + positions - own_start)[:, None] * stride_fn + kvh * stride_fh + d[None, :]
        k = tl.where(own, tl.load(src, mask=own, other=0.0).to(q.dtype), k)
        v = tl.where(own, tl.load(src + stride_fkv, mask=own, other=0.0).to(q.dtype), v)
    allowed = valid[None, :] & (positions[None, :] >= lowest)
    if CAUSAL:
        allowed = allowed & (positions[None, :] <= q_pos[:, None])
    return _attend_tile(q, k, v, allowed, m, denom, acc, scale, PRECISION)


@triton.jit
def _decode_partial_kernel(
    q_ptr, cache_ptr, table_ptr, lens_ptr, out_ptr, m_ptr, l_ptr, layer, scale, window,
    stride_qb, stride_qh,
    stride_cp, stride_cl, stride_ckv, stride_cs, stride_ch,
    stride_tb,
    stride_ob, stride_oh, stride_os,
    stride_mb, stride_mh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    SPLIT_TOKENS: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr, KV_INT8: tl.constexpr,
):  # fmt: skip
    """One (sequence, KV head, split): online softmax over the split's tokens for the group's queries,
    TILE tokens (possibly from several pages) at a time."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    context = tl.load(lens_ptr + b)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + g
    group_mask = g < GROUP
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=group_mask[:, None], other=0.0)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    split_start = split * SPLIT_TOKENS
    # Keys a sliding window (window > 0) still sees: from `lowest` on.
    lowest = tl.where(window > 0, tl.maximum(context - window, 0), 0)
    # The loop ends where the context does, and starts where the window does: a split outside both runs no
    # tile (the grid is fixed, the work is not). Splits and tiles are aligned, so the start stays on a tile.
    start = tl.maximum(split_start, (lowest // TILE) * TILE)
    for t in range(start, tl.minimum(context, split_start + SPLIT_TOKENS), TILE):
        m, denom, acc = _attend_keys(
            q, 0, lowest, m, denom, acc, cache_ptr, table_ptr + b * stride_tb, t, context, layer, kvh, scale,
            stride_cp, stride_cl, stride_ckv, stride_cs, stride_ch, cache_ptr, 0, 0, 0, 0, 0,
            TILE, PAGE_SIZE, HEAD_DIM, PRECISION, False, KV_INT8, False,
        )  # fmt: skip
    out = out_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :]
    tl.store(out, acc, mask=group_mask[:, None])
    tl.store(m_ptr + b * stride_mb + heads * stride_mh + split, m, mask=group_mask)
    tl.store(l_ptr + b * stride_mb + heads * stride_mh + split, denom, mask=group_mask)


@triton.jit
def _decode_reduce_kernel(
    part_ptr, m_ptr, l_ptr, out_ptr, num_splits,
    stride_pb, stride_ph, stride_ps, stride_mb, stride_mh, stride_ob, stride_oh,
    SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """Combine the splits of one (sequence, head): rescale each by its max, sum, normalise."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    smask = sp < num_splits
    m = tl.load(m_ptr + b * stride_mb + h * stride_mh + sp, mask=smask, other=float("-inf"))
    denom = tl.load(l_ptr + b * stride_mb + h * stride_mh + sp, mask=smask, other=0.0)
    part = tl.load(
        part_ptr + b * stride_pb + h * stride_ph + sp[:, None] * stride_ps + d[None, :], mask=smask[:, None], other=0.0
    )
    m_max = tl.max(m, 0)
    weight = tl.where(m > float("-inf"), tl.exp(m - m_max), 0.0)
    total = tl.sum(weight * denom, 0)
    out = tl.sum(part * weight[:, None], 0) / total
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


# Programs a decode step should launch to fill a GPU: about two per SM of an H100/H200 (132 SMs). A constant,
# not the device's count, so that the split counts (and the tests that cover them) do not depend on the card.
_TARGET_PROGRAMS = 264
MAX_SPLITS = 64


def decode_splits(batch: int, kv_heads: int, max_pages: int) -> int:
    """How many parts each sequence's context is split into (flash-decoding): enough (sequence, KV head,
    split) programs to fill the GPU at small batches, one split at large ones; a power of two, at most
    `MAX_SPLITS` and at most the page table's width. A function of the step's shapes only, so that a
    captured step's grid is fixed per batch bucket; splits past a sequence's context run no tile."""
    want = -(-_TARGET_PROGRAMS // (batch * kv_heads))
    return min(1 << (want - 1).bit_length(), MAX_SPLITS, 1 << (max(max_pages, 1).bit_length() - 1))


def decode_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: PagedAttentionMetadata, scale: float,
    out: torch.Tensor | None = None, num_splits: int | None = None, tile: int = 64, window: int = 0,
) -> torch.Tensor:  # fmt: skip
    """Attention of one query token per sequence (rows [0, num_decode) of `q`) over its pages (its last
    `window` positions where window > 0), its context split `num_splits` ways (default `decode_splits`;
    rounded so that each split is a power of two of pages). Written into rows [0, num_decode) of `out` when
    given (no copy after), else into a new tensor."""
    nd = meta.num_decode
    _, num_heads, dim = q.shape
    kv_heads, page_size = kv_cache.shape[4], kv_cache.shape[3]
    _check_tile_sizes(page_size, dim)
    group = num_heads // kv_heads
    max_pages = max(meta.decode_page_table.shape[1], 1)
    wanted = num_splits or decode_splits(nd, kv_heads, max_pages)
    pages_per_split = triton.next_power_of_2(triton.cdiv(max_pages, wanted))
    splits = triton.cdiv(max_pages, pages_per_split)
    part = torch.empty(nd, num_heads, splits, dim, dtype=torch.float32, device=q.device)
    m = torch.empty(nd, num_heads, splits, dtype=torch.float32, device=q.device)
    denom = torch.empty_like(m)
    if out is None:
        out = torch.empty(nd, num_heads, dim, dtype=q.dtype, device=q.device)
    c, t = kv_cache.stride(), meta.decode_page_table
    _decode_partial_kernel[(nd, kv_heads, splits)](
        q, kv_cache, t, meta.decode_context_lens, part, m, denom, layer, scale, window,
        q.stride(0), q.stride(1),
        c[0], c[1], c[2], c[3], c[4],
        t.stride(0),
        part.stride(0), part.stride(1), part.stride(2),
        m.stride(0), m.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=dim, PAGE_SIZE=page_size,
        SPLIT_TOKENS=pages_per_split * page_size, TILE=min(tile, pages_per_split * page_size),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", KV_INT8=kv_cache.dtype == torch.int8,
    )  # fmt: skip
    _decode_reduce_kernel[(nd, num_heads)](
        part, m, denom, out, splits,
        part.stride(0), part.stride(1), part.stride(2), m.stride(0), m.stride(1), out.stride(0), out.stride(1),
        SPLITS_PAD=max(2, triton.next_power_of_2(splits)), HEAD_DIM=dim,
    )  # fmt: skip
    return out


@triton.jit
def _prefill_kernel(
    q_ptr, cache_ptr, out_ptr, starts_ptr, qlens_ptr, ctx_ptr, table_ptr, fresh_ptr, layer, scale, window,
    stride_qn, stride_qh, stride_on, stride_oh,
    stride_cp, stride_cl, stride_ckv, stride_cs, stride_ch,
    stride_tb, stride_fn, stride_fkv, stride_fh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, KV_INT8: tl.constexpr, FRESH: tl.constexpr,
):  # fmt: skip
    """One (span, block of queries, head): causal attention over the span's context, read from pages (FRESH: the
    span's own keys from `fresh_ptr`)."""
    span = tl.program_id(0)
    block = tl.program_id(1)
    h = tl.program_id(2)
    kvh = h // GROUP
    start = tl.load(starts_ptr + span)
    q_len = tl.load(qlens_ptr + span)
    context = tl.load(ctx_ptr + span)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < q_len
    q_pos = context - q_len + rows  # absolute position of each query
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (start + rows)[:, None] * stride_qn + h * stride_qh + d[None, :], mask=row_mask[:, None])
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    last = tl.minimum(context, context - q_len + (block + 1) * BLOCK_M)  # keys past the block's last query
    # A sliding window (window > 0): each query sees its last `window` positions; the block's first query
    # sees the lowest of them, where the loop starts.
    lowest = tl.where(window > 0, tl.maximum(q_pos - window + 1, 0), 0)
    first = tl.where(window > 0, tl.maximum(context - q_len + block * BLOCK_M - window + 1, 0), 0)
    for t in range((first // BLOCK_N) * BLOCK_N, last, BLOCK_N):
        m, denom, acc = _attend_keys(
            q, q_pos, lowest[:, None], m, denom, acc, cache_ptr, table_ptr + span * stride_tb, t, context, layer,
            kvh, scale,
            stride_cp, stride_cl, stride_ckv, stride_cs, stride_ch,
            fresh_ptr, start, context - q_len, stride_fn, stride_fkv, stride_fh,
            BLOCK_N, PAGE_SIZE, HEAD_DIM, PRECISION, True, KV_INT8, FRESH,
        )  # fmt: skip
    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    dst = out_ptr + (start + rows)[:, None] * stride_on + h * stride_oh + d[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def prefill_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: PagedAttentionMetadata, scale: float,
    out: torch.Tensor, block_m: int = 16, block_n: int = 64, window: int = 0, fresh: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """Causal attention for every prefill span of `meta` (ragged, with prefixes in pages; within a sliding
    `window` where window > 0), into `out`. `fresh` (`[tokens, 2, kv_heads, head_dim]`): the step's own K/V,
    read from there rather than from the pages (a ring stores them only after the step attends)."""
    if not meta.prefills:
        return
    _, num_heads, dim = q.shape
    kv_heads, page_size = kv_cache.shape[4], kv_cache.shape[3]
    _check_tile_sizes(page_size, dim)
    spans = meta.prefills
    starts, q_lens, contexts, table = meta.prefill_tables
    c = kv_cache.stride()
    f = fresh.stride() if fresh is not None else (0, 0, 0)
    grid = (len(spans), triton.cdiv(max(sp.query_len for sp in spans), block_m), num_heads)
    _prefill_kernel[grid](
        q, kv_cache, out, starts, q_lens, contexts, table, fresh if fresh is not None else q, layer, scale, window,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        c[0], c[1], c[2], c[3], c[4],
        table.stride(0), f[0], f[1], f[2],
        GROUP=num_heads // kv_heads, HEAD_DIM=dim, PAGE_SIZE=page_size, BLOCK_M=block_m, BLOCK_N=block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", KV_INT8=kv_cache.dtype == torch.int8,
        FRESH=fresh is not None,
    )  # fmt: skip
