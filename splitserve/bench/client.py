"""The load generator: sends each request at its arrival time (at most `concurrency` in flight) to an
OpenAI-compatible server, streaming, and records when each piece of output arrived.

A multi-turn session's later turns are sent as soon as the previous answer is complete, with the
conversation so far (the server's real answers) in their messages.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

import httpx
from tqdm import tqdm

from splitserve.bench.workloads import BenchRequest


@dataclass
class Record:
    """One request as the client saw it (times in seconds from the run's start)."""

    prompt_tokens: int
    max_tokens: int
    sent: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrivals of chunks that carried output
    end: float = 0.0
    output_tokens: int = 0
    error: str | None = None
    session: int | None = None
    turn: int = 0
    phase: int | None = None  # phased workloads: which phase sent it

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Target:
    url: str  # the server's base URL, e.g. http://127.0.0.1:8000
    model: str
    endpoint: str = "completions"  # or "chat"
    api_key: str | None = None
    ignore_eos: bool = True  # force the requested output lengths where the server allows it
    # Force them instead with min_tokens = max_tokens: the model's own words (no end-of-text to skip over),
    # so a multi-turn answer sent back in the next turn's messages tokenizes as it was generated.
    min_tokens: bool = False
    session_cache_keys: bool = False  # send each multi-turn session's id as its prompt_cache_key


async def run(target: Target, requests: list[BenchRequest], concurrency: int | None = None,
              progress: bool = True) -> tuple[list[Record], float]:  # fmt: skip
    """Run the workload; returns a record per request (sessions' turns included) and the run's duration."""
    total = sum(1 + len(r.follow_ups) for r in requests)
    limit = asyncio.Semaphore(concurrency or total)
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    # A connection per request: servers close kept-alive connections on their own terms (llama-server after
    # its fifth request), and a request sent into one that is closing fails without reaching the server.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    records: list[Record] = []
    async with httpx.AsyncClient(base_url=target.url, timeout=None, limits=limits, headers=headers) as client:
        with tqdm(total=total, desc="requests", unit="req", disable=not progress) as bar:
            start = time.perf_counter()

            async def session(first: BenchRequest) -> None:
                await asyncio.sleep(max(0.0, start + first.arrival_s - time.perf_counter()))
                history: list[dict[str, str]] = []
                for request in (first, *first.follow_ups):
                    if request.messages is not None and first.follow_ups and first.with_history:
                        history = [*history, *request.messages]
                        request = BenchRequest(None, request.max_tokens, request.prompt_tokens, history,
                                               session=request.session, turn=request.turn)  # fmt: skip
                    async with limit:
                        record, text = await _send(client, target, request, start)
                    records.append(record)
                    bar.update(1)
                    if not record.ok:
                        bar.update(len(first.follow_ups) - request.turn)
                        return
                    history = [*history, {"role": "assistant", "content": text}] if history else history

            await asyncio.gather(*(session(r) for r in requests))
            return records, time.perf_counter() - start


async def _send(client: httpx.AsyncClient, target: Target, request: BenchRequest, start: float) -> tuple[Record, str]:
    chat = target.endpoint == "chat"
    body: dict = {"model": target.model, "max_tokens": request.max_tokens, "stream": True, "temperature": 0,
                  "stream_options": {"include_usage": True}}  # fmt: skip
    if target.min_tokens:
        body["min_tokens"] = request.max_tokens
    elif target.ignore_eos:
        body["ignore_eos"] = True
    if target.session_cache_keys and request.session is not None:
        body["prompt_cache_key"] = f"session-{request.session}"
    if chat:
        body["messages"] = request.messages or [{"role": "user", "content": request.prompt}]
    else:
        body["prompt"] = request.prompt
    record = Record(request.prompt_tokens, request.max_tokens, session=request.session, turn=request.turn,
                    phase=request.phase)  # fmt: skip
    pieces: list[str] = []
    record.sent = time.perf_counter() - start
    try:
        path = "/v1/chat/completions" if chat else "/v1/completions"
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                record.error = f"HTTP {r.status_code}: {(await r.aread())[:300].decode(errors='replace')}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        record.error = str(event["error"].get("message", event["error"]))
                        break
                    if event.get("usage"):
                        record.output_tokens = event["usage"].get("completion_tokens", 0)
                    for choice in event.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                        if text:
                            pieces.append(text)
                            record.chunk_times.append(time.perf_counter() - start)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        record.error = f"{type(e).__name__}: {e}"
    record.end = time.perf_counter() - start
    if record.ok and not record.chunk_times:
        record.error = "no output"
    if record.ok and not record.output_tokens:  # a server that does not report usage: count chunks
        record.output_tokens = len(record.chunk_times)
    return record, "".join(pieces)
