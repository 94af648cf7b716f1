"""What a step's attention needs to know: where each new token's K/V goes and what each query sees."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from splitserve.kernels import kv_format


@dataclass
class PrefillSpan:
    """One sequence's prefill chunk: rows [query_start, query_start+query_len) of the batch."""

    query_start: int
    query_len: int
    context_len: int  # prefix in pages + this chunk
    page_ids: torch.Tensor  # [ceil(context_len / page_size)] pages holding the context, in order
    causal_mask: torch.Tensor | None  # [query_len, context_len] bool, None when there is no prefix


@dataclass
class PagedAttentionMetadata:
    """Where each token of the flat batch writes its K/V and what each query attends to."""

    slot_pages: torch.Tensor  # [num_tokens] page of each new token's K/V
    slot_offsets: torch.Tensor  # [num_tokens] offset within that page
    num_decode: int  # rows [0, num_decode) are decode queries
    decode_page_table: torch.Tensor  # [num_decode, max_pages] (padding entries point at any page)
    decode_context_lens: torch.Tensor  # [num_decode] tokens each decode query attends to
    decode_mask: torch.Tensor  # [num_decode, 1, 1, max_pages * page_size] bool, True = attend
    prefills: list[PrefillSpan]
    # A ring of pages (engine/kv_layout.py) with prefill rows in the step: those rows' K/V are stored only after
    # attending (their queries read their own keys from the activations), and only their span's last window:
    # the page each token's K/V goes to then (the null page for decode rows and the rest). `slot_pages` holds the
    # decode rows' pages and the null page for prefill rows.
    ring_writes: torch.Tensor | None = None

    @cached_property
    def kv_runs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The new tokens' slots as runs within one page (`kv_format.segments`), for an int8 cache's writes:
        built once per step."""
        return kv_format.segments(self.slot_pages, self.slot_offsets)

    @cached_property
    def prefill_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prefill spans as device arrays (query starts, query lengths, context lengths, padded page
        table), built once per step for the kernels that want them."""
        spans, device = self.prefills, self.slot_pages.device
        starts = torch.tensor([s.query_start for s in spans], dtype=torch.int32, device=device)
        q_lens = torch.tensor([s.query_len for s in spans], dtype=torch.int32, device=device)
        contexts = torch.tensor([s.context_len for s in spans], dtype=torch.int32, device=device)
        table = torch.zeros(len(spans), max(len(s.page_ids) for s in spans), dtype=torch.long, device=device)
        for i, s in enumerate(spans):
            table[i, : len(s.page_ids)] = s.page_ids
        return starts, q_lens, contexts, table

    @cached_property
    def row_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every query row's page table and context length (`[num_tokens, max_pages]`, `[num_tokens]`): the decode
        rows', then each prefill row's as if it were a decode row at its position (its span's pages, the keys up
        to its own). The CPU's native attention reads every row this way, so a token's attention is the same
        arithmetic whether it is computed in a decode step or in a prompt chunk of any size. Built once per
        step."""
        nd, device = self.num_decode, self.slot_pages.device
        width = max([self.decode_page_table.shape[1], *(len(s.page_ids) for s in self.prefills)])
        n = nd + sum(s.query_len for s in self.prefills)
        table = torch.zeros(n, width, dtype=torch.long, device=device)
        lens = torch.empty(n, dtype=torch.long, device=device)
        table[:nd, : self.decode_page_table.shape[1]] = self.decode_page_table
        lens[:nd] = self.decode_context_lens
        for s in self.prefills:
            rows = slice(s.query_start, s.query_start + s.query_len)
            table[rows, : len(s.page_ids)] = s.page_ids
            torch.arange(s.context_len - s.query_len + 1, s.context_len + 1, out=lens[rows])
        return table, lens
