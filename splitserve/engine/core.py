"""`EngineCore`: what every engine loads and checks, whichever pool it serves: the model's runner (weights, KV
cache tensor), the allocator that owns the cache's pages, and prompt validation against the model's limits."""

from __future__ import annotations

from splitserve.engine.config import EngineConfig
from splitserve.engine.kv_cache import PageAllocator
from splitserve.engine.runner import ModelRunner
from splitserve.errors import InvalidRequestError
from splitserve.model.checkpoint import resolve_model
from splitserve.model.config import ModelConfig


class EngineCore:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_path = resolve_model(config.model)
        self.model_config = ModelConfig.from_pretrained(self.model_path)
        self.runner = ModelRunner(self.model_config, self.model_path, config)
        self.max_model_len = self.runner.max_model_len
        self.allocator = PageAllocator(self.runner.num_pages)

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_token_ids)} tokens; this model's context holds {self.max_model_len} "
                "(prompt and at least one generated token)"
            )
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
