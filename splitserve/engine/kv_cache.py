"""The paged KV cache: one page-major tensor per worker and the allocator that owns its pages.

Layout `[num_pages, layers_per_page, 2, page_size, num_kv_heads, head_dim]` (an int8 cache's blocks carry their
scales: `kernels/kv_format.py`): one page of one request is one contiguous region across its layers (all of
them, unless sliding-window layers keep pages of their own: `kv_layout.py`), so a page moves between workers as
a single copy.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from splitserve.kernels import kv_format
from splitserve.model.config import ModelConfig


def page_bytes(cfg: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
    """Bytes of one page: K and V of `page_size` tokens in every layer, as `dtype` stores them (`kv_format`)."""
    return kv_format.page_bytes(cfg.num_layers, page_size, cfg.num_kv_heads, cfg.head_dim, dtype)


# (shape, dtype, device) -> a zeroed tensor: where a page tensor's memory comes from, when not from torch
# (e.g. memory that kv_transfer shares with other processes).
TensorAllocator = Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]


# Of a worker's share of a device (`--gpu-memory-fraction`), what is kept for activations, CUDA graphs and the
# allocator's slack: the KV cache gets the rest after the weights.
ACTIVATION_RESERVE = 0.1


def kv_bytes_in_share(total: int, fraction: float, used: int) -> int:
    """The KV cache's bytes in a worker's share `fraction` of a device of `total` bytes, `used` of them taken
    (its weights): the share less those and the activations' reserve."""
    share = int(total * fraction)
    left = share - used - int(share * ACTIVATION_RESERVE)
    if left <= 0:
        raise ValueError(f"--gpu-memory-fraction {fraction}: its {share / 2**30:.1f} GiB hold the weights "
                         f"({used / 2**30:.1f} GiB) and the activations' reserve, and no KV cache")  # fmt: skip
    return left


def allocate_kv_cache(
    cfg: ModelConfig,
    page_size: int,
    memory_bytes: int,
    dtype: torch.dtype,
    device: torch.device,
    allocate: TensorAllocator | None = None,
    spare_pages: int = 0,
    layers_per_page: int | None = None,
) -> torch.Tensor:
    """The page tensor: as many pages of `layers_per_page` layers (default: every layer; `kv_layout`) as
    `memory_bytes` holds, then `spare_pages` more (outside the budget)."""
    layers = layers_per_page or cfg.num_layers
    size = kv_format.page_bytes(layers, page_size, cfg.num_kv_heads, cfg.head_dim, dtype)
    num_pages = memory_bytes // size
    if num_pages < 1:
        raise ValueError(f"a KV cache budget of {memory_bytes} bytes holds no page of {size} bytes")
    shape = (num_pages + spare_pages, layers, 2, page_size, cfg.num_kv_heads, cfg.head_dim)
    return kv_format.allocate(shape, dtype, device, allocate)


class PageAllocator:
    """Owns every reference to every page, and the prefix cache's index of them.

    A page is referenced by the requests whose KV it holds and by conversations kept for their next turn
    (`retain`). A page whose count drops to zero is free, but keeps its content: when it holds a full page
    of a known token prefix (`register`), a later request with the same prefix takes it back
    (`cached_prefix` + `allocate(reuse=...)`). Free pages are handed out least recently freed first, so a
    cached page is overwritten (evicted) only when no free page with older content is left.
    """

    def __init__(self, num_pages: int, prefix_caching: bool = True):
        self.capacity = num_pages
        self.prefix_caching = prefix_caching
        self._refcounts = [0] * num_pages
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_pages))  # oldest first
        self._page_of: dict[int, int] = {}  # page hash -> page holding that content
        self._hash_of: dict[int, int] = {}  # page -> its hash (registered pages only)
        self._retained: OrderedDict[str, tuple[list[int], float]] = OrderedDict()  # key -> (pages, until)
        self._retain_counts: Counter[int] = Counter()  # page -> how many conversations retain it
        self.stats = PrefixCacheStats()
        self.events = CacheEvents()
        # Called with (hash, page) for a cached page about to be overwritten: True when the offload tier kept a
        # copy (the worker still holds that content, so the router is not told it went).
        self.on_evict: Callable[[int, int], bool] | None = None

    @property
    def num_free(self) -> int:
        """Pages with no reference (cached content included: it is overwritten when they are taken)."""
        return len(self._free)

    @property
    def num_available(self) -> int:
        """Free pages, plus those only retained conversations hold (released when pages run short)."""
        return len(self._free) + sum(1 for p, n in self._retain_counts.items() if self._refcounts[p] == n)

    @property
    def num_cached(self) -> int:
        """Pages whose content a request with the same prefix would reuse."""
        return len(self._hash_of)

    @property
    def num_retained(self) -> int:
        return len(self._retain_counts)

    # --- taking and dropping references --------------------------------------------------------------

    def can_allocate(self, n: int, reuse: Sequence[int] = ()) -> bool:
        """Whether `allocate(n, reuse)` would succeed, releasing retained conversations (oldest first) if
        that is what it takes: a request never waits because pages are kept for a conversation."""
        needed = n + sum(1 for p in reuse if self._refcounts[p] == 0)
        while needed > len(self._free) and self._retained:
            self._release_retained(next(iter(self._retained)))
        return needed <= len(self._free)

    def allocate(self, n: int, reuse: Sequence[int] = ()) -> list[int]:
        """Take a reference to the cached pages `reuse` (from `cached_prefix`), then to `n` free pages;
        returns them all, `reuse` first. Raises if too few are free (check `can_allocate`)."""
        if not self.can_allocate(n, reuse):
            raise MemoryError(f"asked for {n} KV pages, {len(self._free)} free")
        for p in reuse:
            if self._refcounts[p] == 0:
                del self._free[p]
            self._refcounts[p] += 1
        pages = [self._free.popitem(last=False)[0] for _ in range(n)]
        for p in pages:
            self._refcounts[p] = 1
            self._forget(p)
        return [*reuse, *pages]

    def share(self, pages: list[int]) -> None:
        """Add a reference to pages already in use (a second owner of the same K/V)."""
        for p in pages:
            if self._refcounts[p] == 0:
                raise ValueError(f"page {p} is free and cannot be shared")
            self._refcounts[p] += 1

    def free(self, pages: list[int], stale: bool = False) -> None:
        """Drop one reference to each page; pages whose count reaches zero become free. A request's pages
        are given back last page first: its tail, the least likely to be shared, is overwritten first.
        `stale` pages (a conversation that outlived its TTL) are overwritten before any other."""
        for p in pages if stale else reversed(pages):  # either way, the tail is the next to go
            if self._refcounts[p] == 0:
                raise ValueError(f"page {p} freed twice")
            self._refcounts[p] -= 1
            if self._refcounts[p] == 0:
                self._free[p] = None
                if stale:
                    self._free.move_to_end(p, last=False)

    # --- the prefix cache ----------------------------------------------------------------------------

    def cached_prefix(self, hashes: list[int]) -> list[int]:
        """The pages holding the longest run of `hashes` (a prompt's page hashes, in order) from the start."""
        pages = []
        if self.prefix_caching:
            for h in hashes:
                p = self._page_of.get(h)
                if p is None:
                    break
                pages.append(p)
        return pages

    def register(self, page: int, page_hash: int) -> None:
        """`page` (in use) now holds the full page of tokens that `page_hash` names: reusable by others."""
        if not self.prefix_caching or page in self._hash_of or page_hash in self._page_of:
            return  # already known, or the same content already cached in another page
        self._page_of[page_hash], self._hash_of[page] = page, page_hash
        self.events.stored.append(page_hash)

    def _forget(self, page: int) -> None:
        page_hash = self._hash_of.pop(page, None)
        if page_hash is not None:
            kept = self.on_evict is not None and self.on_evict(page_hash, page)
            del self._page_of[page_hash]
            self.stats.evictions += 1
            if not kept:
                self.events.removed.append(page_hash)

    def offload_dropped(self, page_hash: int) -> None:
        """The offload tier let go of `page_hash`: unless the pool holds that content again, it is gone."""
        if page_hash not in self._page_of:
            self.events.removed.append(page_hash)

    # --- conversations kept between turns ------------------------------------------------------------

    def retain(self, key: str, pages: list[int], ttl_s: float) -> None:
        """Keep `pages` (in use) for `ttl_s` seconds after their request ends, for the conversation `key`'s
        next turn; replaces what `key` kept before."""
        if key in self._retained:
            self._release_retained(key)
        if ttl_s <= 0 or not pages:
            return
        self.share(pages)
        self._retain_counts.update(pages)
        self._retained[key] = (list(pages), time.monotonic() + ttl_s)

    def expire(self, now: float | None = None) -> None:
        """Release the conversations whose time to live has passed: their pages stay cached, but are the
        first free pages to be overwritten."""
        now = time.monotonic() if now is None else now
        while self._retained:
            key, (_, until) = next(iter(self._retained.items()))
            if until > now:
                break  # kept in order of expiry: every TTL is the same, and a new turn re-inserts its key
            self._release_retained(key)

    def _release_retained(self, key: str) -> None:
        pages, _ = self._retained.pop(key)
        for p in pages:
            self._retain_counts[p] -= 1
            if not self._retain_counts[p]:
                del self._retain_counts[p]
        self.free(pages, stale=True)


@dataclass
class PrefixCacheStats:
    """Counters, as vLLM names them: prompt tokens looked up, of those found cached, and cached pages
    overwritten."""

    queries: int = 0
    hits: int = 0
    evictions: int = 0


@dataclass
class CacheEvents:
    """Page hashes cached and evicted since the worker last told the router (drained by the worker)."""

    stored: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)

    def drain(self) -> tuple[list[int], list[int]]:
        stored, removed = self.stored, self.removed
        self.stored, self.removed = [], []
        return stored, removed
