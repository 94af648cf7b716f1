"""The paged KV cache: one page-major tensor per worker and the allocator that owns its pages.

Layout `[num_pages, num_layers, 2, page_size, num_kv_heads, head_dim]`: one page of one request is one
contiguous region across all layers, so a page moves between workers as a single copy.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable

import torch

from splitserve.model.config import ModelConfig

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_memory_size(text: str | int) -> int:
    """'2GiB', '512MiB', '1.5GB' or a plain byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (examples: 2GiB, 512MiB, 1.5GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def page_bytes(cfg: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
    """Bytes of one page: K and V of `page_size` tokens in every layer."""
    return cfg.num_layers * 2 * page_size * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize


# (shape, dtype, device) -> a zeroed tensor: where a page tensor's memory comes from, when not from torch
# (e.g. memory that kv_transfer shares with other processes).
TensorAllocator = Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]


def allocate_kv_cache(
    cfg: ModelConfig,
    page_size: int,
    memory_bytes: int,
    dtype: torch.dtype,
    device: torch.device,
    allocate: TensorAllocator | None = None,
) -> torch.Tensor:
    num_pages = memory_bytes // page_bytes(cfg, page_size, dtype)
    if num_pages < 1:
        raise ValueError(
            f"a KV cache budget of {memory_bytes} bytes holds no page of {page_bytes(cfg, page_size, dtype)} bytes"
        )
    shape = (num_pages, cfg.num_layers, 2, page_size, cfg.num_kv_heads, cfg.head_dim)
    return allocate(shape, dtype, device) if allocate else torch.zeros(shape, dtype=dtype, device=device)


class PageAllocator:
    """Owns the reference count of every page. A page is free exactly when its count is zero."""

    def __init__(self, num_pages: int):
        self.capacity = num_pages
        self._refcounts = [0] * num_pages
        self._free: deque[int] = deque(range(num_pages))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take `n` free pages, each with reference count 1. Raises if fewer are free (check `num_free`)."""
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV pages, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(n)]
        for p in pages:
            self._refcounts[p] = 1
        return pages

    def share(self, pages: list[int]) -> None:
        """Add a reference to pages already in use (a second owner of the same K/V)."""
        for p in pages:
            if self._refcounts[p] == 0:
                raise ValueError(f"page {p} is free and cannot be shared")
            self._refcounts[p] += 1

    def free(self, pages: list[int]) -> None:
        """Drop one reference to each page; pages whose count reaches zero become free."""
        for p in pages:
            if self._refcounts[p] == 0:
                raise ValueError(f"page {p} freed twice")
            self._refcounts[p] -= 1
            if self._refcounts[p] == 0:
                self._free.append(p)
