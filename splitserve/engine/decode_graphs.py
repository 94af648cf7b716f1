"""`DecodeGraphs`: a decode-only step over static input buffers, padded to a batch bucket, as one CUDA graph
per bucket (the GPU's decode step; nano-vllm's model runner shows the pattern).

On a GPU a decode step of a small batch costs more in Python and kernel launches than in arithmetic (13.7
ms per token for a 135M model whose weights take 0.06 ms to read). Here the step reads everything it needs
from buffers allocated once (token ids, positions, the slot of each new K/V, page tables, context lengths,
and the sampling parameters), runs the model, the LM head and the sampler with no host synchronisation, and
writes its tokens into an output buffer: a fixed sequence of kernels for a given batch size, which a CUDA
graph captures once and replays. A batch is padded to the next bucket (1, 2, 4, ... `max_num_seqs`): padding
rows decode token 0 at position 0 of the *null page*, a page outside the allocator's pool (the last of the
KV cache tensor), so they never write into a live page. Each step copies its inputs to the device in one
transfer and reads its tokens back in one.

Two graphs per bucket: greedy rows only (an argmax), and with sampled rows (`sampling.draw`, which sorts the
vocabulary). Rows that need the sampler's processors (penalties, logit bias, grammars, `min_tokens`) or
logprobs run the greedy graph and `sampling.sample` on its logits. Without CUDA (the CPU's tests) the same
step runs as a plain call.

A speculative step's verification is the same step: a request's last token and each drafted token after it
are rows of their own, each a decode row at its position (its context ends at itself; the rows' K/V are all
written before any row attends), so the graphs of the row buckets serve every draft length, and each drafted
token is scored by the same kernels as a token decoded alone. Its rows' logits go to `sampling.verify`. The
buckets reach `max_rows` (the batch limit plus the most drafted rows a step takes), with a bucket of exactly
the rows of 1, 2, ... requests with whole drafts among them (`extra_buckets`: a bucket per draft length).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from splitserve.engine.request import Chunk, Request, Sampled, SamplingFailed
from splitserve.engine.sampling import draw, plain, sample_chunks, uniforms
from splitserve.kernels.metadata import PagedAttentionMetadata
from splitserve.model.llama import CausalLM

log = logging.getLogger(__name__)

_INT_FIELDS = 6  # token id, position, slot page, slot offset, context length, top-k
_FLOAT_FIELDS = 3  # temperature, top-p, uniform draw


def batch_buckets(max_num_seqs: int) -> list[int]:
    """The padded batch sizes: powers of two below `max_num_seqs`, then `max_num_seqs` itself."""
    buckets = [1 << i for i in range(max(max_num_seqs - 1, 0).bit_length()) if 1 << i < max_num_seqs]
    return [*buckets, max_num_seqs]


class StepBuffers(NamedTuple):
    """One bucket's views of the static input buffers (field-major, so each field is contiguous): tensors on
    the device, numpy arrays over the pinned host copies."""

    input_ids: torch.Tensor  # [bucket]
    positions: torch.Tensor
    slot_pages: torch.Tensor
    slot_offsets: torch.Tensor
    context_lens: torch.Tensor
    top_k: torch.Tensor  # 0 for none
    page_table: torch.Tensor  # [bucket, max_pages_per_seq]
    temperature: torch.Tensor  # [bucket], 0 for greedy rows
    top_p: torch.Tensor  # inf for none
    uniform: torch.Tensor


class DecodeGraphs:
    def __init__(
        self, model: CausalLM, kv_cache: torch.Tensor, null_page: int, max_rows: int, max_pages_per_seq: int,
        extra_buckets: tuple[int, ...] = (),
    ):  # fmt: skip
        """`null_page`: a page of `kv_cache` that no request holds (padding rows write there). `max_rows`: the
        most rows of a step (its requests, and their drafted tokens); `extra_buckets`, step sizes to capture
        besides the powers of two (a verification's rows)."""
        self.model, self.kv_cache, self.null_page = model, kv_cache, null_page
        self.page_size = kv_cache.shape[3]
        self.max_pages = max_pages_per_seq
        self.buckets = sorted({*batch_buckets(max_rows), *(b for b in extra_buckets if b <= max_rows)})
        device, pinned = kv_cache.device, kv_cache.is_cuda
        ints = max_rows * (_INT_FIELDS + max_pages_per_seq)
        self._ints_host = torch.zeros(ints, dtype=torch.long, pin_memory=pinned)
        self._floats_host = torch.zeros(max_rows * _FLOAT_FIELDS, pin_memory=pinned)
        self._ints = torch.zeros(ints, dtype=torch.long, device=device)
        self._floats = torch.zeros(max_rows * _FLOAT_FIELDS, device=device)
        self._views = {b: self._buffers(b, self._ints, self._floats) for b in self.buckets}
        self._host_views = {
            b: self._buffers(b, self._ints_host.numpy(), self._floats_host.numpy()) for b in self.buckets
        }
        for views in (*self._views.values(), *self._host_views.values()):  # a valid step for every bucket
            self._pad(views, 0)
        self._token_range = torch.arange(max_pages_per_seq * self.page_size, device=device)
        self.logits = torch.zeros(max_rows, model.cfg.vocab_size, device=device)
        self.tokens = torch.zeros(max_rows, dtype=torch.long, device=device)
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}

    def _buffers(self, bucket: int, ints, floats) -> StepBuffers:
        fields = ints[: _INT_FIELDS * bucket].reshape(_INT_FIELDS, bucket)
        table = ints[_INT_FIELDS * bucket : (_INT_FIELDS + self.max_pages) * bucket].reshape(bucket, self.max_pages)
        return StepBuffers(*fields, table, *floats[: _FLOAT_FIELDS * bucket].reshape(_FLOAT_FIELDS, bucket))

    def _pad(self, views: StepBuffers, first: int) -> None:
        """Rows from `first` on: token 0 at position 0 of the null page, greedy."""
        padding = StepBuffers(0, 0, self.null_page, 0, 1, 0, self.null_page, 0.0, float("inf"), 0.0)
        for field, value in zip(views, padding, strict=True):
            field[first:] = value

    @torch.inference_mode()
    def forward(self, bucket: int, sampled: bool) -> None:
        """The step on the static buffers of `bucket` (what a graph captures): logits and tokens land in
        `self.logits` and `self.tokens`. No host synchronisation, no shape that depends on values."""
        b = self._views[bucket]
        attend = self._token_range[None, :] < b.context_lens[:, None]
        meta = PagedAttentionMetadata(
            slot_pages=b.slot_pages,
            slot_offsets=b.slot_offsets,
            num_decode=bucket,
            decode_page_table=b.page_table,
            decode_context_lens=b.context_lens,
            decode_mask=attend.view(bucket, 1, 1, -1),
            prefills=[],
        )
        logits = self.model.logits(self.model(b.input_ids, b.positions, self.kv_cache, meta))
        tokens = logits.argmax(dim=-1)
        if sampled:
            column = [t[:, None] for t in (b.temperature, b.top_k, b.top_p, b.uniform)]
            tokens = torch.where(b.temperature > 0, draw(logits, *column), tokens)
        self.logits[:bucket] = logits
        self.tokens[:bucket] = tokens

    def capture(self) -> None:
        """One CUDA graph per (bucket, sampling or not), the largest first, sharing one memory pool; each
        run once first (Triton compiles its kernels for the bucket's shapes then). Raises if a step cannot be
        captured (the caller falls back to eager steps)."""
        pool = None
        for bucket in reversed(self.buckets):
            for sampled in (False, True):
                self.forward(bucket, sampled)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.forward(bucket, sampled)
                pool = graph.pool()
                self._graphs[bucket, sampled] = graph
        torch.cuda.synchronize()

    def takes(self, chunks: list[Chunk]) -> bool:
        """Whether the step is one of these: every chunk a decoding request's last token (and its draft)."""
        rows = sum(c.rows for c in chunks)
        return rows <= self.buckets[-1] and all(c.num_tokens == 1 and c.completes for c in chunks)

    def run(self, chunks: list[Chunk]) -> list[tuple[Request, Sampled | SamplingFailed]]:
        """One decode step of `chunks` (each request with its next token's slot, and its draft's, in its pages):
        each request's tokens, as `sampling.sample_chunks` gives them."""
        requests = [c.request for c in chunks]
        n = sum(c.rows for c in chunks)
        bucket = next(b for b in self.buckets if b >= n)
        processed = n > len(chunks) or not all(map(plain, requests))
        sampled = not processed and any(not r.params.greedy for r in requests)
        self._fill(self._host_views[bucket], chunks, sampled)
        ints, floats = (_INT_FIELDS + self.max_pages) * bucket, _FLOAT_FIELDS * bucket
        self._ints[:ints].copy_(self._ints_host[:ints], non_blocking=True)
        self._floats[:floats].copy_(self._floats_host[:floats], non_blocking=True)
        graph = self._graphs.get((bucket, sampled))
        if graph is not None:
            graph.replay()
        else:
            self.forward(bucket, sampled)
        if processed:
            return sample_chunks(self.logits[:n].clone(), chunks)
        return [(r, Sampled(token, None)) for r, token in zip(requests, self.tokens[:n].tolist(), strict=True)]

    def _fill(self, host: StepBuffers, chunks: list[Chunk], sampled: bool) -> None:
        """The host copies of the step's inputs: a row per request and drafted token, then padding rows."""
        ps, vocab = self.page_size, self.logits.shape[1]
        rows = [(c.request, c.request.num_computed_tokens + j, token)
                for c in chunks for j, token in enumerate((c.request.token_ids[-1], *c.draft))]  # fmt: skip
        n = len(rows)
        host.input_ids[:n] = [token for _, _, token in rows]
        host.positions[:n] = [pos for _, pos, _ in rows]
        host.slot_pages[:n] = [r.pages[pos // ps] for r, pos, _ in rows]
        host.slot_offsets[:n] = [pos % ps for _, pos, _ in rows]
        host.context_lens[:n] = [pos + 1 for _, pos, _ in rows]
        host.page_table[:n] = self.null_page  # past a row's pages, entries must still be valid page ids
        for i, (r, pos, _) in enumerate(rows):
            host.page_table[i, : pos // ps + 1] = r.pages[: pos // ps + 1]
        params = [r.params for r, _, _ in rows]
        host.temperature[:n] = [0.0 if p.greedy else p.temperature for p in params]
        host.top_k[:n] = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
        host.top_p[:n] = [p.top_p if p.top_p < 1 else float("inf") for p in params]
        if sampled:  # (no drafts then: a row per request)
            host.uniform[:n] = uniforms([r for r, _, _ in rows])[:, 0].numpy()
        self._pad(host, n)
