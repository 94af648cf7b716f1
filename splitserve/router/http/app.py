"""The router's HTTP face: OpenAI-compatible `/v1/completions` and `/v1/chat/completions` (streaming as
server-sent events, or whole), `/v1/models`, `/health` and `/metrics`.

Each request is validated (an OpenAI-shaped JSON error with a 4xx status otherwise), tokenized, and
submitted to the `Cluster`. The HTTP status is decided before the first byte: the handler waits for the
request's first token (or its error: queue full, no room in time) before it answers. After that an error
arrives as an `error` event in the stream. A client that goes away aborts its request everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import PreTrainedTokenizerBase

from splitserve.engine.params import (
    INT64_MIN,
    SamplingParams,
    StructuredOutput,
    TokenLogprob,
    check_params,
    check_prompt,
)
from splitserve.errors import InvalidRequestError
from splitserve.model.tokenizer import encode, encode_chat
from splitserve.protocol import Role
from splitserve.router.cluster.cluster import Cluster
from splitserve.router.cluster.jobs import ErrorEvent, Job, JobState, Overloaded, TokenEvent
from splitserve.router.cluster.metrics import RouterMetrics
from splitserve.router.http import tool_calls
from splitserve.router.http.formats import ChatShape, CompletionShape, sse
from splitserve.router.http.openai_schema import ChatCompletionRequest, CompletionRequest, RoleChange
from splitserve.router.http.output import TextStream
from splitserve.router.http.tool_calls import CallDelta
from splitserve.slo import SLO

log = logging.getLogger(__name__)

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
    tool_call_parser: str = "auto"  # how calls are found in the model's text (`--tool-call-parser`)
    chat_stop_token_ids: tuple[int, ...] = ()  # a built-in chat template's end of turn (`model.chat_templates`)
    metrics: RouterMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = RouterMetrics(self.cluster, self.slo)
        template = self.tokenizer.chat_template
        self.native_tools = tool_calls.template_takes_tools(template)
        self.tool_call_parser = tool_calls.parser_name(template, self.tool_call_parser)


def create_app(state: RouterState, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    async def lifespan(app: FastAPI):
        await state.cluster.start()
        yield
        await state.cluster.stop()

    app = FastAPI(title="splitserve router", lifespan=lifespan)
    app.add_middleware(_Admission, state=state)
    app.add_middleware(_BodyLimit, limit=max_body_bytes)  # outside: it limits the bodies _Admission reads

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        state.metrics.requests.labels("rejected").inc()
        return JSONResponse(_error_body(e.message, e.type, e.code, e.param), e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        state.metrics.requests.labels("rejected").inc()
        problems, params = [], []
        for err in e.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            message = str(err.get("msg")).removeprefix("Value error, ")
            if err.get("type") == "extra_forbidden":
                message = "this field is not supported by this server"
            params.append(where)
            problems.append(f"{where}: {message}" if where else message)
        param = params[0] if len(set(params)) == 1 and params[0] else None
        message = "; ".join(dict.fromkeys(problems)) or "invalid request"
        return JSONResponse(_error_body(message, "invalid_request_error", None, param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(_error_body(str(e.detail), type_), e.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        # A bug met by this request fails this request alone; the cluster's state is the Cluster's, untouched.
        log.exception("internal error serving %s %s", request.method, request.url.path)
        return JSONResponse(_error_body(f"internal error serving this request: {type(e).__name__}: {e}",
                                        "server_error"), 500)  # fmt: skip

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

    @app.post("/admin/workers/{worker_id}/role", dependencies=[Depends(authorized)])
    async def switch_role(worker_id: str, body: RoleChange):
        """Move a worker to the other pool: it finishes its work, then switches in place (weights kept)."""
        try:
            state.cluster.switch_role(worker_id, Role(body.role), "asked by an operator")
        except KeyError:
            raise APIError(404, f"no worker {worker_id!r}", "not_found_error", param="worker_id") from None
        except ValueError as e:
            raise APIError(409, f"worker {worker_id} cannot switch to {body.role}: {e}", param="role") from None
        return {"worker": worker_id, "switching_to": body.role}

    @app.post("/admin/workers/{worker_id}/drain", dependencies=[Depends(authorized)])
    async def drain(worker_id: str):
        """Send a worker no new work (before stopping it: a smaller pool); its requests finish."""
        try:
            state.cluster.drain(worker_id)
        except KeyError:
            raise APIError(404, f"no worker {worker_id!r}", "not_found_error", param="worker_id") from None
        return {"worker": worker_id, "leaving": True}

    @app.get("/health")
    async def health():
        snap = msgspec.to_builtins(state.cluster.snapshot())
        if state.metrics.window is not None:
            snap["slo"] = msgspec.to_builtins(state.metrics.window.snapshot())
        ok = state.cluster.can_serve()
        return JSONResponse({"status": "ok" if ok else "unavailable", **snap}, 200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


# --- one request -------------------------------------------------------------------------------------


async def _serve(state: RouterState, body: CompletionRequest | ChatCompletionRequest, request: Request) -> Response:
    if body.model != state.served_model:
        raise APIError(404, f"the model `{body.model}` does not exist; this server serves `{state.served_model}`",
                       code="model_not_found", param="model")  # fmt: skip
    try:
        prompts = _prompt_ids(state, body)
        choices = [(i, ids, params) for i, ids in enumerate(prompts) for params in _sampling_params(state, body, ids)]
    except InvalidRequestError as e:
        raise APIError(400, str(e), code=e.code, param=e.param) from e
    jobs: list[Job] = []
    try:
        for _, ids, params in choices:
            jobs.append(state.cluster.submit(ids, params, body.cache_key))
        request.scope.get("state", {}).get("admitted", lambda: None)()  # the next request may enter (_Admission)
    except Overloaded as e:
        for job in jobs:
            state.cluster.abort(job)
        type_ = "rate_limit_error" if e.status == 429 else "server_error"
        raise APIError(e.status, str(e), type_, headers={"Retry-After": str(e.retry_after_s)}) from e
    answer = _Answer(state, body, [_Choice(state, body, k, job, prompts[i]) for k, (job, (i, _, _))
                                   in enumerate(zip(jobs, choices, strict=True))], prompts)  # fmt: skip
    gone = _ClientGone(request)
    try:
        firsts: list[TokenEvent] = []
        for job in jobs:  # the status is decided before the first byte: every choice has started, or failed
            first = await _next_event(job, gone)
            if first is None:  # the client left while the request waited
                answer.abort()
                return Response(status_code=499)
            if isinstance(first, ErrorEvent):
                answer.count_error()
                headers = {"Retry-After": str(first.retry_after_s or 1)} if first.status in (429, 503) else None
                raise APIError(first.status, first.message, _error_type(first.status), headers=headers)
            firsts.append(first)
        if body.stream:  # from here the streaming response watches for the client leaving
            gone.stop()
            return _EventStream(answer.stream(firsts), media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache"})  # fmt: skip
        whole = await answer.whole(firsts, gone)
        return Response(status_code=499) if whole is None else JSONResponse(whole)
    except BaseException:
        answer.abort()
        raise
    finally:
        gone.stop()


def _prompt_ids(state: RouterState, body: CompletionRequest | ChatCompletionRequest) -> list[list[int]]:
    if isinstance(body, ChatCompletionRequest):
        tools = body.tools if body.tool_mode is not None else None
        conversation, specs = tool_calls.template_input(body.messages, tools, state.native_tools)
        return [encode_chat(state.tokenizer, conversation, specs)[1]]
    return [list(p) if not isinstance(p, str) else encode(state.tokenizer, p) if p else [] for p in body.prompts()]


def _sampling_params(state: RouterState, body, prompt_ids: list[int]) -> list[SamplingParams]:
    """The parameters of each of the prompt's `n` choices (seeded choices get seed, seed + 1, ... as in vLLM)."""
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
    params = SamplingParams(  # validates the rest, naming the field
        max_tokens=max_tokens,
        min_tokens=body.min_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=tuple((int(t), b) for t, b in (body.logit_bias or {}).items()),
        stop_token_ids=tuple(body.stop_token_ids) + (state.chat_stop_token_ids if chat else ()),
        ignore_eos=body.ignore_eos,
        logprobs=body.num_logprobs if chat else body.logprobs,
        structured=_structured(body),
        speculative=body.speculative,
    )
    check_params(params, state.vocab_size)
    if params.seed is None:
        return [params] * body.n
    return [replace(params, seed=(params.seed + i - INT64_MIN) % 2**64 + INT64_MIN) for i in range(body.n)]


def _structured(body: CompletionRequest | ChatCompletionRequest) -> StructuredOutput | None:
    if isinstance(body, ChatCompletionRequest) and body.forced_tool_call:
        schema = tool_calls.forced_schema(body.tools, body.tool_mode, body.parallel_tool_calls)
        return StructuredOutput("json_schema", json.dumps(schema))  # the tools' schemas were checked on arrival
    response_format = body.response_format
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        spec = StructuredOutput("json_object")
    else:
        spec = StructuredOutput("json_schema", json.dumps(response_format.json_schema.schema_))
    spec.check()  # a schema that is no JSON Schema is the client's 400 here; a worker compiles the grammar
    return spec


def _error_type(status: int) -> str:
    """OpenAI's error type for a job's error event: the request's own fault (a worker found it invalid), or ours."""
    return "invalid_request_error" if status == 400 else "server_error"


class _EventStream(StreamingResponse):
    """A streamed answer that ends when its client leaves, as Starlette's does, with a plain asyncio task
    watching for the disconnect instead of an anyio task group around the stream (a tenth of the router's time
    per short streamed request went to the group's machinery). The watcher cancels the streaming task; the
    answer's generator then closes, and its `finally` aborts the requests."""

    async def __call__(self, scope, receive, send) -> None:
        streaming = asyncio.current_task()
        left = done = False

        async def watch() -> None:
            nonlocal left
            while (await receive())["type"] != "http.disconnect":
                pass
            if not done:  # (a disconnect after the last byte cancels nothing)
                left = True
                streaming.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await self.stream_response(send)
            done = True  # before any other await: the watcher cannot run in between
        except asyncio.CancelledError:
            if not left:  # cancelled from outside: not ours to swallow
                raise
            streaming.uncancel()
        finally:
            watcher.cancel()


class _ClientGone:
    """Done when the client disconnects: one task waits on the request's ASGI channel (after the body, the next
    message there is the disconnect), so that waiting requests poll nothing (a thousand of them would)."""

    def __init__(self, request: Request):
        self.future = asyncio.ensure_future(self._watch(request))

    @staticmethod
    async def _watch(request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    def stop(self) -> None:
        self.future.cancel()


async def _next_event(job: Job, gone: _ClientGone) -> TokenEvent | ErrorEvent | None:
    """The job's next event; None when the client disconnected while waiting."""
    event = asyncio.ensure_future(job.next_event())
    await asyncio.wait((event, gone.future), return_when=asyncio.FIRST_COMPLETED)
    if event.done():
        return event.result()
    event.cancel()
    return None


class _Choice:
    """One choice of the answer: one job's tokens turned into text (stop strings applied)."""

    def __init__(self, state: RouterState, body, index: int, job: Job, prompt_ids: list[int]):
        self.index, self.job = index, job
        self.text = TextStream(state.tokenizer, prompt_ids, body.stop, body.min_tokens)
        self.echo = state.tokenizer.decode(prompt_ids) if getattr(body, "echo", False) else ""
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.text_offset = 0
        mode = body.tool_mode if isinstance(body, ChatCompletionRequest) else None
        self.calls = None if mode is None else tool_calls.extractor(body.tools, mode, body.parallel_tool_calls,
                                                                    state.tool_call_parser)  # fmt: skip


class _Answer:
    """Collects the jobs' token events into each choice's text, logprobs and token ids (stop strings, metrics,
    aborts) and hands them to the response's shape (`formats`), whole or as a stream of chunks."""

    def __init__(self, state: RouterState, body, choices: list[_Choice], prompts: list[list[int]]):
        self.state, self.body, self.choices = state, body, choices
        chat = isinstance(body, ChatCompletionRequest)
        wants_logprobs = (body.num_logprobs if chat else body.logprobs) is not None
        shape = ChatShape if chat else CompletionShape
        self.shape = shape(state.served_model, state.tokenizer.decode, wants_logprobs, body.return_token_ids)
        self.num_prompt = sum(len(p) for p in prompts)

    def abort(self) -> None:
        """The answer ends early (client gone, error): free every unfinished choice's request everywhere."""
        for choice in self.choices:
            if choice.finish_reason is None and choice.job.state is not JobState.DONE:
                self.state.cluster.abort(choice.job)
                self.state.metrics.requests.labels("aborted").inc()

    def count_error(self) -> None:
        self.state.metrics.requests.labels("error").inc()

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def _take(self, choice: _Choice, event: TokenEvent) -> tuple[str, list[TokenLogprob], list[CallDelta]]:
        """Account for one token of `choice`; returns the text it releases, its logprobs (if asked for) and the
        pieces of tool calls it completes."""
        choice.token_ids.append(event.token_id)
        text = choice.text.push(event.token_id)
        finish = event.finish_reason
        if choice.text.stopped:
            finish = "stop"
            self.state.cluster.abort(choice.job)  # the workers stop generating; no-op if it had finished anyway
        elif finish is not None:
            text += choice.text.flush()
        deltas: list[CallDelta] = []
        if choice.calls is not None:
            text, deltas = choice.calls.feed(text)
            if finish is not None:
                rest, more = choice.calls.finish()
                text, deltas = text + rest, deltas + more
                self.state.metrics.tool_calls.labels("parsed").inc(len(choice.calls.calls))
                self.state.metrics.tool_calls.labels("unparsed").inc(choice.calls.unparsed)
                if choice.calls.calls and finish == "stop":
                    finish = "tool_calls"
        if finish is not None:
            choice.finish_reason = finish
            job = choice.job
            now = time.monotonic()
            ttft = (job.first_token_at or now) - job.created
            self.state.metrics.record(ttft, now - job.created, len(choice.token_ids))
            log.info("request %s choice %d finished (%s): %d prompt + %d output tokens, TTFT %.3fs, %.3fs in all, "
                     "%d attempt(s), %d migration(s)%s", self.shape.id, choice.index, finish, len(job.prompt_token_ids),
                     len(choice.token_ids), ttft, now - job.created, job.attempts, len(job.migrations),
                     f" ({', '.join(job.migrations)})" if job.migrations else "")  # fmt: skip
            if self.finished:
                self.state.metrics.requests.labels("ok").inc()
        return text, [event.logprob] if event.logprob is not None else [], deltas

    async def _events(self, firsts: list[TokenEvent], gone: _ClientGone | None):
        """Batches of (choice, event) pairs as they come, each choice's in order, until every choice has finished:
        what has arrived by now, all at once (a worker's message may carry many of a job's tokens); [(None, None)]
        when the client disconnected while waiting (`gone`; a streaming response watches itself)."""
        yield list(zip(self.choices, firsts, strict=True))
        waiting: dict[asyncio.Future, _Choice] = {}
        try:
            while True:
                batch = []
                for choice in self.choices:  # what is there already, without a task per event
                    if choice not in waiting.values():
                        while not choice.job.events.empty() and choice.finish_reason is None:
                            batch.append((choice, choice.job.events.get_nowait()))
                            if isinstance(batch[-1][1], ErrorEvent) or batch[-1][1].finish_reason is not None:
                                break
                if batch:
                    yield batch
                    continue
                open_choices = [c for c in self.choices if c.finish_reason is None]
                if not open_choices:
                    return
                if gone is None and len(open_choices) == 1 and not waiting:  # one choice, nothing else to watch
                    yield [(open_choices[0], await open_choices[0].job.next_event())]
                    continue
                for choice in open_choices:
                    if choice not in waiting.values():
                        waiting[asyncio.ensure_future(choice.job.next_event())] = choice
                watched = (*waiting, gone.future) if gone is not None else tuple(waiting)
                done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                if gone is not None and gone.future in done:
                    yield [(None, None)]
                    return
                yield [(waiting.pop(f), f.result()) for f in sorted(done, key=lambda f: waiting[f].index)]
        finally:
            for future in waiting:
                future.cancel()

    async def whole(self, firsts: list[TokenEvent], gone: _ClientGone) -> dict[str, Any] | None:
        """The complete answer; None when the client left before it was ready."""
        texts: dict[int, list[str]] = {c.index: [c.echo] for c in self.choices}
        logprobs: dict[int, list[TokenLogprob]] = {c.index: [] for c in self.choices}
        async with contextlib.aclosing(self._events(firsts, gone)) as events:
            async for batch in events:
                for choice, event in batch:
                    if choice is None:
                        return None
                    if choice.finish_reason is not None:  # (a stop string ended it earlier in the batch)
                        continue
                    if isinstance(event, ErrorEvent):
                        self.count_error()
                        raise APIError(event.status, event.message, _error_type(event.status))
                    text, lps, _ = self._take(choice, event)
                    texts[choice.index].append(text)
                    logprobs[choice.index].extend(lps)
        out = [self.shape.whole_choice(c.index, "".join(texts[c.index]), c.finish_reason,
                                       self._logprobs(c, logprobs[c.index]), c.token_ids,
                                       [call.as_openai() for call in c.calls.calls] if c.calls else [])
               for c in self.choices]  # fmt: skip
        return {**self.shape.envelope(whole=True), "choices": out, "usage": self._usage()}

    async def stream(self, firsts: list[TokenEvent]) -> AsyncIterator[bytes]:
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        try:
            for c in self.choices:
                opening = self.shape.opening(c.index, c.echo)
                if opening is not None:
                    yield self.shape.chunk(opening, include_usage)
            async with contextlib.aclosing(self._events(firsts, None)) as events:
                async for batch in events:
                    chunks, failed = [], False  # a batch's chunks go out in one write
                    for choice, event in batch:
                        if choice.finish_reason is not None:  # (a stop string ended it earlier in the batch)
                            continue
                        if isinstance(event, ErrorEvent):
                            self.count_error()
                            chunks.append(sse(_error_body(event.message, "server_error")))
                            failed = True
                            break
                        text, lps, deltas = self._take(choice, event)
                        if text or lps or deltas or choice.finish_reason or self.body.return_token_ids:
                            entry = self.shape.piece(choice.index, text, self._logprobs(choice, lps),
                                                     choice.finish_reason, event.token_id,
                                                     [d.as_openai() for d in deltas])  # fmt: skip
                            chunks.append(self.shape.chunk(entry, include_usage))
                    if chunks:
                        yield b"".join(chunks)
                    if failed:
                        break
            if self.finished and include_usage:
                yield self.shape.usage_chunk(self._usage())
            yield b"data: [DONE]\n\n"
        finally:
            self.abort()  # the client left mid-stream (or an error ended it): free the requests everywhere

    def _logprobs(self, choice: _Choice, logprobs: list[TokenLogprob]) -> dict[str, Any] | None:
        if not self.shape.wants_logprobs:
            return None
        out, choice.text_offset = self.shape.logprobs(logprobs, choice.text_offset)
        return out

    def _usage(self) -> dict[str, int]:
        n = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": self.num_prompt, "completion_tokens": n, "total_tokens": self.num_prompt + n}


class _Admission:
    """Completion requests enter the router one at a time: each one's body is read first (however slowly its
    client sends it), then, in turn, it is refused at once when it could not be queued anyway (429, 503), or
    validated, tokenized and queued (`_serve` calls `admitted`); then the next one enters. So a flood of
    clients costs the event loop one request's work per turn, and what else runs on it (`/health`, the
    streams of admitted requests) waits for one request at most, never for the whole flood."""

    PATHS = ("/v1/completions", "/v1/chat/completions")

    def __init__(self, app, state: RouterState):
        self.app, self.state = app, state
        self._turn = asyncio.Lock()  # granted in arrival order

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.PATHS:
            await self.app(scope, receive, send)
            return
        body, message = bytearray(), {"more_body": True}
        while message.get("more_body"):
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
        replay = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def replaying_receive():
            return replay.pop() if replay else await receive()

        await self._turn.acquire()
        held = True

        def admitted() -> None:
            nonlocal held
            if held:
                held = False
                self._turn.release()

        async def releasing_send(message):
            if message["type"] == "http.response.start":
                admitted()
            await send(message)

        scope.setdefault("state", {})["admitted"] = admitted
        try:
            # A free lock is granted without yielding: yield once while holding it, so that the requests that
            # arrived in this same turn of the loop line up behind this one instead of all running in this turn.
            await asyncio.sleep(0)
            refusal = self._refusal(scope)
            if refusal is not None:
                admitted()
                await _send_json(send, *refusal)
                return
            await self.app(scope, replaying_receive, releasing_send)
        finally:
            admitted()

    def _refusal(self, scope) -> tuple[int, dict[str, Any], dict[str, str]] | None:
        """The 429 or 503 a request would get anyway, or None (a request without the API key goes on, to
        get its 401)."""
        key = self.state.api_key
        if key and dict(scope["headers"]).get(b"authorization") != f"Bearer {key}".encode():
            return None
        try:
            self.state.cluster.check_admission()
        except Overloaded as e:
            self.state.metrics.requests.labels("rejected").inc()
            type_ = "rate_limit_error" if e.status == 429 else "server_error"
            return e.status, _error_body(str(e), type_), {"retry-after": str(e.retry_after_s)}
        return None


async def _send_json(send, status: int, content: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    body = msgspec.json.encode(content)
    fields = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
              *((k.encode(), v.encode()) for k, v in (headers or {}).items())]  # fmt: skip
    await send({"type": "http.response.start", "status": status, "headers": fields})
    await send({"type": "http.response.body", "body": body})


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
        await _send_json(
            send, 413, _error_body(f"the request body exceeds {self.limit} bytes", "invalid_request_error")
        )


class _TooLarge(Exception):
    pass
