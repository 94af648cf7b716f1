"""Attention kernels on CUDA: achieved bandwidth of paged decode attention and TFLOP/s of prefill
attention, next to PyTorch's scaled_dot_product_attention on the same data laid out contiguously.

    python benchmarks/attention_kernels.py [--peak-gbps 3350] [--batches 1,8,32,128] [--contexts 512,...,8192]

Decode: bytes of K/V read per second (every sequence reads its whole context once), as a fraction of
the device's peak HBM bandwidth (guessed from its name, or --peak-gbps), and the speed-up over SDPA; both
timed as replays of a CUDA graph, as the engine's captured decode step runs them (launched from Python, a
small case times the launches: 0.11x SDPA at batch 1 and 512 tokens on an H200, 2026-12-04).
Prefill: causal attention over a ragged batch, FLOP/s counted as 4 * head_dim * heads * (visible keys).
Without CUDA it refuses, unless --cpu-smoke (tiny shapes under TRITON_INTERPRET=1, to check the script).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

PEAK_GBPS = {"H100 SXM": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H100": 3350, "H200": 4800, "A100": 2039}


def timed(fn, device: torch.device, graphed: bool = False) -> float:
    """Seconds per call: on CUDA the median of launches from Python, or with `graphed` the mean of replays of
    a CUDA graph of the call (what a captured decode step pays: no Python, no launch latency)."""
    if device.type == "cuda":
        import triton.testing

        if graphed:
            return triton.testing.do_bench_cudagraph(fn, rep=50) / 1000
        return triton.testing.do_bench(fn, warmup=10, rep=50) / 1000
    fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def decode_case(batch, context, heads, kv_heads, dim, page_size, dtype, device):
    from splitserve.kernels import triton_attention
    from splitserve.kernels.metadata import PagedAttentionMetadata

    pages_per_seq = math.ceil(context / page_size)
    num_pages = batch * pages_per_seq
    cache = torch.randn(num_pages, 1, 2, page_size, kv_heads, dim, dtype=dtype, device=device)
    table = torch.randperm(num_pages, device=device).view(batch, pages_per_seq)
    lens = torch.full((batch,), context, dtype=torch.long, device=device)
    meta = PagedAttentionMetadata(
        slot_pages=lens[:0], slot_offsets=lens[:0], num_decode=batch, decode_page_table=table,
        decode_context_lens=lens, decode_mask=torch.ones(batch, 1, 1, pages_per_seq * page_size, dtype=torch.bool,
                                                         device=device), prefills=[],
    )  # fmt: skip
    q = torch.randn(batch, heads, dim, dtype=dtype, device=device)
    scale = dim**-0.5
    # Graphed, both: the engine runs decode attention inside its captured step (engine/decode_graphs.py).
    t_triton = timed(lambda: triton_attention.decode_attention(q, cache, 0, meta, scale), device, graphed=True)
    # The same K/V, gathered once into contiguous [batch, kv_heads, context, dim] tensors.
    k = cache[table, 0, 0].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()
    v = cache[table, 0, 1].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()
    t_sdpa = timed(lambda: F.scaled_dot_product_attention(q.unsqueeze(2), k, v, scale=scale, enable_gqa=True), device,
                   graphed=True)  # fmt: skip
    kv_bytes = 2 * batch * context * kv_heads * dim * cache.element_size()
    return kv_bytes / t_triton / 1e9, kv_bytes / t_sdpa / 1e9


def prefill_case(lengths, heads, kv_heads, dim, page_size, dtype, device):
    from splitserve.kernels import triton_attention
    from splitserve.kernels.metadata import PagedAttentionMetadata, PrefillSpan

    spans, start, page = [], 0, 0
    for n in lengths:
        ids = torch.arange(page, page + math.ceil(n / page_size), device=device)
        spans.append(PrefillSpan(start, n, n, ids, None))
        start, page = start + n, page + len(ids)
    cache = torch.randn(page, 1, 2, page_size, kv_heads, dim, dtype=dtype, device=device)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    meta = PagedAttentionMetadata(empty, empty, 0, empty.view(0, 0), empty, empty.view(0, 1, 1, 0).bool(), spans)
    q = torch.randn(start, heads, dim, dtype=dtype, device=device)
    out = torch.empty_like(q)
    scale = dim**-0.5
    t_triton = timed(lambda: triton_attention.prefill_attention(q, cache, 0, meta, scale, out, block_m=64), device)
    ks = [cache[s.page_ids, 0, 0].flatten(0, 1)[: s.context_len].transpose(0, 1).unsqueeze(0) for s in spans]
    vs = [cache[s.page_ids, 0, 1].flatten(0, 1)[: s.context_len].transpose(0, 1).unsqueeze(0) for s in spans]
    qs = [q[s.query_start : s.query_start + s.query_len].transpose(0, 1).unsqueeze(0) for s in spans]

    def sdpa():
        for qi, ki, vi in zip(qs, ks, vs, strict=True):
            F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=True)

    t_sdpa = timed(sdpa, device)
    flops = sum(4 * dim * heads * n * (n + 1) / 2 for n in lengths)
    return flops / t_triton / 1e12, flops / t_sdpa / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--contexts", default="512,1024,2048,4096,8192")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--peak-gbps", type=float, default=None, help="peak memory bandwidth (default: by device name)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    args = ap.parse_args()

    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        device, dtype = torch.device("cpu"), torch.float32
        batches, contexts, prefill_lengths = [2], [40], [[17, 30]]
        peak = args.peak_gbps or 1.0
    else:
        if not torch.cuda.is_available():
            sys.exit("benchmarks/attention_kernels.py measures CUDA kernels and needs a CUDA device (or --cpu-smoke)")
        device, dtype = torch.device("cuda"), {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        batches = [int(b) for b in args.batches.split(",")]
        contexts = [int(c) for c in args.contexts.split(",")]
        prefill_lengths = [[512] * 8, [2048] * 4, [4096, 1024, 777, 3000], [8192]]
        name = torch.cuda.get_device_name()
        peak = args.peak_gbps or next((v for k, v in PEAK_GBPS.items() if k in name), 0.0)
        print(f"device {name}, peak {peak:.0f} GB/s, dtype {args.dtype}")
    shape = dict(heads=args.heads, kv_heads=args.kv_heads, dim=args.head_dim, page_size=args.page_size)

    print(f"\ndecode attention: {args.heads} heads / {args.kv_heads} KV heads, head_dim {args.head_dim}")
    print(f"{'batch':>6} {'context':>8} {'triton GB/s':>12} {'% of peak':>10} {'SDPA GB/s':>10} {'vs SDPA':>8}")
    for b in batches:
        for c in contexts:
            ours, sdpa = decode_case(b, c, dtype=dtype, device=device, **shape)
            pct = f"{ours / peak:.0%}" if peak else "?"
            print(f"{b:>6} {c:>8} {ours:>12.0f} {pct:>10} {sdpa:>10.0f} {ours / sdpa:>7.2f}x")

    print("\nprefill attention (causal, ragged)")
    print(f"{'prompt lengths':>28} {'triton TFLOP/s':>15} {'SDPA TFLOP/s':>13} {'ratio':>7}")
    for lengths in prefill_lengths:
        ours, sdpa = prefill_case(lengths, dtype=dtype, device=device, **shape)
        label = ",".join(map(str, lengths)) if len(lengths) <= 4 else f"{len(lengths)}x{lengths[0]}"
        print(f"{label:>28} {ours:>15.3f} {sdpa:>13.3f} {ours / sdpa:>6.2f}x")


if __name__ == "__main__":
    main()
