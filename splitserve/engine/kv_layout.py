"""Which layers a KV page holds, and how a request's pages make each layer's page table: sliding-window layers
keep only the pages their window still reads.

A model whose layers all see the whole context (most) has one group: a page holds every layer, and a request's
pages are its page table. A model with sliding-window layers (Gemma 3's local layers, Mistral) splits its layers
into groups of `layers_per_page` layers, the full-context layers first, then the sliding ones (the last group
padded). A full group's pages hold every position of a request. A sliding group's pages form a ring of
`ring_pages` pages (logical page i lives in ring slot i % ring_pages): as many as a window spans, since a ring
only ever holds the last `window` positions (a pass's prompt rows attend over their own keys from the
activations and store only their last window after attending: `kernels/attention.py`). Gemma 3 270M (window
512, one global layer in six) at 16-token pages: past 528 tokens (33 pages) a request's five sliding groups
stop growing, and its KV grows at a sixth of the rate.

A request's pages are one list: for each logical page, its full groups' pages, then (while its rings still grow)
its sliding groups'. Every worker derives the same layout from the model and the page size (the compatibility
key carries it), so page lists move between workers as they are. A ring's page is
rewritten as the request moves on, so the prefix cache (and with it conversations kept between turns, the
offload tier, and streaming KV while a prompt is prefilled) does not apply to a layout with rings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class KVLayout:
    layers_per_page: int
    slots: tuple[tuple[int, int], ...]  # each layer's (group, index among the page's layers)
    num_full: int  # groups [0, num_full) hold every position; the others are rings
    num_groups: int
    ring_pages: int  # 0: no ring
    window: int = 0  # the sliding layers' (largest) window

    @classmethod
    def single(cls, num_layers: int) -> KVLayout:
        """Every layer in every page: the layout of a model without sliding windows."""
        return cls(num_layers, tuple((0, layer) for layer in range(num_layers)), 1, 1, 0)

    @classmethod
    def for_model(cls, windows: Sequence[int], num_layers: int, page_size: int, max_len: int) -> KVLayout:
        """The layout for layers with sliding `windows` (0 or () for none) and contexts of at most `max_len`
        tokens. One group when no layer slides, or when a ring would hold every page anyway."""
        sliding = [layer for layer in range(num_layers) if windows and windows[layer]]
        full = [layer for layer in range(num_layers) if layer not in sliding]
        window = max(windows or [0])
        ring = math.ceil((window - 1) / page_size) + 1  # the pages `window` consecutive positions can touch
        if not sliding or ring >= math.ceil(max_len / page_size):
            return cls.single(num_layers)
        per_page = len(full) or len(sliding)
        full_groups = math.ceil(len(full) / per_page)
        slots = {layer: (i // per_page, i % per_page) for i, layer in enumerate(full)}
        slots |= {layer: (full_groups + i // per_page, i % per_page) for i, layer in enumerate(sliding)}
        groups = full_groups + math.ceil(len(sliding) / per_page)
        return cls(per_page, tuple(slots[layer] for layer in range(num_layers)), full_groups, groups, ring, window)

    @property
    def has_rings(self) -> bool:
        return self.ring_pages > 0

    def num_pages(self, logical: int) -> int:
        """Pages a request holds for `logical` pages of positions."""
        rings = self.num_groups - self.num_full
        return logical * self.num_full + min(logical, self.ring_pages) * rings

    def max_logical(self, num_pages: int) -> int:
        """The most logical pages one request can hold with `num_pages` pages."""
        if not self.has_rings:
            return num_pages // self.num_full
        per = self.num_groups
        if num_pages < self.ring_pages * per:
            return num_pages // per
        if not self.num_full:
            return 1 << 40  # every group a ring (Mistral): once the rings fit, any length does
        return self.ring_pages + (num_pages - self.ring_pages * per) // self.num_full

    def _first(self, logical: int) -> int:
        """Where logical page `logical`'s pages start in a request's list."""
        if logical < self.ring_pages or not self.has_rings:
            return logical * self.num_groups
        return self.ring_pages * self.num_groups + (logical - self.ring_pages) * self.num_full

    def tables(self, pages: Sequence[int], logical: int) -> list[list[int]]:
        """Each group's page table for the first `logical` logical pages of a request holding `pages`."""
        if not self.has_rings:
            return [list(pages[:logical])]
        full = [[pages[self._first(i) + g] for i in range(logical)] for g in range(self.num_full)]
        rings = [
            [pages[self._first(i % self.ring_pages) + g] for i in range(logical)]
            for g in range(self.num_full, self.num_groups)
        ]
        return full + rings
