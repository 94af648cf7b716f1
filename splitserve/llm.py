"""`LLM`: the offline Python API. Load a model once, then generate for many prompts with continuous batching."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from splitserve.decode.engine import DecodeEngine
from splitserve.engine.config import EngineConfig
from splitserve.engine.detokenizer import IncrementalDetokenizer
from splitserve.engine.params import SamplingParams, TokenLogprob
from splitserve.engine.request import EngineRequest
from splitserve.errors import InvalidRequestError
from splitserve.model.chat_templates import choose_chat_template
from splitserve.model.tokenizer import encode, encode_chat, load_tokenizer

log = logging.getLogger(__name__)

Prompt = str | list[int]
Message = dict[str, Any]


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length"
    text: str | None = None  # None when the model folder has no tokenizer


class LLM:
    """Generate from a Llama-family model (default: the embedded SmolLM2-135M-Instruct).

    Keyword arguments are `EngineConfig` fields: dtype, device, page_size, kv_cache_memory, max_num_seqs,
    max_num_batched_tokens, max_model_len. `chat_template`: a Jinja file for `chat` instead of the model's
    own (a model without one gets its family's built-in template where there is one: `model.chat_templates`).
    """

    def __init__(self, model: str | None = None, *, chat_template: str | None = None, **engine_options: Any):
        self.engine = DecodeEngine(EngineConfig(model=model, **engine_options))
        self.tokenizer = load_tokenizer(self.engine.model_path)
        self._chat_stop: tuple[int, ...] = ()  # a built-in chat template's end of turn
        if self.tokenizer is not None:
            template = choose_chat_template(self.tokenizer, self.engine.model_config.architecture, chat_template)
            log.info("%s", template.source)
            self._chat_stop = template.stop_token_ids
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, or token ids) at once; outputs come back in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        texts = [p if isinstance(p, str) else None for p in prompts]
        return self._run([self._encode(p) for p in prompts], texts, sampling_params, use_tqdm)

    def chat(
        self,
        conversations: list[Message] | Sequence[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate the assistant's next message for each conversation, with the model's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        encoded = [self._encode_chat(c) for c in conversations]
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(encoded)
        params = [self._for_chat(p) for p in params]
        return self._run([ids for _, ids in encoded], [text for text, _ in encoded], params, use_tqdm)

    def stream(self, prompt: Prompt | list[Message], sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Generate for one prompt (text, token ids, or a chat conversation), yielding text as it comes."""
        tokenizer = self._require_tokenizer()
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            ids = self._encode_chat(prompt)[1]
            sampling_params = self._for_chat(sampling_params or SamplingParams())
        else:
            ids = self._encode(prompt)
        self.engine.validate_prompt(ids)
        request_id = str(next(self._ids))
        self.engine.add_request(EngineRequest(request_id, ids, sampling_params or SamplingParams()))
        detokenizer = IncrementalDetokenizer(tokenizer, ids)
        finished = False
        try:
            while not finished:
                for update in self.engine.step():
                    if update.request_id == request_id:
                        finished = update.finish_reason is not None
                        text = detokenizer.push(update.token_id)
                        if finished:
                            text += detokenizer.flush()
                        if text:
                            yield text
        finally:
            if not finished:  # the caller stopped early: free the request's pages
                self.engine.abort(request_id)

    def _for_chat(self, params: SamplingParams) -> SamplingParams:
        """A chat answer's params: it also ends at a built-in template's end of turn."""
        return replace(params, stop_token_ids=params.stop_token_ids + self._chat_stop) if self._chat_stop else params

    def _encode_chat(self, conversation: list[Message]) -> tuple[str, list[int]]:
        return encode_chat(self._require_tokenizer(), conversation)

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return encode(self._require_tokenizer(), prompt)
        return list(prompt)

    def _require_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise InvalidRequestError(f"{self.engine.model_path} has no tokenizer: pass prompts as token ids")
        return self.tokenizer

    def _run(
        self,
        prompt_ids: list[list[int]],
        texts: list[str | None],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        use_tqdm: bool,
    ) -> list[RequestOutput]:
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompt_ids)
        if len(params) != len(prompt_ids):
            raise InvalidRequestError(f"{len(prompt_ids)} prompts but {len(params)} sampling params")
        for ids in prompt_ids:  # all or nothing: reject a bad batch before queueing any of it
            self.engine.validate_prompt(ids)

        outputs: dict[str, RequestOutput] = {}
        for ids, text in zip(prompt_ids, texts, strict=True):
            request_id = str(next(self._ids))
            outputs[request_id] = RequestOutput(request_id, text, ids)
        pending = set(outputs)
        try:
            for (request_id, out), p in zip(outputs.items(), params, strict=True):
                self.engine.add_request(EngineRequest(request_id, out.prompt_token_ids, p))
            with tqdm(total=len(outputs), desc="generating", unit="req", disable=not use_tqdm) as bar:
                while pending:
                    for update in self.engine.step():
                        out = outputs[update.request_id]
                        out.token_ids.append(update.token_id)
                        if update.logprob is not None:
                            out.logprobs.append(update.logprob)
                        if update.finish_reason is not None:
                            out.finish_reason = update.finish_reason
                            pending.discard(update.request_id)
                            bar.update(1)
        finally:
            for request_id in pending:  # interrupted: leave no request (and no page) behind
                self.engine.abort(request_id)
        if self.tokenizer is not None:
            for out in outputs.values():
                out.text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        return list(outputs.values())
