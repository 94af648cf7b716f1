"""The two OpenAI response shapes, `/v1/completions` and `/v1/chat/completions`: a whole answer's choices, a
stream's chunks (server-sent events), and logprobs. `app._Answer` collects each choice's text, logprobs and
token ids; a shape turns them into JSON and changes nothing else."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec

from splitserve.engine.params import TokenLogprob

_json = msgspec.json.Encoder()


# Characters JSON leaves raw that line readers built on str.splitlines() (httpx's, Python's) take for line ends:
# escaped, an event's data stays on one line for every client (SSE itself splits only at CR and LF).
_LINE_BREAKS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def sse(payload: dict[str, Any]) -> bytes:
    """One server-sent event carrying `payload` as JSON, on one line."""
    data = _json.encode(payload)
    for raw, escaped in _LINE_BREAKS:
        if raw in data:
            data = data.replace(raw, escaped)
    return b"data: " + data + b"\n\n"


class _Shape:
    """What both shapes share: the envelope (id, object, created, model), chunk framing and usage."""

    ID_PREFIX = ""
    OBJECT_WHOLE = OBJECT_CHUNK = ""

    def __init__(self, model: str, decode: Callable[[list[int]], str], wants_logprobs: bool, token_ids: bool):
        self.model, self.decode = model, decode
        self.wants_logprobs = wants_logprobs  # the request asked for logprobs
        self.token_ids = token_ids  # the request asked for each choice's token ids (vLLM's return_token_ids)
        self.id = f"{self.ID_PREFIX}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def envelope(self, whole: bool = False) -> dict[str, Any]:
        kind = self.OBJECT_WHOLE if whole else self.OBJECT_CHUNK
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def chunk(self, choice: dict[str, Any], include_usage: bool) -> bytes:
        choice = {"logprobs": None, "finish_reason": None, **choice}
        payload = {**self.envelope(), "choices": [choice]}
        if include_usage:
            payload["usage"] = None
        return sse(payload)

    def usage_chunk(self, usage: dict[str, int]) -> bytes:
        return sse({**self.envelope(), "choices": [], "usage": usage})

    def whole_choice(self, index: int, text: str, finish: str | None, logprobs: dict | None,
                     token_ids: list[int], tool_calls: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
        entry: dict[str, Any] = {"index": index, "finish_reason": finish, **self._content(text, tool_calls),
                                 "logprobs": logprobs}  # fmt: skip
        if self.token_ids:
            entry["token_ids"] = token_ids
        return entry

    def piece(self, index: int, text: str, logprobs: dict | None, finish: str | None, token_id: int,
              tool_calls: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
        """A stream chunk's choice: the text (and pieces of tool calls) one token released."""
        entry = {**self._delta(text, tool_calls), "index": index, "logprobs": logprobs, "finish_reason": finish}
        if self.token_ids:
            entry["token_ids"] = [token_id]
        return entry

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        token = self.decode([token_id])
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    def _content(self, text: str, tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    def _delta(self, text: str, tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError


class CompletionShape(_Shape):
    ID_PREFIX = "cmpl"
    OBJECT_WHOLE = OBJECT_CHUNK = "text_completion"

    def opening(self, index: int, echo: str) -> dict[str, Any] | None:
        """The choice's first chunk before any token: the echoed prompt, if asked for."""
        return {"index": index, "text": echo} if echo else None

    def logprobs(self, logprobs: list[TokenLogprob], text_offset: int) -> tuple[dict[str, Any], int]:
        """The legacy completions logprobs, and the text offset after these tokens."""
        tokens = [self.decode([lp.token_id]) for lp in logprobs]
        offsets = []
        for token in tokens:
            offsets.append(text_offset)
            text_offset += len(token)
        top = [{self.decode([t]): v for t, v in lp.top} for lp in logprobs]
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs], "top_logprobs": top,
                "text_offset": offsets}, text_offset  # fmt: skip

    def _content(self, text: str, tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
        return {"text": text}

    def _delta(self, text: str, tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
        return {"text": text}


class ChatShape(_Shape):
    ID_PREFIX = "chatcmpl"
    OBJECT_WHOLE, OBJECT_CHUNK = "chat.completion", "chat.completion.chunk"

    def opening(self, index: int, echo: str) -> dict[str, Any] | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}}

    def logprobs(self, logprobs: list[TokenLogprob], text_offset: int) -> tuple[dict[str, Any], int]:
        content = [{**self._entry(lp.token_id, lp.logprob), "top_logprobs": [self._entry(t, v) for t, v in lp.top]}
                   for lp in logprobs]  # fmt: skip
        return {"content": content}, text_offset

    def _content(self, text: str, tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
        message = {"role": "assistant", "content": text if text or not tool_calls else None}
        return {"message": {**message, "tool_calls": tool_calls} if tool_calls else message}

    def _delta(self, text: str, tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
        delta = {"content": text} if text else {}
        return {"delta": {**delta, "tool_calls": tool_calls} if tool_calls else delta}
