"""Shared fixtures: tiny random checkpoints, the default model, Hugging Face references, and the page-leak check."""

from __future__ import annotations

import os

# Triton kernels run on the CPU through the interpreter; it must be on before any kernel is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

import weakref
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, Qwen2ForCausalLM

from splitserve.engine.kv_cache import PageAllocator
from splitserve.model.checkpoint import resolve_model

# Every allocator ever built, so that the leak check sees those inside module-scoped engines too.
_allocators: weakref.WeakSet[PageAllocator] = weakref.WeakSet()
_original_init = PageAllocator.__init__


def _tracking_init(self: PageAllocator, *args, **kwargs) -> None:
    _original_init(self, *args, **kwargs)
    _allocators.add(self)


PageAllocator.__init__ = _tracking_init  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def no_leaked_pages():
    """After every test, every live allocator has all its pages free."""
    yield
    leaks = [(a.capacity, a.num_free) for a in _allocators if a.num_free != a.capacity]
    assert not leaks, f"KV pages leaked (capacity, free): {leaks}"


def _save_tiny(model_cls, config, folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    # Wider weights than the default init keep the logits apart, so greedy choices are not near-ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    model.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    return folder


COMMON = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    max_position_embeddings=256,
    eos_token_id=7,
    bos_token_id=1,
    pad_token_id=0,
)


@pytest.fixture(scope="session")
def tiny_llama_gqa(tmp_path_factory) -> Path:
    """Llama with grouped-query attention (4 query heads per KV head), tied embeddings."""
    from transformers import LlamaForCausalLM

    cfg = LlamaConfig(**COMMON, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    return _save_tiny(LlamaForCausalLM, cfg, tmp_path_factory.mktemp("tiny-llama-gqa"), seed=1)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """Qwen2 with q/k/v bias and GQA."""
    cfg = Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return _save_tiny(Qwen2ForCausalLM, cfg, tmp_path_factory.mktemp("tiny-qwen2"), seed=2)


@pytest.fixture(scope="session")
def tiny_llama_untied(tmp_path_factory) -> Path:
    """Llama with untied embeddings, multi-head attention and Llama-3 rope scaling."""
    from transformers import LlamaForCausalLM

    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    cfg = LlamaConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, rope_parameters=rope
    )
    return _save_tiny(LlamaForCausalLM, cfg, tmp_path_factory.mktemp("tiny-llama-untied"), seed=3)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The embedded default model, converted from its GGUF file (cached across runs)."""
    return resolve_model(None)


@pytest.fixture(scope="session")
def tiny_chat_llama(tmp_path_factory, smollm2) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template (its vocabulary size), for serving text."""
    import shutil

    from transformers import LlamaForCausalLM

    cfg = LlamaConfig(
        **{**COMMON, "vocab_size": 49152, "eos_token_id": 2, "max_position_embeddings": 512},
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    folder = _save_tiny(LlamaForCausalLM, cfg, tmp_path_factory.mktemp("tiny-chat-llama"), seed=4)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2 / name).exists():
            shutil.copy(smollm2 / name, folder / name)
    return folder
