"""`TextStream`: one request's output text as tokens arrive: incremental detokenization, and stop strings,
which end the request and never reach the client, even when they span tokens (text that could be the
start of a stop string is held back until the next token tells)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from splitserve.engine.detokenizer import IncrementalDetokenizer


class TextStream:
    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], stop: list[str], min_tokens: int = 0
    ):
        """Stop strings count only from the `min_tokens`-th token on (vLLM's rule)."""
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids)
        self._stop = stop
        self._min_tokens = min_tokens
        self._num_tokens = 0
        self._held = ""  # decoded text not released yet
        self.stopped = False  # a stop string was found: the request is over

    def push(self, token_id: int) -> str:
        """Add a token; returns the text that can be released now."""
        if self.stopped:
            return ""
        self._held += self._detokenizer.push(token_id)
        self._num_tokens += 1
        if not self._stop or self._num_tokens < self._min_tokens:
            text, self._held = self._held, ""
            return text
        hits = [i for i in (self._held.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            text, self._held = self._held[: min(hits)], ""
            return text
        keep = max((overlap(self._held, s) for s in self._stop), default=0)
        cut = len(self._held) - keep
        text, self._held = self._held[:cut], self._held[cut:]
        return text

    def flush(self) -> str:
        """The request ended without a stop string: release what was held back."""
        if self.stopped:
            return ""
        text, self._held = self._held + self._detokenizer.flush(), ""
        return text


def overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
