"""`EngineCore`: what every engine loads and checks, whichever pool it serves: the model's runner (weights, KV
cache tensor), the allocator that owns the cache's pages (and its prefix cache), and a new request's validation
against the model's limits (with its structured-output grammar, compiled on first use)."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import msgspec
import torch

from splitserve.engine.config import EngineConfig, parse_memory_size
from splitserve.engine.kv_cache import PageAllocator, TensorAllocator
from splitserve.engine.kv_offload import OffloadTier
from splitserve.engine.pages import RequestPages
from splitserve.engine.params import SamplingParams, check_params, check_prompt
from splitserve.engine.prefix_cache import root_hash
from splitserve.engine.request import Chunk, EngineRequest, Request, Sampled, SamplingFailed
from splitserve.engine.runner import ModelRunner
from splitserve.engine.structured import GrammarCompiler
from splitserve.errors import InvalidRequestError
from splitserve.kernels import kv_format
from splitserve.kv_transfer.messages import CompatKey
from splitserve.model.checkpoint import model_name, resolve_model
from splitserve.model.config import ModelConfig
from splitserve.model.tokenizer import load_tokenizer

_MIN_MEASURED_PROMPT_TOKENS = 32  # passes with fewer prompt tokens say more about decode rows and overhead

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(
        self, config: EngineConfig, kv_allocator: TensorAllocator | None = None, take_over: EngineCore | None = None,
        kv_share: float = 1.0,
    ):  # fmt: skip
        """`kv_allocator`: where the KV cache tensor's memory comes from (default: torch). `take_over`: an idle
        engine of the other pool whose weights, KV cache and cached pages this one takes (a worker switching
        roles in place); it must not be used afterwards. `kv_share`: of `--kv-cache-memory`, what the model's
        pages take (a draft model's take the rest)."""
        self.config = config
        if take_over is not None:
            if take_over.allocator.num_available != take_over.allocator.capacity:
                raise RuntimeError("an engine can take over only an idle engine's pages")
            self.model_path, self.model_config = take_over.model_path, take_over.model_config
            self.runner, self.allocator, self.pages = take_over.runner, take_over.allocator, take_over.pages
            self.max_model_len, self._grammars = take_over.max_model_len, take_over._grammars
            self.prefill_tokens_per_s, self.decode_step_s = take_over.prefill_tokens_per_s, take_over.decode_step_s
            return
        self.model_path = resolve_model(config.model)
        self.model_config = ModelConfig.from_pretrained(self.model_path)
        budget = config if kv_share == 1 else replace(config, kv_cache_memory=int(config.kv_cache_bytes * kv_share))
        self.runner = ModelRunner(self.model_config, self.model_path, budget, kv_allocator)
        self.max_model_len = self.runner.max_model_len
        layout = self.runner.kv_layout
        caching = config.prefix_caching and not layout.has_rings
        if config.prefix_caching and not caching:
            log.info("prefix caching off: the sliding-window layers' pages are rings, rewritten as requests go on")
        self.allocator = PageAllocator(self.runner.num_pages, caching)
        root = root_hash(msgspec.msgpack.encode(self.compat_key))
        offload = None
        memory, disk = parse_memory_size(config.kv_offload_memory), parse_memory_size(config.kv_offload_size)
        if caching and (memory or config.kv_offload_dir):
            offload = OffloadTier(kv_format.pages(self.runner.kv_cache), memory, config.kv_offload_dir, disk)
        self.pages = RequestPages(self.allocator, config.page_size, root, config.cache_ttl_s, offload, layout)
        self._grammars: GrammarCompiler | None = None
        self.prefill_tokens_per_s = 0.0  # measured prompt throughput (moving average); 0 until measured
        self.decode_step_s = 0.0  # measured time of a step of decode rows only (moving average)

    def execute(self, chunks: list[Chunk]) -> list[tuple[Request, Sampled | SamplingFailed]]:
        """One forward pass (the runner's), measuring prompt throughput on passes that are mostly prompt, and
        the step time of passes of decode rows only."""
        start = time.perf_counter()
        sampled = self.runner.execute(chunks)
        seconds = max(time.perf_counter() - start, 1e-6)
        prompt_tokens = sum(c.num_tokens for c in chunks if c.num_tokens > 1)
        if prompt_tokens >= _MIN_MEASURED_PROMPT_TOKENS:
            self.prefill_tokens_per_s = _average(self.prefill_tokens_per_s, prompt_tokens / seconds)
        elif not prompt_tokens:
            self.decode_step_s = _average(self.decode_step_s, seconds)
        return sampled

    @property
    def compat_key(self) -> CompatKey:
        """What another worker's pages must agree on to be valid here (and what names cached pages)."""
        cfg, layout = self.model_config, self.runner.kv_layout
        return CompatKey(
            model=model_name(self.config.model),
            dtype=str(self.config.torch_dtype).removeprefix("torch."),
            page_size=self.config.page_size,
            num_layers=cfg.num_layers,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            quantization=self.config.resolved_quantization,
            kv_dtype=str(self.config.torch_kv_dtype).removeprefix("torch."),
            # 0, 0 for a layout of one page group: what a peer from before layouts sends
            layers_per_page=layout.layers_per_page if layout.num_groups > 1 else 0,
            ring_pages=layout.ring_pages,
        )

    @property
    def numerics_differ(self) -> str | None:
        """Why a token computed in a prompt pass may differ in its last bits from the same token computed in a
        decode step or another batch (README, 'Modes'), or None where they are one numerics: the CPU's
        quantized-activation modes, every row through the native kernels."""
        config = self.config
        if config.torch_device.type != "cpu":
            return "on CUDA a prompt's rows and decode rows attend through different kernels"
        if config.resolved_quantization not in ("w4a8", "w8a8", "w8a7"):
            what = "weight-only int8" if config.resolved_quantization == "int8" else f"{config.resolved_dtype}"
            return f"{what} weights run through torch's GEMMs for some batches, which sum by batch size"
        if config.resolved_kv_dtype == "int8":
            return "an int8 KV cache's page scales grow with later tokens"
        if any(self.model_config.layer_windows):
            return "sliding-window layers' prompt rows attend through SDPA"
        return None

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        check_prompt(prompt_token_ids, self.max_model_len, self.model_config.vocab_size)

    def new_request(self, spec: EngineRequest) -> Request:
        """A request for this engine; InvalidRequestError when the model cannot serve it as given."""
        request_id, prompt_token_ids, params, cache_key, output_token_ids = spec
        self.validate_prompt([*prompt_token_ids, *output_token_ids])
        if len(output_token_ids) >= params.max_tokens:
            done, limit = len(output_token_ids), params.max_tokens
            raise InvalidRequestError(f"a request resumed after {done} tokens has none left of max_tokens {limit}")
        check_params(params, self.model_config.vocab_size)
        eos = frozenset(self.model_config.eos_token_ids)
        grammar = self.grammars.grammar(params.structured) if params.structured is not None else None
        if output_token_ids and self.numerics_differ:
            log.warning("request %s resumes after %d tokens; its next ones may differ from an undisturbed run's: %s",
                        request_id, len(output_token_ids), self.numerics_differ)  # fmt: skip
        return Request.create(request_id, prompt_token_ids, params, eos, grammar, cache_key, output_token_ids)

    def score(self, token_ids: list[int]) -> torch.Tensor:
        """fp32 logits `[len(token_ids), vocab]` predicting each next token (for quality checks and prompt
        logprobs); at most `max_num_batched_tokens` tokens."""
        self.validate_prompt(token_ids)
        if len(token_ids) > self.config.max_num_batched_tokens:
            raise InvalidRequestError(f"score at most {self.config.max_num_batched_tokens} tokens at once")
        request = Request.create("score", token_ids, SamplingParams(), frozenset())
        pages = self.runner.kv_layout.num_pages(-(-len(token_ids) // self.config.page_size))
        if not self.allocator.can_allocate(pages):
            raise InvalidRequestError(f"{len(token_ids)} tokens need {pages} free KV pages")
        request.pages = self.allocator.allocate(pages)
        try:
            return self.runner.prompt_logits(request)
        finally:
            self.allocator.free(request.pages)

    @property
    def grammars(self) -> GrammarCompiler:
        if self._grammars is None:
            tokenizer = load_tokenizer(self.model_path)
            if tokenizer is None:
                raise InvalidRequestError(
                    "response_format: this model has no tokenizer, so no structured output", "response_format"
                )
            cfg = self.model_config
            self._grammars = GrammarCompiler(tokenizer, cfg.vocab_size, sorted(cfg.eos_token_ids))
        return self._grammars


def _average(old: float, new: float) -> float:
    """A moving average of measurements (the first one alone)."""
    return new if old == 0 else 0.8 * old + 0.2 * new
