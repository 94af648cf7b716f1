"""The page allocator's reference counts and the KV cache's sizing from a memory budget."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import parse_memory_size
from splitserve.engine.kv_cache import PageAllocator, allocate_kv_cache, page_bytes
from splitserve.model.config import ModelConfig


def test_allocate_share_free_roundtrip():
    alloc = PageAllocator(4)
    a = alloc.allocate(3)
    assert len(set(a)) == 3 and alloc.num_free == 1
    alloc.share(a[:1])
    alloc.free(a)
    assert alloc.num_free == 3  # the shared page still has one owner
    alloc.free(a[:1])
    assert alloc.num_free == alloc.capacity == 4


def test_allocator_refuses_overdraw_and_double_free():
    alloc = PageAllocator(2)
    with pytest.raises(MemoryError):
        alloc.allocate(3)
    assert alloc.num_free == 2
    pages = alloc.allocate(1)
    alloc.free(pages)
    with pytest.raises(ValueError, match="freed twice"):
        alloc.free(pages)
    with pytest.raises(ValueError, match="free"):
        alloc.share(pages)


@pytest.mark.parametrize(
    ("text", "expected"), [("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("4096", 4096)]
)
def test_parse_memory_size(text, expected):
    assert parse_memory_size(text) == expected


def test_parse_memory_size_rejects_garbage():
    with pytest.raises(ValueError, match="not a memory size"):
        parse_memory_size("lots")


def test_cache_layout_is_page_major_and_sized_by_budget(tiny_llama_gqa):
    cfg = ModelConfig.from_pretrained(tiny_llama_gqa)
    per_page = page_bytes(cfg, 16, torch.bfloat16)
    cache = allocate_kv_cache(cfg, 16, 10 * per_page + per_page // 2, torch.bfloat16, torch.device("cpu"))
    assert cache.shape == (10, cfg.num_layers, 2, 16, cfg.num_kv_heads, cfg.head_dim)
    assert cache[3].is_contiguous() and cache[3].numel() * cache.element_size() == per_page
    with pytest.raises(ValueError, match="holds no page"):
        allocate_kv_cache(cfg, 16, per_page - 1, torch.bfloat16, torch.device("cpu"))


def test_a_workers_share_of_the_gpu_gives_its_kv_cache_what_the_weights_leave():
    """`--gpu-memory-fraction`: the KV cache gets the share less the weights and the activations' reserve; a
    share too small for the weights, and the flag off CUDA, are refused with what to do."""
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.kv_cache import ACTIVATION_RESERVE, kv_bytes_in_share

    gib = 2**30
    assert kv_bytes_in_share(80 * gib, 0.45, 16 * gib) == int(36 * gib) - 16 * gib - int(36 * gib * ACTIVATION_RESERVE)
    with pytest.raises(ValueError, match=r"--gpu-memory-fraction 0.2: its 16.0 GiB hold the weights \(16.0 GiB\)"):
        kv_bytes_in_share(80 * gib, 0.2, 16 * gib)
    with pytest.raises(ValueError, match="--gpu-memory-fraction is for CUDA devices, not cpu"):
        EngineConfig(device="cpu", gpu_memory_fraction=0.5)
    with pytest.raises(ValueError, match=r"gpu_memory_fraction must be in \(0, 1\]"):
        EngineConfig(device="cpu", gpu_memory_fraction=1.5)
