"""Incremental detokenization: the text each new token adds, for streaming.

Decoding token by token breaks on multi-byte characters split across tokens and on tokenizers that
drop a word's leading space when it is decoded alone. So each step decodes a short window ending at the
new token and emits what it adds to the window's text, holding back an incomplete character.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

# How many already-emitted tokens give the new one its context.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], skip_special_tokens=True):
        # A fast tokenizer's own decoder, where transformers' would add nothing (no clean-up of spaces): a third
        # of the time, twice a token (the router's busiest code at a thousand streams).
        backend = getattr(tokenizer, "backend_tokenizer", None)
        cleans = getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._decode = backend.decode if backend is not None and not cleans else tokenizer.decode
        self._skip = skip_special_tokens
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix = len(self._ids)  # window start: text before it has been emitted
        self._read = len(self._ids)  # tokens up to here have been emitted

    def push(self, token_id: int) -> str:
        """Add one generated token; return the new text it completes (possibly empty)."""
        self._ids.append(token_id)
        decode = self._decode
        prefix_text = decode(self._ids[self._prefix : self._read], skip_special_tokens=self._skip)
        full_text = decode(self._ids[self._prefix :], skip_special_tokens=self._skip)
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        self._prefix, self._read = max(self._read - 1, 0), len(self._ids)
        # Keep the window short: drop tokens that can no longer change how the next ones decode.
        if self._prefix > _CONTEXT_TOKENS:
            cut = self._prefix - _CONTEXT_TOKENS
            del self._ids[:cut]
            self._prefix -= cut
            self._read -= cut
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """The request is over: the text still held back (an incomplete character decodes as U+FFFD)."""
        if self._read == len(self._ids):
            return ""
        decode = self._decode
        prefix_text = decode(self._ids[self._prefix : self._read], skip_special_tokens=self._skip)
        full_text = decode(self._ids[self._prefix :], skip_special_tokens=self._skip)
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text) :]
