"""`RequestPages`: what both schedulers do with a request's pages, over the `PageAllocator`: take its first
pages (reusing the longest cached prefix of its tokens), grow them, offer each page to the prefix cache once
its KV is computed, and give them back when the request ends (kept a while for its conversation's next turn).

The schedulers decide when; this decides how, so the prefill and the decode pool cache alike.
"""

from __future__ import annotations

from splitserve.engine.kv_cache import PageAllocator
from splitserve.engine.kv_layout import KVLayout
from splitserve.engine.kv_offload import OffloadTier
from splitserve.engine.prefix_cache import extend_hashes, reusable_pages
from splitserve.engine.request import Request


class RequestPages:
    def __init__(self, allocator: PageAllocator, page_size: int, root_hash: int, cache_ttl_s: float,
                 offload: OffloadTier | None = None, layout: KVLayout | None = None):  # fmt: skip
        """`offload`: the tier cached pages go to when the pool overwrites them, and come back from. `layout`:
        how many pages a request's positions take (default: a page per `page_size` positions)."""
        self.allocator = allocator
        self.layout = layout
        self.page_size = page_size
        self.root_hash = root_hash
        self.cache_ttl_s = cache_ttl_s
        self.offload = offload
        if offload is not None:
            allocator.on_evict = offload.store
            offload.on_drop = allocator.offload_dropped

    def admit(self, request: Request, max_tokens: int, whole_prompt: bool = False) -> int | None:
        """First pages for a request that holds none: its cached prefix (pages in the pool, then pages the
        offload tier copies back), then new pages for its next `max_tokens` tokens (for all its tokens when
        `whole_prompt`). Returns how many tokens are left to compute in this step (at most `max_tokens`), or
        None (and no change) when too few pages are free."""
        assert not request.pages and request.num_computed_tokens == 0
        ps = self.page_size
        hits: list[int] = []
        offloaded = 0
        if self.allocator.prefix_caching:
            limit = reusable_pages(request.num_tokens, ps)
            extend_hashes(request.page_hashes, request.token_ids, ps, self.root_hash, limit)
            hits = self.allocator.cached_prefix(request.page_hashes[:limit])
            if self.offload is not None:
                offloaded = self.offload.prefix(request.page_hashes[len(hits) : limit])
        n = min(request.num_tokens - (len(hits) + offloaded) * ps, max_tokens)
        end = request.num_tokens if whole_prompt else (len(hits) + offloaded) * ps + n
        needed = self._pages_for(end) - len(hits)
        if not self.allocator.can_allocate(needed, hits):
            return None
        request.pages = self.allocator.allocate(needed, reuse=hits)
        # Copy the offloaded pages back (the allocation may have pushed some of them out: those are computed).
        loaded = len(hits)
        while loaded < len(hits) + offloaded and self.offload.load(request.page_hashes[loaded], request.pages[loaded]):
            self.allocator.register(request.pages[loaded], request.page_hashes[loaded])
            loaded += 1
        cached = loaded * ps
        n = min(request.num_tokens - cached, max_tokens)
        request.num_computed_tokens = request.num_cached_tokens = cached
        request.num_registered_pages = loaded
        stats = self.allocator.stats
        stats.queries += request.num_tokens
        stats.hits += cached
        return n

    def grow(self, request: Request, num_tokens: int) -> bool:
        """Make `request` hold pages for `num_tokens` tokens; False (and no change) if too few are free."""
        needed = self._pages_for(num_tokens) - len(request.pages)
        if needed <= 0:
            return True
        if not self.allocator.can_allocate(needed):
            return False
        request.pages.extend(self.allocator.allocate(needed))
        return True

    def _pages_for(self, num_tokens: int) -> int:
        logical = -(-num_tokens // self.page_size)
        return self.layout.num_pages(logical) if self.layout is not None else logical

    def cache_computed(self, request: Request) -> None:
        """Offer the request's pages that are now full of computed KV to the prefix cache."""
        full = request.num_computed_tokens // self.page_size
        if full <= request.num_registered_pages or not self.allocator.prefix_caching:
            return
        extend_hashes(request.page_hashes, request.token_ids, self.page_size, self.root_hash, full)
        for i in range(request.num_registered_pages, full):
            self.allocator.register(request.pages[i], request.page_hashes[i])
        request.num_registered_pages = full

    def release(self, request: Request) -> None:
        """Give the request's pages back. A request of a conversation that ended well leaves its cached
        pages retained for the conversation's next turn."""
        if request.cache_key is not None and request.finish_reason in ("stop", "length", None):
            self.allocator.retain(request.cache_key, request.pages[: request.num_registered_pages], self.cache_ttl_s)
        self._free(request)

    def preempted(self, request: Request) -> None:
        """Give a preempted request's pages back; it will be recomputed from its tokens (and hit its own
        cached pages then, if they survive)."""
        self._free(request)
        request.num_computed_tokens = 0

    def _free(self, request: Request) -> None:
        self.allocator.free(request.pages)
        request.pages = []
        request.num_registered_pages = 0
