"""Triton kernels against their PyTorch reference: on the CPU under TRITON_INTERPRET=1 (see conftest), or
natively on a CUDA machine with `TRITON_INTERPRET=0`."""

from __future__ import annotations

import itertools
import math
import os
import random

import pytest
import torch

from splitserve.kernels import cpu_kernels, kv_format, reference, triton_attention
from splitserve.kernels.metadata import PagedAttentionMetadata, PrefillSpan

TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3}
NATIVE = os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available()
DEVICE = torch.device("cuda" if NATIVE else "cpu")
if NATIVE:  # tf32 is the GPU default for fp32 dots in Triton; compare with an fp32 reference loosely
    TOLERANCE[torch.float32] = 2e-3


def _step(
    spans: list[tuple[int, int]], page_size: int, kv_heads: int, dim: int, dtype, num_layers: int = 2, seed: int = 0
):
    """A cache full of random K/V and a step's metadata: spans are (query_len, context_len), decode
    rows (query_len 1 after a prefix) first, each sequence on random distinct pages."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    pages_needed = [math.ceil(ctx / page_size) for _, ctx in spans]
    num_pages = sum(pages_needed) + 3
    cache = kv_format.from_float(torch.randn(num_pages, num_layers, 2, page_size, kv_heads, dim, generator=g), dtype)
    free = list(range(num_pages))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(n)] for n in pages_needed]
    decode = [i for i, (q, ctx) in enumerate(spans) if q == 1 and ctx > 1]
    prefills, slot_pages, slot_offsets, row = [], [], [], 0
    order = decode + [i for i in range(len(spans)) if i not in decode]
    for i in order:
        q_len, ctx = spans[i]
        for pos in range(ctx - q_len, ctx):
            slot_pages.append(tables[i][pos // page_size])
            slot_offsets.append(pos % page_size)
        if i not in decode:
            mask = None
            if ctx > q_len:
                mask = torch.arange(ctx)[None, :] <= torch.arange(ctx - q_len, ctx)[:, None]
            prefills.append(PrefillSpan(row, q_len, ctx, torch.tensor(tables[i]), mask))
        row += q_len
    width = max((len(tables[i]) for i in decode), default=0)
    padded = [tables[i] + [0] * (width - len(tables[i])) for i in decode]
    table = torch.tensor(padded, dtype=torch.long).view(len(decode), width)
    lens = torch.tensor([spans[i][1] for i in decode], dtype=torch.long)
    mask = torch.arange(width * page_size)[None, :] < lens[:, None]
    meta = PagedAttentionMetadata(
        slot_pages=torch.tensor(slot_pages, device=DEVICE),
        slot_offsets=torch.tensor(slot_offsets, device=DEVICE),
        num_decode=len(decode),
        decode_page_table=table.to(DEVICE),
        decode_context_lens=lens.to(DEVICE),
        decode_mask=mask.view(len(decode), 1, 1, width * page_size).to(DEVICE),
        prefills=[
            PrefillSpan(p.query_start, p.query_len, p.context_len, p.page_ids.to(DEVICE),
                        None if p.causal_mask is None else p.causal_mask.to(DEVICE))
            for p in prefills
        ],
    )  # fmt: skip
    return kv_format.copy(cache, DEVICE), meta, row


SHAPES = [  # (head_dim, query heads per KV head, page_size, dtype)
    (64, 1, 16, torch.float32),
    (64, 3, 16, torch.float16),
    (128, 4, 32, torch.float32),
    (128, 8, 16, torch.float16),
    (64, 8, 32, torch.float32),
    (128, 1, 32, torch.float16),
]


@pytest.mark.parametrize(("dim", "group", "page_size", "dtype"), SHAPES)
def test_decode_attention_matches_reference(dim, group, page_size, dtype):
    kv_heads = 2
    spans = [(1, 2), (1, 17), (1, 50), (1, 5 * page_size), (1, 9 * page_size + 3)]
    cache, meta, n = _step(spans, page_size, kv_heads, dim, dtype)
    q = torch.randn(n, kv_heads * group, dim).to(DEVICE, dtype)
    want = reference.paged_attention(q.float(), cache.float(), 1, meta, dim**-0.5)
    # 5 splits of 2 pages make the long contexts use several splits (and the reduction).
    got = triton_attention.decode_attention(q, cache, 1, meta, dim**-0.5, num_splits=5)
    torch.testing.assert_close(got.float(), want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_decode_splits_are_fixed_by_shapes_and_cover_the_tested_counts():
    """A decode step's split count depends only on its batch bucket, KV heads and page-table width (so a
    captured step's grid is fixed), and every count it picks is one the next test covers."""
    from splitserve.engine.decode_graphs import batch_buckets

    used = {
        triton_attention.decode_splits(bucket, kv_heads, pages)
        for bucket in batch_buckets(512)
        for kv_heads in (1, 2, 3, 4, 8, 16)
        for pages in (1, 7, 64, 256, 512, 8192)
    }
    assert used == set(DECODE_SPLITS)
    assert triton_attention.decode_splits(1, 8, 512) == 64  # batch 1: the context spread over the GPU
    assert triton_attention.decode_splits(64, 8, 512) == 1  # a large batch fills it alone
    assert triton_attention.decode_splits(4, 8, 2) == 2  # never more splits than pages


DECODE_SPLITS = [1, 2, 4, 8, 16, 32, 64]


@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("splits", DECODE_SPLITS)
def test_decode_attention_matches_reference_at_every_split_count(splits, page_size):
    """Every split count `decode_splits` picks, at each page size the kernels take (powers of two from 16;
    the engine's default is 16), over a 70-page table: splits of 2 to 128 pages, split counts that are not
    powers of two (70 pages in splits of 2 is 35), and splits past a short context that run no tile."""
    kv_heads, group, dim = 2, 4, 64
    spans = [(1, 2), (1, 70 * page_size), (1, 3 * page_size + 5), (1, 41 * page_size - 1)]
    cache, meta, n = _step(spans, page_size, kv_heads, dim, torch.float32)
    q = torch.randn(n, kv_heads * group, dim, device=DEVICE)
    want = reference.paged_attention(q, cache, 0, meta, dim**-0.5)
    got = triton_attention.decode_attention(q, cache, 0, meta, dim**-0.5, num_splits=splits)
    torch.testing.assert_close(got, want, atol=TOLERANCE[torch.float32], rtol=TOLERANCE[torch.float32])


@pytest.mark.skipif(cpu_kernels.library() is None, reason="no native CPU kernels here (no AVX2/FMA or compiler)")
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize(("dim", "group", "page_size"), [(64, 3, 16), (128, 4, 32), (64, 1, 8), (72, 5, 16)])
def test_native_cpu_attention_matches_reference(dim, group, page_size, kv_dtype):
    """fp32 queries over a cache stored as fp32, fp16, bf16 or int8 pages with their scales (--kv-dtype), read as
    stored: the reference converts the pages to fp32 first, the kernel in registers (an int8 page's scale applied
    to its keys' scores and its values' probabilities). Decode rows and prompt rows (a chunk alone, and one after a
    prefix in pages), each prompt row through its `row_tables` entry."""
    kv_heads = 2
    spans = [(1, 1), (1, 2), (1, 17), (1, 5 * page_size), (1, 9 * page_size + 3), (7, 7), (5, 3 * page_size + 2)]
    cache, meta, rows = _step(spans, page_size, kv_heads, dim, kv_dtype, num_layers=3)
    cache, meta = kv_format.copy(cache, "cpu"), _on_cpu(meta)
    q = torch.randn(rows, kv_heads * group, dim)
    for layer in range(3):
        want = reference.paged_attention(q, cache, layer, meta, dim**-0.5)
        got = cpu_kernels.paged_attention(q, cache, layer, *meta.row_tables, dim**-0.5)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)


@pytest.mark.skipif(cpu_kernels.library() is None, reason="no native CPU kernels here (no AVX2/FMA or compiler)")
@pytest.mark.parametrize(
    ("dim", "kv_dtype"), [(64, torch.float32), (64, torch.int8), (72, torch.float32), (12, torch.bfloat16)]
)
def test_native_attention_of_a_prompt_row_is_its_decode_rows_bitwise(dim, kv_dtype):
    """A token's attention is the same bits whether its row is a decode row or one of a prompt chunk of any size
    (`row_tables`; the kernel attends up to 8 of a chunk's rows together, sharing their keys' reads): the one
    numerics that lets a prompt computed in chunks, a decode step and a migrated request's prefill agree. And on
    any number of threads: with few rows the kernel splits a KV head's query heads between threads."""
    page_size, kv_heads, ctx = 16, 3, 50
    cache, _, _ = _step([(1, ctx)], page_size, kv_heads, dim, kv_dtype, num_layers=1)
    cache = kv_format.copy(cache, "cpu")
    pages = torch.randperm(cache.shape[0] - 1)[: math.ceil(ctx / page_size)]
    q = torch.randn(ctx, 3 * kv_heads, dim)
    outs = {}
    threads = torch.get_num_threads()
    try:
        for n_threads, chunk in itertools.product((1, 4), (1, 7, 16, ctx)):
            torch.set_num_threads(n_threads)
            got = torch.empty_like(q)
            for start in range(0, ctx, chunk):
                end = min(start + chunk, ctx)
                table = pages.expand(end - start, -1)
                lens = torch.arange(start + 1, end + 1)
                got[start:end] = cpu_kernels.paged_attention(q[start:end], cache, 0, table, lens, dim**-0.5)
            outs[n_threads, chunk] = got
    finally:
        torch.set_num_threads(threads)
    for key, got in outs.items():
        assert torch.equal(got, outs[1, 1]), key


def _on_cpu(meta: PagedAttentionMetadata) -> PagedAttentionMetadata:
    prefills = [
        PrefillSpan(
            p.query_start,
            p.query_len,
            p.context_len,
            p.page_ids.cpu(),
            None if p.causal_mask is None else p.causal_mask.cpu(),
        )
        for p in meta.prefills
    ]
    return PagedAttentionMetadata(meta.slot_pages.cpu(), meta.slot_offsets.cpu(), meta.num_decode,
                                  meta.decode_page_table.cpu(), meta.decode_context_lens.cpu(),
                                  meta.decode_mask.cpu(), prefills)  # fmt: skip


@pytest.mark.parametrize(("dim", "group", "page_size", "dtype"), SHAPES)
def test_prefill_attention_matches_reference(dim, group, page_size, dtype):
    kv_heads = 2
    # (query_len, context_len): whole prompts, a one-token prompt, and later chunks after a prefix.
    spans = [(1, 1), (5, 5), (20, 37), (33, 33), (16, 2 * page_size + 7)]
    cache, meta, n = _step(spans, page_size, kv_heads, dim, dtype, seed=1)
    q = torch.randn(n, kv_heads * group, dim).to(DEVICE, dtype)
    want = reference.paged_attention(q.float(), cache.float(), 0, meta, dim**-0.5)
    got = torch.zeros_like(q)
    triton_attention.prefill_attention(q, cache, 0, meta, dim**-0.5, got)
    torch.testing.assert_close(got.float(), want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16, torch.int8])
def test_triton_attention_reads_a_narrower_cache(kv_dtype):
    """fp32 queries over a cache stored narrower (--kv-dtype): decode and prefill attention as the reference,
    which converts the pages to the queries' dtype."""
    page_size, kv_heads, group, dim = 16, 2, 4, 64
    spans = [(1, 2), (1, 5 * page_size + 3), (9, 9), (16, 2 * page_size + 7)]
    cache, meta, n = _step(spans, page_size, kv_heads, dim, kv_dtype, seed=6)
    q = torch.randn(n, kv_heads * group, dim, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    want = reference.paged_attention(q, cache, 1, meta, dim**-0.5)
    got = torch.zeros_like(q)
    nd = meta.num_decode
    triton_attention.decode_attention(q, cache, 1, meta, dim**-0.5, out=got, num_splits=2)
    triton_attention.prefill_attention(q, cache, 1, meta, dim**-0.5, got)
    tol = TOLERANCE[torch.float32]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    wider = kv_format.to_float(cache) * 1.01
    assert not torch.allclose(want[:nd], reference.paged_attention(q, wider, 1, meta, dim**-0.5)[:nd])


@pytest.mark.parametrize("window", [1, 7, 16, 33, 100])
def test_sliding_window_attention_matches_reference(window):
    """Gemma 3's local layers: each query sees its last `window` positions. The reference is checked against
    attention over exactly those keys, gathered by hand; the Triton kernels (decode over several splits, some
    wholly before the window; prefill chunks after a prefix) against the reference."""
    page_size, kv_heads, group, dim = 16, 2, 2, 64
    scale = dim**-0.5
    spans = [(1, 2), (1, 40), (1, 5 * page_size + 3), (9, 9), (20, 57), (16, 2 * page_size + 7)]
    cache, meta, n = _step(spans, page_size, kv_heads, dim, torch.float32, seed=4)
    q = torch.randn(n, kv_heads * group, dim, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    want = reference.paged_attention(q, cache, 1, meta, scale, window)

    def by_hand(row: int, pages: torch.Tensor, position: int) -> torch.Tensor:
        keys = range(max(0, position - window + 1), position + 1)
        kv = torch.stack([cache[pages[p // page_size], 1, :, p % page_size] for p in keys], dim=1)  # [2, n, h, d]
        k, v = kv[0].repeat_interleave(group, dim=1), kv[1].repeat_interleave(group, dim=1)
        weights = torch.softmax(torch.einsum("hd,nhd->hn", q[row], k) * scale, dim=-1)
        return torch.einsum("hn,nhd->hd", weights, v)

    context = int(meta.decode_context_lens[2])
    torch.testing.assert_close(want[2], by_hand(2, meta.decode_page_table[2], context - 1), atol=1e-5, rtol=1e-5)
    last = meta.prefills[-1]  # a chunk after a prefix: its last query
    row = last.query_start + last.query_len - 1
    torch.testing.assert_close(want[row], by_hand(row, last.page_ids, last.context_len - 1), atol=1e-5, rtol=1e-5)
    unwindowed = reference.paged_attention(q, cache, 1, meta, scale)
    # A window shorter than some context changes its rows; one longer than every context (100) changes none.
    assert torch.allclose(want, unwindowed) == (window >= max(ctx for _, ctx in spans))

    nd = meta.num_decode
    got = triton_attention.decode_attention(q, cache, 1, meta, scale, num_splits=3, window=window)
    torch.testing.assert_close(got, want[:nd], atol=TOLERANCE[torch.float32], rtol=TOLERANCE[torch.float32])
    got = torch.zeros_like(q)
    triton_attention.prefill_attention(q, cache, 1, meta, scale, got, window=window)
    torch.testing.assert_close(got[nd:], want[nd:], atol=TOLERANCE[torch.float32], rtol=TOLERANCE[torch.float32])


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotate_and_store_matches_rope_then_write_kv(dim, dtype, qk_norm, monkeypatch):
    """The fused kernel against the reference path (per-head norms where asked, the rotary embedding, then the
    K/V write) on a step with decode rows and prefill chunks: the same queries, and the same cache, byte for
    byte outside the rotated keys."""
    from splitserve.kernels import attention

    heads, kv_heads = 6, 2
    cache, meta, n = _step([(1, 9), (7, 7), (12, 40)], 16, kv_heads, dim, dtype, seed=2)
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * dim, generator=g).to(DEVICE, dtype)
    angles = torch.rand(n, dim // 2, generator=g) * 6.3
    cos, sin = (f(torch.cat((angles, angles), dim=-1)).to(DEVICE, dtype) for f in (torch.cos, torch.sin))
    norm = None
    if qk_norm:
        weights = (torch.rand(dim, generator=g) + 0.5).to(DEVICE, dtype), (torch.rand(dim, generator=g) + 0.5)
        norm = attention.QKNorm(weights[0], weights[1].to(DEVICE, dtype), 1e-6)
    monkeypatch.setenv("SPLITSERVE_KERNELS", "reference")
    want = kv_format.copy(cache)
    want_q = attention.rotate_and_store(qkv, cos, sin, want, 1, meta, heads, norm)
    got = kv_format.copy(cache)
    got_q = triton_attention.rotate_and_store(qkv, cos, sin, got, 1, meta, heads, norm)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got_q, want_q, atol=tol, rtol=tol)
    torch.testing.assert_close(got[:, 1, 0], want[:, 1, 0], atol=tol, rtol=tol)  # keys: rotated
    assert torch.equal(got[:, 1, 1], want[:, 1, 1])  # values: copied
    assert torch.equal(got[:, 0], cache[:, 0])  # the other layer: untouched
    assert not torch.equal(got[:, 1, 1], cache[:, 1, 1])  # the slots were written


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16, torch.int8])
def test_rotate_and_store_writes_a_narrower_cache_as_the_reference(kv_dtype, monkeypatch):
    """fp32 activations into a cache stored narrower (--kv-dtype): the Triton kernels convert as the reference
    path does (values byte for byte, an int8 cache's value scales too; keys after the rotation, within the
    narrower type's rounding), on a step of decode rows and prefill chunks, and on a decode-only step."""
    from splitserve.kernels import attention

    heads, kv_heads, dim = 6, 2, 64
    for spans in ([(1, 9), (12, 40)], [(1, 9), (1, 17), (1, 33)]):
        cache, meta, n = _step(spans, 16, kv_heads, dim, kv_dtype, seed=3)
        g = torch.Generator().manual_seed(7)
        qkv = torch.randn(n, (heads + 2 * kv_heads) * dim, generator=g).to(DEVICE)
        angles = torch.rand(n, dim // 2, generator=g) * 6.3
        cos, sin = (f(torch.cat((angles, angles), dim=-1)).to(DEVICE) for f in (torch.cos, torch.sin))
        monkeypatch.setenv("SPLITSERVE_KERNELS", "reference")
        want = kv_format.copy(cache)
        want_q = attention.rotate_and_store(qkv, cos, sin, want, 1, meta, heads)
        got = kv_format.copy(cache)
        got_q = triton_attention.rotate_and_store(qkv, cos, sin, got, 1, meta, heads)
        assert got_q.dtype == torch.float32 and got.dtype == kv_dtype
        torch.testing.assert_close(got_q, want_q, atol=2e-5, rtol=2e-5)
        if kv_dtype != torch.bfloat16 or NATIVE:
            assert torch.equal(got[:, 1, 1], want[:, 1, 1])  # values: converted alike
        else:  # Triton's interpreter truncates fp32 to bf16 (a GPU rounds to nearest even, as torch does): 1 ulp
            torch.testing.assert_close(got[:, 1, 1].float(), want[:, 1, 1].float(), atol=0, rtol=2**-7)
        if kv_dtype == torch.int8:
            assert torch.equal(kv_format.scales(got)[:, 1, 1], kv_format.scales(want)[:, 1, 1])
            assert not torch.equal(kv_format.scales(got)[:, 1, 1], kv_format.scales(cache)[:, 1, 1])
        keys = [kv_format.to_float(c)[:, 1, 0] for c in (got, want)]
        torch.testing.assert_close(*keys, atol=2e-2, rtol=2e-2)
        assert torch.equal(kv_format.pages(got).view(len(got), 2, -1)[:, 0],
                           kv_format.pages(cache).view(len(got), 2, -1)[:, 0])  # layer 0: untouched  # fmt: skip


def test_an_int8_page_keeps_one_scale_per_head_as_its_tokens_arrive():
    """Tokens written one by one or all at once: each page and head's scale is the largest |value| of its tokens
    over 127; rows already in a page are requantized when a larger token arrives (within one more half step of
    its scale), and a page taken afresh (a write at its first slot) ignores the scale its last user left."""
    page_size, kv_heads, dim = 4, 2, 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 2, kv_heads, dim, generator=g) * torch.linspace(0.5, 4, 7)[:, None, None, None]
    pages, offsets = torch.tensor([1, 1, 1, 1, 3, 3, 3]), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    caches = []
    for one_by_one in (True, False):
        cache = kv_format.allocate((5, 2, 2, page_size, kv_heads, dim), torch.int8, torch.device("cpu"))
        kv_format.scales(cache).fill_(100.0)  # what an earlier user of the pages left
        for part in torch.arange(7).split(1 if one_by_one else 7):
            kv_format.write(cache, 1, x[part, 0], x[part, 1], pages[part], offsets[part])
        caches.append(cache)
        scales = kv_format.scales(cache)[:, 1]  # [pages, 2, kv_heads]
        for page, rows in ((1, slice(0, 4)), (3, slice(4, 7))):
            assert torch.equal(scales[page], x[rows].abs().amax(dim=(0, 3)) / 127)
        got = kv_format.to_float(cache)[pages, 1, :, offsets]  # [tokens, 2, kv_heads, dim]
        bound = scales[pages][..., None] * (1.0 if one_by_one else 0.5)
        assert ((got - x).abs() <= bound * 1.0001).all()
        assert torch.equal(kv_format.scales(cache)[:, 0], torch.full((5, 2, kv_heads), 100.0))  # other layer
    assert not torch.equal(*caches)  # requantizing on the way is not free: the bytes differ


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_mul_matches_reference(dtype):
    from splitserve.kernels import triton_layers

    gate_up = (torch.randn(5, 2 * 1536) * 4).to(DEVICE, dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(triton_layers.silu_mul(gate_up), want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize(
    "model", ["tiny_qwen2", "tiny_qwen3", "tiny_mistral", "tiny_qwen3_moe", "tiny_olmoe", "tiny_gemma3"]
)
def test_engine_with_triton_kernels_gives_the_reference_tokens(model, request, monkeypatch):
    from splitserve.decode.engine import DecodeEngine
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.params import SamplingParams
    from tests.helpers import run_staggered

    rng = random.Random(3)
    prompts = [[rng.randrange(8, 384) for _ in range(n)] for n in (1, 9, 23, 40)]
    params = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)] * len(prompts)
    tokens = {}
    for mode in ("reference", "triton", "auto"):  # auto on the CPU: the native decode attention
        monkeypatch.setenv("SPLITSERVE_KERNELS", mode)
        config = EngineConfig(
            model=str(request.getfixturevalue(model)),
            dtype="fp32",
            device=DEVICE.type,
            page_size=16,
            max_num_batched_tokens=24,
        )
        engine = DecodeEngine(config)
        tokens[mode], mixed = run_staggered(engine, prompts, params, [0, 1, 2, 4])
        assert mixed > 0  # decode rows and prefill chunks (with prefixes) in one step
    assert tokens["triton"] == tokens["reference"] == tokens["auto"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_reference(dtype, with_residual):
    from splitserve.kernels import layers, triton_layers

    x, res, w = (torch.randn(*shape).to(DEVICE, dtype) for shape in ((7, 576), (7, 576), (576,)))
    residual = res if with_residual else None
    want_out, want_h = layers.add_rms_norm_reference(x, residual, w, 1e-5)
    got_out, got_h = triton_layers.add_rms_norm(x, residual, w, 1e-5)
    assert torch.equal(got_h, want_h)
    torch.testing.assert_close(got_out, want_out, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("kernels", ["triton", "auto"])
def test_gather_and_scatter_pages_match_reference(kernels, monkeypatch):
    from splitserve.kernels.layers import copy_pages

    monkeypatch.setenv("SPLITSERVE_KERNELS", kernels)
    pages = torch.randn(12, 2, 2, 16, 3, 64, device=DEVICE)
    ids = [7, 2, 11, 3, 4, 5]
    staged = torch.empty(len(ids), *pages.shape[1:], device=DEVICE)
    copy_pages(pages, ids, staged, list(range(len(ids))))  # gather
    assert torch.equal(staged, pages[torch.tensor(ids, device=DEVICE)])
    target = torch.zeros_like(pages)
    copy_pages(staged, list(range(len(ids))), target, ids)  # scatter
    assert torch.equal(target[torch.tensor(ids, device=DEVICE)], staged)
    assert not target[torch.tensor([i for i in range(12) if i not in ids], device=DEVICE)].any()


@pytest.mark.skipif(cpu_kernels.library() is None, reason="no native CPU kernels here (no AVX2/FMA or compiler)")
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_native_cpu_layer_kernels_match_reference(rows):
    from splitserve.kernels import layers

    g = torch.Generator().manual_seed(rows)
    for dim in (64, 576, 13):
        x, residual = (torch.randn(rows, dim, generator=g) for _ in range(2))
        weight = torch.randn(dim, generator=g)
        for res in (None, residual):
            got, want = (
                cpu_kernels.add_rms_norm(x, res, weight, 1e-5),
                layers.add_rms_norm_reference(x, res, weight, 1e-5),
            )
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for heads, dim in ((9, 64), (3, 16)):
        qkv = torch.randn(rows, (heads + 2) * dim, generator=g)  # rows are strided, as in the model
        x = qkv[:, : heads * dim].view(rows, heads, dim)
        angles = torch.randn(rows, dim // 2, generator=g).repeat(1, 2)
        want = layers.rope_reference(x.clone(), angles.cos(), angles.sin())
        got = cpu_kernels.rope_(x, angles.cos(), angles.sin())
        assert got.data_ptr() == qkv.data_ptr()  # in place
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    gate_up = torch.randn(rows, 2 * 1536, generator=g) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(cpu_kernels.silu_mul(gate_up), torch.nn.functional.silu(gate) * up, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.int8])
def test_prefill_attention_reads_a_spans_own_keys_from_the_activations(kv_dtype):
    """With `fresh` (a ring stores a prompt's K/V only after attending), the Triton prefill attention reads each
    span's prefix from the pages and its own keys from `fresh`, as the reference does; the pages' copies of
    those keys (garbage here) are not read."""
    page_size, kv_heads, group, dim = 16, 2, 3, 64
    spans = [(1, 2), (9, 9), (20, 2 * page_size + 7), (16, 40)]
    cache, meta, n = _step(spans, page_size, kv_heads, dim, kv_dtype, seed=8)
    g = torch.Generator().manual_seed(8)
    q = torch.randn(n, kv_heads * group, dim, generator=g).to(DEVICE)
    fresh = torch.randn(n, 2, kv_heads, dim, generator=g).to(DEVICE)
    for window in (0, 7):
        want = torch.zeros_like(q)
        reference.prefill_attention(q, cache, 1, meta, dim**-0.5, want, window, fresh)
        got = torch.zeros_like(q)
        triton_attention.prefill_attention(q, cache, 1, meta, dim**-0.5, got, window=window, fresh=fresh)
        nd = meta.num_decode
        torch.testing.assert_close(got[nd:], want[nd:], atol=TOLERANCE[torch.float32], rtol=TOLERANCE[torch.float32])
        stale = torch.zeros_like(q)
        triton_attention.prefill_attention(q, cache, 1, meta, dim**-0.5, stale, window=window)
        assert not torch.allclose(stale[nd:], want[nd:])  # the pages hold other keys: `fresh` was read
