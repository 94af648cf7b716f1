"""`ModelRunner`: owns the weights, the KV cache tensor and the step's input buffers, and turns a list of
scheduled chunks into one forward pass over pages plus one sampled token per finished chunk. On CUDA a step of
decode rows only replays a captured graph (`decode_graphs`) unless `--enforce-eager`."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from splitserve.engine.config import CPU_QUANTIZATIONS, GGUF_MODES, EngineConfig
from splitserve.engine.decode_graphs import DecodeGraphs
from splitserve.engine.kv_cache import TensorAllocator, allocate_kv_cache, kv_bytes_in_share
from splitserve.engine.kv_layout import KVLayout
from splitserve.engine.request import Chunk, Request, Sampled, SamplingFailed
from splitserve.engine.sampling import sample_chunks
from splitserve.engine.tensor_parallel import Followers, plan_of
from splitserve.kernels.attention import PagedAttentionMetadata, PrefillSpan
from splitserve.model.checkpoint import gguf_layer_types, iter_safetensors
from splitserve.model.config import ModelConfig
from splitserve.model.llama import CausalLM
from splitserve.model.parallel import TensorParallel

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        folder: Path,
        config: EngineConfig,
        kv_allocator: TensorAllocator | None,
        tp: TensorParallel | None = None,
    ):
        """`tp`: this process's rank in a tensor-parallel worker when it is not rank 0 (engine/tensor_parallel.py);
        rank 0 (any runner built without it) starts the others itself where `config.tensor_parallel` > 1."""
        self.model_config = model_config
        self._followers = None
        if tp is None and config.tensor_parallel > 1:
            TensorParallel(width=config.tensor_parallel).check(model_config)  # before any follower starts
            self._followers = Followers(config, folder, model_config)
            tp = self._followers.tp
        self.tp = tp or TensorParallel()
        self.device, self.dtype, self.page_size = config.torch_device, config.torch_dtype, config.page_size
        if config.gpu_memory_fraction is not None:  # the allocator refuses past the share (others use the rest)
            torch.cuda.set_per_process_memory_fraction(config.gpu_memory_fraction, self.device)
        self.model = CausalLM.load(model_config, iter_safetensors(folder), self.dtype, self.device, self.tp)
        bits = CPU_QUANTIZATIONS.get(config.resolved_quantization)
        if bits is not None:  # a 4-bit GGUF file's wider matrices keep 8 bits under w4a8; others' are asked for 4
            types = gguf_layer_types(config.model) or []
            keep_wider = any(GGUF_MODES.get(t) == "w4a8" for t in types)
            self.model.quantize(*bits, fused=not config.enforce_eager, keep_wider=keep_wider)
        elif config.resolved_quantization == "fp8":
            self.model.quantize_fp8()
        limit = min(config.max_model_len or model_config.max_position_embeddings, model_config.max_position_embeddings)
        self.kv_layout = KVLayout.for_model(model_config.layer_windows, model_config.num_layers, self.page_size, limit)
        self.model.place_kv(self.kv_layout.slots)
        kv_bytes = config.kv_cache_bytes
        if config.gpu_memory_fraction is not None:
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(self.device).total_memory
            kv_bytes = kv_bytes_in_share(total, config.gpu_memory_fraction, torch.cuda.memory_allocated(self.device))
            log.info("KV cache: %.2f GiB of this worker's %.0f%% of the device", kv_bytes / 2**30,
                     100 * config.gpu_memory_fraction)  # fmt: skip
        # One page past the budget is the null page: no request holds it; padded decode rows write there.
        self.kv_cache = allocate_kv_cache(
            self.model.cfg,  # this rank's KV heads
            self.page_size,
            kv_bytes,
            config.torch_kv_dtype,
            self.device,
            kv_allocator,
            spare_pages=1,
            layers_per_page=self.kv_layout.layers_per_page,
        )
        self.num_pages = self.null_page = self.kv_cache.shape[0] - 1
        # A request running alone must always fit, so the KV cache's capacity also caps the length.
        self.max_model_len = min(limit, self.kv_layout.max_logical(self.num_pages) * self.page_size)
        if self.max_model_len < limit:
            log.warning("KV cache holds %d tokens: max_model_len capped from %d", self.max_model_len, limit)

        # Step inputs live on the device in buffers allocated once and refilled each step.
        n, s = config.max_num_batched_tokens, config.max_num_seqs
        self.max_pages_per_seq = math.ceil(self.max_model_len / self.page_size)
        long = dict(dtype=torch.long, device=self.device)
        self._input_ids, self._positions = torch.zeros(n, **long), torch.zeros(n, **long)
        groups = self.kv_layout.num_groups
        self._slot_pages, self._slot_offsets = torch.zeros(groups, n, **long), torch.zeros(n, **long)
        self._decode_page_table = torch.zeros(groups, s, self.max_pages_per_seq, **long)
        self._decode_context_lens = torch.zeros(s, **long)
        self._token_range = torch.arange(self.max_pages_per_seq * self.page_size, **long)
        self.max_num_seqs = s
        # A decode step's rows: a token per request, and drafted ones (at most twice the draft length in all);
        # its graphs also fit the rows of 1, 2, ... speculating requests with whole drafts exactly.
        speculative, k = config.speculative != "off", config.num_speculative_tokens
        self.max_step_rows = s + (2 * k if speculative else 0)
        whole = range(1, config.speculative_max_batch + 1) if speculative else ()
        self.verify_buckets = tuple(m * (k + 1) for m in whole)
        self.decode_graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not config.enforce_eager:
            if self.tp.width > 1:
                log.info("decode steps run eagerly: no CUDA graphs across tensor-parallel ranks yet")
            elif not self.kv_layout.has_rings:
                self.use_decode_graphs(capture=True)
            else:
                log.info("decode steps run eagerly: the sliding-window layers' rings are page tables of their own")

    def use_decode_graphs(self, capture: bool) -> None:
        """Run decode-only steps through `DecodeGraphs`: captured as CUDA graphs (`capture`), or as plain calls
        of the same bucketed step (the CPU's tests). A capture that fails leaves the eager steps, with a warning.
        Not for a KV layout with rings: the step's buffers hold one page table, of a page per position."""
        if self.kv_layout.has_rings:
            raise ValueError("decode graphs need a KV layout without sliding-window rings")
        graphs = DecodeGraphs(self.model, self.kv_cache, self.null_page, self.max_step_rows, self.max_pages_per_seq,
                              self.verify_buckets)  # fmt: skip
        if capture:
            try:
                graphs.capture()
            except Exception as e:  # any failure to capture costs speed, never service
                log.warning("CUDA graph capture failed, decode steps run eagerly: %s: %s", type(e).__name__, e)
                return
        self.decode_graphs = graphs

    @torch.inference_mode()
    def execute(self, chunks: list[Chunk]) -> list[tuple[Request, Sampled | SamplingFailed]]:
        """Run the chunks' tokens through the model; sample for every chunk that completes its request: one
        token, or for a chunk with a draft the tokens `verify` keeps of it (the request's outcomes in order)."""
        if self.decode_graphs is not None and self.decode_graphs.takes(chunks):
            return self.decode_graphs.run(chunks)
        if self._followers is not None:  # the other ranks run the same pass on their slices
            self._followers.send(plan_of("execute", chunks))
        logits, finishing = self.forward(chunks)
        return sample_chunks(logits, finishing) if finishing else []

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk]) -> tuple[torch.Tensor | None, list[Chunk]]:
        """The pass of `execute`: the logits of the chunks that complete their requests (None if none does), and
        those chunks, in the order of the logits' rows."""
        # Decode rows (one query token) first: the attention batches them in one call.
        ordered = [c for c in chunks if c.rows == 1] + [c for c in chunks if c.rows > 1]
        meta, sample_rows = self._prepare(ordered)
        n = sum(c.rows for c in ordered)
        hidden = self.model(self._input_ids[:n], self._positions[:n], self.kv_cache, meta)
        finishing = [c for c in ordered if c.completes]
        if not finishing:
            return None, []
        return self.model.logits(hidden[torch.tensor(sample_rows, device=self.device)]), finishing

    def close(self) -> None:
        """Stop the other ranks of a tensor-parallel worker (they also die with this process)."""
        if self._followers is not None:
            self._followers.close()

    @torch.inference_mode()
    def prompt_logits(self, request: Request) -> torch.Tensor:
        """fp32 logits after every token of `request` (teacher forcing), in one forward pass; its pages must
        have room for all its tokens."""
        n = request.num_tokens
        if self._followers is not None:
            self._followers.send(plan_of("logits", [Chunk(request, n)]))
        meta, _ = self._prepare([Chunk(request, n)])
        return self.model.logits(self.model(self._input_ids[:n], self._positions[:n], self.kv_cache, meta))

    def _prepare(self, ordered: list[Chunk]) -> tuple[PagedAttentionMetadata | list[PagedAttentionMetadata], list[int]]:
        """The step's inputs into the device buffers, and its attention metadata: one per page group of the KV
        layout (a list when there are several)."""
        ps, layout = self.page_size, self.kv_layout
        groups = range(layout.num_groups)
        ids: list[int] = []
        positions: list[int] = []
        slot_pages: list[list[int]] = [[] for _ in groups]
        ring_writes: list[list[int]] = [[] for _ in groups]  # a ring group's prefill rows store after attending
        sample_rows: list[int] = []
        spans: list[tuple[int, int, int, torch.Tensor | None]] = []  # (row, query_len, context_len, mask)
        span_pages: list[list[list[int]]] = [[] for _ in groups]
        decode_pages: list[list[list[int]]] = [[] for _ in groups]
        decode_lens: list[int] = []
        for c in ordered:
            r, start = c.request, c.request.num_computed_tokens
            end = start + c.rows
            row = len(ids)
            ids.extend(r.token_ids[start : start + c.num_tokens])
            ids.extend(c.draft)
            positions.extend(range(start, end))
            tables = layout.tables(r.pages, math.ceil(end / ps))
            for g, table in enumerate(tables):
                if g < layout.num_full:
                    slot_pages[g].extend(table[p // ps] for p in range(start, end))
                elif c.rows == 1:
                    slot_pages[g].append(table[start // ps])
                    ring_writes[g].append(self.null_page)
                else:  # only the span's last window stays (kernels/attention.py, `attend`)
                    slot_pages[g].extend([self.null_page] * c.rows)
                    kept = end - layout.window + 1
                    ring_writes[g].extend(table[p // ps] if p >= kept else self.null_page for p in range(start, end))
            if c.completes:
                sample_rows.extend(range(row + c.num_tokens - 1, row + c.rows))
            if c.rows == 1:
                for g, table in enumerate(tables):
                    decode_pages[g].append(table)
                decode_lens.append(end)
            else:
                mask = None
                if start > 0:  # a later chunk: its queries also see the prefix already in pages
                    q_pos = torch.arange(start, end, device=self.device)
                    mask = self._token_range[:end].unsqueeze(0) <= q_pos.unsqueeze(1)
                spans.append((row, c.rows, end, mask))
                for g, table in enumerate(tables):
                    span_pages[g].append(table)

        n = len(ids)
        self._input_ids[:n].copy_(torch.tensor(ids))
        pos = torch.tensor(positions)
        self._positions[:n].copy_(pos)
        self._slot_offsets[:n].copy_(pos % ps)
        nd = len(decode_lens)
        max_pages = max((len(p) for p in decode_pages[0]), default=0)
        if nd:
            self._decode_context_lens[:nd].copy_(torch.tensor(decode_lens))
        mask = self._token_range[: max_pages * ps].unsqueeze(0) < self._decode_context_lens[:nd].unsqueeze(1)
        metas = []
        for g in groups:
            slots, table = self._slot_pages[g, :n], self._decode_page_table[g, :nd, :max_pages]
            slots.copy_(torch.tensor(slot_pages[g]))
            if nd:
                table.copy_(torch.tensor([p + [0] * (max_pages - len(p)) for p in decode_pages[g]]))
            prefills = [
                PrefillSpan(row, q_len, ctx, torch.tensor(pages, dtype=torch.long, device=self.device), span_mask)
                for (row, q_len, ctx, span_mask), pages in zip(spans, span_pages[g], strict=True)
            ]
            ring = g >= layout.num_full and spans
            metas.append(PagedAttentionMetadata(
                slot_pages=slots,
                slot_offsets=self._slot_offsets[:n],
                num_decode=nd,
                decode_page_table=table,
                decode_context_lens=self._decode_context_lens[:nd],
                decode_mask=mask.view(nd, 1, 1, max_pages * ps),
                prefills=prefills,
                ring_writes=torch.tensor(ring_writes[g], device=self.device) if ring else None,
            ))  # fmt: skip
        return (metas[0] if len(metas) == 1 else metas), sample_rows
