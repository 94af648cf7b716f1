"""Agents against `splitserve serve`: a system prompt and tools, then 6-10 turns, each a tool call, its result
(200-2,000 tokens of tool output) and a pause (1-30 s, the tool running), 8-16 agents at once; the last turn
answers in text. The same agents (seeded) run on a fresh server per variant:

  retention     each agent's id as its prompt_cache_key: its KV is kept between turns (`--cache-ttl`)
  offload       the same, with a KV offload tier (`--kv-offload-memory 4GiB`): pages the pool gives up while
                an agent waits are copied out, and back for its next turn
  no retention  `--cache-ttl 0`, no key: a turn finds the history's pages only if nothing overwrote them
  no cache      `--no-prefix-caching`: every turn prefills the whole conversation

Retention and offload matter when the pool cannot hold every agent's history: size it with --serve-args
(`--kv-cache-memory`), as in the README's run.

Reported per variant: median TTFT per turn (first content or tool-call chunk), the workers' prefix cache hit
rate, and the tool-call parse rate: the share of tool turns whose answer holds a call that names a tool and
whose arguments validate against its schema (`--tool-choice required`, the default, forces calls with the
grammar; `auto` leaves them to the model, which the embedded 135M model rarely makes).

    .venv/bin/python benchmarks/agent.py                                   # 8 agents, pauses 1-30 s
    .venv/bin/python benchmarks/agent.py --agents 4 --turns 3,4 --pause 0.2,1   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path

import httpx
import jsonschema

from splitserve.bench import metrics, workloads
from splitserve.bench.cli import tokenizer_for
from splitserve.launcher import ServeProcess

VARIANTS = {  # name: (extra serve flags, prompt_cache_key per agent)
    "retention": ([], True),
    "offload": (["--kv-offload-memory", "4GiB"], True),
    "no retention": (["--cache-ttl", "0"], False),
    "no cache": (["--no-prefix-caching"], False),
}
TOOLS = [
    {"type": "function", "function": {"name": "search", "description": "Search the web", "parameters": {
        "type": "object", "properties": {"query": {"type": "string", "maxLength": 40}}, "required": ["query"]}}},
    {"type": "function", "function": {"name": "read_file", "description": "Read a file of the repository",
        "parameters": {"type": "object", "properties": {"path": {"type": "string", "maxLength": 40}},
                       "required": ["path"]}}},
    {"type": "function", "function": {"name": "run_tests", "description": "Run the test suite", "parameters": {
        "type": "object", "properties": {"pattern": {"type": "string", "maxLength": 20},
                                         "verbose": {"type": "boolean"}}, "required": ["pattern"]}}},
]  # fmt: skip
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
SYSTEM = ("You are a coding agent. Use the tools to find out what you need, one call at a time, then answer the "
          "user briefly. Think about which tool helps most before each call.")  # fmt: skip


def _span(text: str) -> tuple[float, float]:
    low, high = (float(x) for x in text.split(","))
    return low, high


async def _turn(client: httpx.AsyncClient, body: dict) -> tuple[float | None, list[dict], str, int]:
    """One streamed turn: (TTFT, calls, content, prompt tokens)."""
    start, ttft = time.perf_counter(), None
    calls: dict[int, dict] = {}
    content, prompt_tokens = [], 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                prompt_tokens = chunk["usage"]["prompt_tokens"]
            for choice in chunk.get("choices", ()):
                delta = choice.get("delta", {})
                if ttft is None and (delta.get("content") or delta.get("tool_calls")):
                    ttft = time.perf_counter() - start
                content.append(delta.get("content") or "")
                for d in delta.get("tool_calls") or ():
                    call = calls.setdefault(d["index"], {"id": d.get("id"), "name": "", "arguments": ""})
                    call["name"] += d["function"].get("name") or ""
                    call["arguments"] += d["function"].get("arguments") or ""
    return ttft, list(calls.values()), "".join(content), prompt_tokens


def _valid(call: dict) -> bool:
    try:
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    except (KeyError, ValueError, jsonschema.ValidationError):
        return False
    return True


async def _agent(k: int, args, target: tuple[str, str], keyed: bool, tokenizer, context: int, rows: list[dict]):
    rng = random.Random(args.seed * 1000 + k)  # the same agent in every variant
    turns = rng.randint(*(int(x) for x in _span(args.turns)))
    task = workloads.text_of_length(tokenizer, rng.randint(30, 80), rng)
    messages: list[dict] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": task}]
    url, model = target
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        for turn in range(turns):
            last = turn == turns - 1
            body = {"model": model, "messages": messages, "tools": TOOLS, "max_tokens": args.max_tokens,
                    "tool_choice": "none" if last else args.tool_choice, "parallel_tool_calls": False,
                    "temperature": 0.7, "seed": rng.randrange(2**31), "stream": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            if keyed:
                body["prompt_cache_key"] = f"agent-{k}"
            try:
                ttft, calls, content, prompt_tokens = await _turn(client, body)
            except (RuntimeError, httpx.HTTPError) as e:  # e.g. a 503: no room within --queue-timeout
                rows.append({"agent": k, "turn": turn, "ttft_s": None, "tool_turn": False, "parsed": False,
                             "error": str(e)[:200]})  # fmt: skip
                return
            rows.append({"agent": k, "turn": turn, "ttft_s": ttft, "prompt_tokens": prompt_tokens,
                         "tool_turn": not last, "parsed": bool(calls) and all(_valid(c) for c in calls)})  # fmt: skip
            if last:
                return
            if calls:
                messages.append({"role": "assistant", "content": content or None, "tool_calls": [
                    {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                    for c in calls]})  # fmt: skip
                result_to = calls[0]["id"]
            else:
                messages.append({"role": "assistant", "content": content})
                result_to = None
            room = context - prompt_tokens - 2 * args.max_tokens - 300
            size = min(rng.randint(*(int(x) for x in _span(args.result_len))), room)
            if size < 50:
                rows[-1]["tool_turn"] = False  # no room left for another result: this agent stops here
                return
            output = workloads.text_of_length(tokenizer, size, rng)
            if result_to is not None:
                messages.append({"role": "tool", "tool_call_id": result_to, "content": output})
            else:
                messages.append({"role": "user", "content": f"Tool output:\n{output}"})
            await asyncio.sleep(rng.uniform(*_span(args.pause)))


def run_variant(args, tokenizer, variant: str) -> dict:
    extra, keyed = VARIANTS[variant]
    server = ServeProcess(args.model, ["--prefill", "1", "--decode", "1", *extra, *args.serve_args.split()], 2)
    rows: list[dict] = []
    try:
        card = server.http.get("/v1/models").json()["data"][0]
        target = (server.url, card["id"])
        start = time.perf_counter()

        async def agents():
            await asyncio.gather(*(_agent(k, args, target, keyed, tokenizer, card["max_model_len"], rows)
                                   for k in range(args.agents)))  # fmt: skip

        asyncio.run(agents())
        duration = time.perf_counter() - start
        time.sleep(0.6)  # the workers' last heartbeats carry their cache counters
        text = server.http.get("/metrics").text
    finally:
        server.stop()
    queries, hits = (metrics.prometheus_total(text, "splitserve_prefix_cache_queries_total"),
                     metrics.prometheus_total(text, "splitserve_prefix_cache_hits_total"))  # fmt: skip
    by_turn: dict[int, list[float]] = {}
    for r in rows:
        if r["ttft_s"] is not None:
            by_turn.setdefault(r["turn"], []).append(r["ttft_s"])
    tool_turns = [r for r in rows if r["tool_turn"]]
    result = {
        "variant": variant,
        "duration_s": duration,
        "turns": len(rows),
        "failed": sum("error" in r for r in rows),
        "median_ttft_by_turn_s": {t: statistics.median(v) for t, v in sorted(by_turn.items())},
        "median_ttft_turn3plus_s": statistics.median([r["ttft_s"] for r in rows if r["turn"] >= 2 and r["ttft_s"]]),
        "hit_rate": hits / queries if queries else 0.0,
        "parse_rate": sum(r["parsed"] for r in tool_turns) / len(tool_turns) if tool_turns else float("nan"),
        "tool_calls_parsed": metrics.prometheus_total(text, "splitserve_tool_calls_total", 'outcome="parsed"'),
        "tool_calls_unparsed": metrics.prometheus_total(text, "splitserve_tool_calls_total", 'outcome="unparsed"'),
        "rows": rows,
    }
    turns = " ".join(f"{t + 1}:{v * 1000:.0f}" for t, v in result["median_ttft_by_turn_s"].items())
    print(f"{variant:<13} | {duration:6.1f} s | {len(rows)} turns, {result['failed']} failed | hit rate "
          f"{result['hit_rate']:5.1%} | parse rate {result['parse_rate']:5.1%} | turn 3+ median TTFT "
          f"{result['median_ttft_turn3plus_s'] * 1000:6.0f} ms | "
          f"median TTFT by turn (ms) {turns}", flush=True)  # fmt: skip
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--agents", type=int, default=8, help="agents at once (default 8)")
    p.add_argument("--turns", default="6,10", help="turns per agent, low,high (default %(default)s)")
    p.add_argument("--result-len", default="200,2000", help="tokens per tool result, low,high (default %(default)s)")
    p.add_argument("--pause", default="1,30", help="seconds between turns, low,high (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per answer at most (default 48)")
    p.add_argument("--tool-choice", default="required", choices=("required", "auto"),
                   help="the tool turns' tool_choice (default required)")  # fmt: skip
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--serve-args", default="", help="extra `splitserve serve` flags for every run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results (every turn's timings) to this JSON file")
    args = p.parse_args()
    tokenizer = tokenizer_for(args.model)
    print(f"{args.agents} agents x {args.turns} turns, tool results {args.result_len} tokens, pauses {args.pause} s, "
          f"tool_choice {args.tool_choice}")  # fmt: skip
    results = [run_variant(args, tokenizer, v) for v in args.variants.split(",")]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
