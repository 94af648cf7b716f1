"""Structured output (OpenAI's `response_format`): a grammar, compiled by xgrammar from a JSON schema, masks each
step's logits to the tokens that keep the output valid JSON of that schema.

`GrammarCompiler` is one per process (per tokenizer and vocabulary) and caches what it compiled; `Grammar` is one
request's matcher state. The decode worker of a disaggregated request rebuilds the matcher from the request's
parameters and replays the first token, which the prefill worker sampled under the same grammar.
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch
import xgrammar as xgr
from transformers import PreTrainedTokenizerBase

from splitserve.engine.params import StructuredOutput
from splitserve.errors import InvalidRequestError

# Compact JSON (no free whitespace): small models otherwise tend to loop on blank space.
_ANY_OBJECT = '{"type": "object"}'


class GrammarCompiler:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: list[int]):
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=True)
        self.vocab_size = vocab_size
        self._compile = lru_cache(maxsize=256)(self._compile_uncached)

    def compile(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        """The compiled grammar of `spec`; InvalidRequestError for a schema that cannot be one."""
        return self._compile(spec)

    def _compile_uncached(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        schema = _ANY_OBJECT if spec.kind == "json_object" else spec.schema
        try:
            if not isinstance(json.loads(schema), (dict, bool)):
                raise ValueError("a JSON schema is an object")
            return self._compiler.compile_json_schema(schema, any_whitespace=False)
        except Exception as e:  # xgrammar raises RuntimeError/ValueError with the reason
            raise InvalidRequestError(f"response_format: unusable JSON schema: {e}", param="response_format") from e

    def grammar(self, spec: StructuredOutput) -> Grammar:
        return Grammar(xgr.GrammarMatcher(self.compile(spec)), self.vocab_size)


class Grammar:
    """One request's place in its grammar: which tokens may come next."""

    def __init__(self, matcher: xgr.GrammarMatcher, vocab_size: int):
        self._matcher = matcher
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, row: torch.Tensor) -> None:
        """Set the logits of every token the grammar does not allow next to -inf (in place)."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        xgr.apply_token_bitmask_inplace(row.unsqueeze(0), self._bitmask.to(row.device))

    def accept(self, token_id: int) -> None:
        if not self._matcher.accept_token(token_id):
            raise InvalidRequestError(f"token {token_id} does not follow the request's grammar")

    def rollback(self, num_tokens: int) -> None:
        """Forget the last `num_tokens` accepted tokens (drafted ones, tried by the sampler)."""
        self._matcher.rollback(num_tokens)

    @property
    def complete(self) -> bool:
        """The output is a whole document of the grammar (its stop token was accepted)."""
        return self._matcher.is_terminated()
