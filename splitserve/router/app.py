"""The router's HTTP face: OpenAI-compatible `/v1/completions` and `/v1/chat/completions` (streaming as
server-sent events, or whole), `/v1/models`, `/health` and `/metrics`.

Each request is validated (an OpenAI-shaped JSON error with a 4xx status otherwise), tokenized, and
submitted to the `Cluster`. The HTTP status is decided before the first byte: the handler waits for the
request's first token (or its error: queue full, no room in time) before it answers. After that an error
arrives as an `error` event in the stream. A client that goes away aborts its request everywhere.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import PreTrainedTokenizerBase

from splitserve.bench.metrics import SLO
from splitserve.engine.request import check_prompt
from splitserve.engine.sampling import SamplingParams, TokenLogprob
from splitserve.errors import InvalidRequestError
from splitserve.model.tokenizer import encode_chat
from splitserve.router.cluster import Cluster, ErrorEvent, Job, JobState, Overloaded, TokenEvent
from splitserve.router.metrics import RouterMetrics
from splitserve.router.openai_schema import ChatCompletionRequest, CompletionRequest
from splitserve.router.output import TextStream

MAX_BODY_BYTES = 4 * 1024 * 1024


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers


def _error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class RouterState:
    cluster: Cluster
    tokenizer: PreTrainedTokenizerBase
    vocab_size: int
    served_model: str
    api_key: str | None = None
    slo: SLO | None = None  # judged over a recent window, for operators (/health, /metrics)
    metrics: RouterMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = RouterMetrics(self.cluster, self.slo)


def create_app(state: RouterState, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    async def lifespan(app: FastAPI):
        await state.cluster.start()
        yield
        await state.cluster.stop()

    app = FastAPI(title="splitserve router", lifespan=lifespan)
    app.add_middleware(_BodyLimit, limit=max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        state.metrics.requests.labels("rejected").inc()
        return JSONResponse(_error_body(e.message, e.type, e.code, e.param), e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        state.metrics.requests.labels("rejected").inc()
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return JSONResponse(_error_body("; ".join(problems) or "invalid request", "invalid_request_error"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(_error_body(str(e.detail), type_), e.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return JSONResponse(_error_body(f"internal error: {type(e).__name__}", "server_error"), 500)

    async def authorized(request: Request) -> None:
        if state.api_key and request.headers.get("authorization") != f"Bearer {state.api_key}":
            raise APIError(401, "a valid API key is required (Authorization: Bearer KEY)", "authentication_error",
                           "invalid_api_key")  # fmt: skip

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        return await _serve(state, body, request)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await _serve(state, body, request)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        card = {"id": state.served_model, "object": "model", "created": 0, "owned_by": "splitserve",
                "max_model_len": state.cluster.max_model_len}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        snap = state.cluster.snapshot()
        if state.metrics.window is not None:
            snap["slo"] = state.metrics.window.snapshot()
        ok = state.cluster.can_serve()
        return JSONResponse({"status": "ok" if ok else "unavailable", **snap}, 200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


# --- one request -------------------------------------------------------------------------------------


async def _serve(state: RouterState, body: CompletionRequest | ChatCompletionRequest, request: Request) -> Response:
    chat = isinstance(body, ChatCompletionRequest)
    if body.model != state.served_model:
        raise APIError(404, f"the model `{body.model}` does not exist; this server serves `{state.served_model}`",
                       code="model_not_found", param="model")  # fmt: skip
    problem = body.unsupported()
    if problem:
        raise APIError(400, problem)
    try:
        prompt_ids = _prompt_ids(state, body)
        params = _sampling_params(state, body, prompt_ids)
    except InvalidRequestError as e:
        raise APIError(400, str(e), code=e.code, param=e.param) from e
    try:
        job = state.cluster.submit(prompt_ids, params)
    except Overloaded as e:
        type_ = "rate_limit_error" if e.status == 429 else "server_error"
        raise APIError(e.status, str(e), type_, headers={"Retry-After": str(e.retry_after_s)}) from e
    answer = _Answer(state, body, chat, job, prompt_ids)
    try:
        first = await _next_event(job, request)
        if first is None:  # the client left while the request waited
            state.cluster.abort(job)
            return Response(status_code=499)
        if isinstance(first, ErrorEvent):
            answer.count_error()
            headers = {"Retry-After": str(first.retry_after_s or 1)} if first.status in (429, 503) else None
            raise APIError(first.status, first.message, "server_error", headers=headers)
        if body.stream:
            return StreamingResponse(answer.stream(first), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        whole = await answer.whole(first, request)
        return Response(status_code=499) if whole is None else JSONResponse(whole)
    except BaseException:
        answer.abort()
        raise


def _prompt_ids(state: RouterState, body: CompletionRequest | ChatCompletionRequest) -> list[int]:
    if isinstance(body, ChatCompletionRequest):
        return encode_chat(state.tokenizer, [m.as_template_input() for m in body.messages])[1]
    prompt = body.single_prompt()
    return list(prompt) if not isinstance(prompt, str) else state.tokenizer(prompt).input_ids if prompt else []


def _sampling_params(state: RouterState, body, prompt_ids: list[int]) -> SamplingParams:
    limit = state.cluster.max_model_len
    if limit is None:
        raise APIError(503, "no workers can serve requests right now", "server_error", headers={"Retry-After": "5"})
    check_prompt(prompt_ids, limit, state.vocab_size)
    n = len(prompt_ids)
    chat = isinstance(body, ChatCompletionRequest)
    max_tokens = body.requested_max_tokens if chat else body.max_tokens
    if max_tokens is None:
        max_tokens = limit - n
    if n + max_tokens > limit:
        raise InvalidRequestError(
            f"the prompt ({n} tokens) plus max_tokens ({max_tokens}) exceeds this model's context of {limit} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return SamplingParams(  # validates the rest (max_tokens >= 1, temperature, top_p, top_k, logprobs)
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        ignore_eos=body.ignore_eos,
        logprobs=body.num_logprobs if chat else body.logprobs,
    )


async def _next_event(job: Job, request: Request) -> TokenEvent | ErrorEvent | None:
    """The job's next event; None when the client disconnected while waiting."""
    while True:
        try:
            return await asyncio.wait_for(job.next_event(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return None


class _Answer:
    """Turns a job's token events into the OpenAI response, whole or as a stream of chunks."""

    def __init__(self, state: RouterState, body, chat: bool, job: Job, prompt_ids: list[int]):
        self.state, self.body, self.chat, self.job = state, body, chat, job
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.text = TextStream(state.tokenizer, prompt_ids, body.stop)
        self.num_prompt = len(prompt_ids)
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self._text_offset = 0

    def abort(self) -> None:
        """The answer ends early (client gone, error): free the request everywhere."""
        if self.finish_reason is None and self.job.state is not JobState.DONE:
            self.state.cluster.abort(self.job)
            self.state.metrics.requests.labels("aborted").inc()

    def count_error(self) -> None:
        self.state.metrics.requests.labels("error").inc()

    def _take(self, event: TokenEvent) -> tuple[str, list[TokenLogprob]]:
        """Account for one token; returns the text it releases and its logprobs (if asked for)."""
        self.token_ids.append(event.token_id)
        text = self.text.push(event.token_id)
        finish = event.finish_reason
        if self.text.stopped:
            finish = "stop"
            self.state.cluster.abort(self.job)  # the workers stop generating; no-op if it had finished anyway
        elif finish is not None:
            text += self.text.flush()
        if finish is not None:
            self.finish_reason = finish
            job = self.job
            now = time.monotonic()
            ttft = (job.first_token_at or now) - job.created
            self.state.metrics.record(ttft, now - job.created, len(self.token_ids))
            self.state.metrics.requests.labels("ok").inc()
        return text, [event.logprob] if event.logprob is not None else []

    async def whole(self, first: TokenEvent, request: Request) -> dict[str, Any] | None:
        """The complete answer; None when the client left before it was ready."""
        texts, logprobs = [], []
        event: TokenEvent | ErrorEvent | None = first
        while True:
            if event is None:
                return None
            if isinstance(event, ErrorEvent):
                self.count_error()
                raise APIError(event.status, event.message, "server_error")
            text, lps = self._take(event)
            texts.append(text)
            logprobs.extend(lps)
            if self.finish_reason is not None:
                break
            event = await _next_event(self.job, request)
        text = "".join(texts)
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = self._logprobs(logprobs) if self._wants_logprobs else None
        if self.body.return_token_ids:
            choice["token_ids"] = self.token_ids
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.state.served_model,
            "choices": [choice],
            "usage": self._usage(),
        }

    async def stream(self, first: TokenEvent) -> AsyncIterator[bytes]:
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        try:
            if self.chat:
                yield self._chunk({"delta": {"role": "assistant", "content": ""}}, include_usage)
            event: TokenEvent | ErrorEvent = first
            while True:
                if isinstance(event, ErrorEvent):
                    self.count_error()
                    yield _sse(_error_body(event.message, "server_error"))
                    break
                text, lps = self._take(event)
                if text or lps or self.finish_reason or self.body.return_token_ids:
                    choice: dict[str, Any] = (
                        {"delta": {"content": text} if text else {}} if self.chat else {"text": text}
                    )
                    choice["logprobs"] = self._logprobs(lps) if self._wants_logprobs else None
                    choice["finish_reason"] = self.finish_reason
                    if self.body.return_token_ids:
                        choice["token_ids"] = [event.token_id]
                    yield self._chunk(choice, include_usage)
                if self.finish_reason is not None:
                    if include_usage:
                        yield _sse({**self._envelope(), "choices": [], "usage": self._usage()})
                    break
                event = await self.job.next_event()
            yield b"data: [DONE]\n\n"
        finally:
            self.abort()  # the client left mid-stream (or an error ended it): free the request everywhere

    @property
    def _wants_logprobs(self) -> bool:
        return (self.body.num_logprobs if self.chat else self.body.logprobs) is not None

    def _envelope(self) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.state.served_model}  # fmt: skip

    def _chunk(self, choice: dict[str, Any], include_usage: bool) -> bytes:
        choice = {"index": 0, "logprobs": None, "finish_reason": None, **choice}
        payload = {**self._envelope(), "choices": [choice]}
        if include_usage:
            payload["usage"] = None
        return _sse(payload)

    def _usage(self) -> dict[str, int]:
        n = len(self.token_ids)
        return {"prompt_tokens": self.num_prompt, "completion_tokens": n, "total_tokens": self.num_prompt + n}

    def _logprobs(self, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        decode = self.state.tokenizer.decode

        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            token = decode([token_id])
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        if self.chat:
            return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                                for lp in logprobs]}  # fmt: skip
        tokens = [decode([lp.token_id]) for lp in logprobs]
        offsets = []
        for token in tokens:
            offsets.append(self._text_offset)
            self._text_offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{decode([t]): v for t, v in lp.top} for lp in logprobs],
            "text_offset": offsets,
        }


_json = msgspec.json.Encoder()


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + _json.encode(payload) + b"\n\n"


class _BodyLimit:
    """Refuses request bodies over `limit` bytes with 413, by Content-Length or as they stream in."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = _json.encode(_error_body(f"the request body exceeds {self.limit} bytes", "invalid_request_error"))
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass
