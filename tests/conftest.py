"""Shared fixtures: tiny random checkpoints, the default model, Hugging Face references, and the page-leak check."""

from __future__ import annotations

import os

# Triton kernels run on the CPU through the interpreter; it must be on before any kernel is defined.
os.environ.setdefault("TRITON_INTERPRET", "1")

import weakref
from pathlib import Path

import pytest

from splitserve.engine.kv_cache import PageAllocator
from splitserve.model.checkpoint import resolve_model
from tests import checkpoints

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


def _tiny_checkpoint(name: str):
    def fixture(tmp_path_factory) -> Path:
        return getattr(checkpoints, name)(tmp_path_factory.mktemp(name.replace("_", "-")))

    fixture.__doc__ = getattr(checkpoints, name).__doc__
    return pytest.fixture(scope="session", name=name)(fixture)


# A session fixture per tiny random checkpoint (tests/checkpoints.py): tiny_llama_gqa, tiny_qwen2, ...
for _name in checkpoints.TINY_MODELS:
    globals()[_name] = _tiny_checkpoint(_name)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The embedded default model, converted from its GGUF file (cached across runs)."""
    return resolve_model(None)


@pytest.fixture(scope="session")
def tiny_chat_llama(tmp_path_factory, smollm2) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template (its vocabulary size), for serving text."""
    return checkpoints.tiny_chat_llama(tmp_path_factory.mktemp("tiny-chat-llama"), smollm2)


@pytest.fixture(scope="session")
def tiny_chat_gemma3(tmp_path_factory, smollm2) -> Path:
    """tiny_gemma3 (window 8) with SmolLM2's tokenizer and chat template (its vocabulary size), for serving it."""
    folder = checkpoints.tiny_gemma3(tmp_path_factory.mktemp("tiny-chat-gemma3"), vocab_size=49152, eos_token_id=2)
    return checkpoints.with_tokenizer(folder, smollm2)
