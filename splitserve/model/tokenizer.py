"""The model's tokenizer and chat template, as the offline API and the router both use them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from splitserve.errors import InvalidRequestError


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase | None:
    """The folder's tokenizer, or None when it has none (prompts must then be token ids). A `tokenizer.json`
    loads as transformers' fast tokenizer class directly: `AutoTokenizer` (for the rest) imports torch, which
    the router never loads."""
    if (folder / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(folder)
    if not any((folder / name).exists() for name in ("tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def encode(tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool = True) -> list[int]:
    """`tokenizer(text).input_ids`, straight from the Rust tokenizer where there is one: the same ids (the same
    normalizer, pre-tokenizer, model and post-processor) without transformers' per-call Python around it, which
    was a tenth of the router's time per short request."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(text, add_special_tokens=add_special_tokens).input_ids
    return backend.encode(text, add_special_tokens=add_special_tokens).ids


def encode_chat(tokenizer: PreTrainedTokenizerBase, conversation: list[dict[str, Any]],
                tools: list[dict[str, Any]] | None = None) -> tuple[str, list[int]]:  # fmt: skip
    """The conversation (and the tools it may call, for a template that takes them) through the chat template,
    ready for the assistant's turn: (text, token ids)."""
    if tokenizer.chat_template is None:
        raise InvalidRequestError("this model has no chat template")
    try:
        text = tokenizer.apply_chat_template(conversation, tools=tools, tokenize=False, add_generation_prompt=True)
    except TemplateError as e:  # the template itself refuses the conversation (e.g. roles out of order)
        raise InvalidRequestError(f"messages: the model's chat template refused them: {e}", param="messages") from e
    # The template already holds the special tokens: do not let the tokenizer add another BOS.
    return text, encode(tokenizer, text, add_special_tokens=False)
