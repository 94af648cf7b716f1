"""`EngineCore`: what every engine loads and checks, whichever pool it serves: the model's runner (weights, KV
cache tensor), the allocator that owns the cache's pages, and prompt validation against the model's limits."""

from __future__ import annotations

from splitserve.engine.config import EngineConfig
from splitserve.engine.kv_cache import PageAllocator, TensorAllocator
from splitserve.engine.request import check_prompt
from splitserve.engine.runner import ModelRunner
from splitserve.model.checkpoint import resolve_model
from splitserve.model.config import ModelConfig


class EngineCore:
    def __init__(self, config: EngineConfig, kv_allocator: TensorAllocator | None = None):
        """`kv_allocator`: where the KV cache tensor's memory comes from (default: torch)."""
        self.config = config
        self.model_path = resolve_model(config.model)
        self.model_config = ModelConfig.from_pretrained(self.model_path)
        self.runner = ModelRunner(self.model_config, self.model_path, config, kv_allocator)
        self.max_model_len = self.runner.max_model_len
        self.allocator = PageAllocator(self.runner.num_pages)

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        check_prompt(prompt_token_ids, self.max_model_len, self.model_config.vocab_size)
