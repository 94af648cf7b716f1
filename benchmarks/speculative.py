"""Speculative decoding against none, in one run: for each workload, 1 stream's time per output token (TPOT)
and 16 streams' output tokens/s, with `--speculative off` (the baseline) and each method, everything else at
serve's defaults (the engine in this process, as `serve`'s decode worker runs it). Greedy, so the tokens must
be the same with and without speculation: each row says so.

Workloads: three that copy (a code edit that rewrites the given code, a question answered by quoting a
document, an agent loop that repeats a tool call in a conversation with a prompt_cache_key) and open chat,
which copies little.

    .venv/bin/python benchmarks/speculative.py [--methods ngram,suffix] [--streams 1,16] [--max-tokens 128]
    .venv/bin/python benchmarks/speculative.py --batch-sweep 1,2,4,8,16   # where speculation stops paying
    .venv/bin/python benchmarks/speculative.py --methods draft [--draft-model PATH]

`draft`'s model defaults to the embedded model itself (no smaller model with its tokenizer is at hand offline):
that shows the mechanism and its costs (nearly every greedy draft kept, but each drafted token costs a step of
the same size), not a speed-up. The decode worker prefills the draft itself: the run also prints what that
catch-up cost per prompt token against the model's own prefill.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import time
from collections.abc import Callable

from splitserve import LLM, SamplingParams
from splitserve.engine.request import EngineRequest
from splitserve.model.checkpoint import resolve_model
from splitserve.model.tokenizer import encode_chat

CODE = '''import json
from dataclasses import dataclass


@dataclass
class Order:
    order_id: int
    customer: str
    items: list[str]
    total: float


def load_orders(path: str) -> list[Order]:
    """Read the orders of a JSON file."""
    with open(path) as f:
        rows = json.load(f)
    return [Order(r["order_id"], r["customer"], r["items"], r["total"]) for r in rows]


def total_by_customer(orders: list[Order]) -> dict[str, float]:
    """Sum each customer's orders."""
    totals: dict[str, float] = {}
    for order in orders:
        totals[order.customer] = totals.get(order.customer, 0.0) + order.total
    return totals


def largest_order(orders: list[Order]) -> Order:
    """The order with the largest total."""
    return max(orders, key=lambda order: order.total)
'''
DOCUMENT = (
    "The Eastern Railway opened in 1862 between the harbour and the market town of Linford. Its first engines "
    "were built in Leeds and could pull six carriages at twenty miles an hour. In 1871 the line was extended to "
    "the coal fields of the upper valley, and freight soon outweighed passengers three to one. The company "
    "survived the depression of the 1890s by selling its hotels. In 1923 it was merged into the Great Northern "
    "group, and the Linford works were closed in 1931. The station building, designed by Thomas Hale, still "
    "stands and now houses the town museum, where one of the original engines is kept in working order. "
    "Volunteers run it on the first Sunday of every month between May and September."
)
TOOL_SYSTEM = (
    'You can call one tool, get_weather, by writing exactly {"tool": "get_weather", "arguments": {"city": '
    '"<city>", "unit": "celsius"}} and nothing else.'
)
CHAT = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are three good habits for learning a new language? Explain each briefly.",
    "Describe a walk through a forest in autumn.",
    "Explain why the sky is blue to a ten year old.",
]


def workloads() -> dict[str, Callable[[int], tuple[list[dict], str | None]]]:
    """Each workload's i-th conversation (messages) and its prompt_cache_key."""

    def code(i: int):
        ask = f"Rename the function largest_order to biggest_order_{i} and print the whole file again, unchanged "
        return [{"role": "user", "content": ask + f"otherwise:\n\n{CODE}"}], None

    def quote(i: int):
        ask = f"Document {i}:\n\n{DOCUMENT}\n\nQuote the document's sentences about the station building exactly."
        return [{"role": "user", "content": ask}], None

    def agent(i: int):
        city = ["Paris", "Oslo", "Lima", "Cairo"][i % 4]
        call = f'{{"tool": "get_weather", "arguments": {{"city": "{city}", "unit": "celsius"}}}}'
        turns = [{"role": "system", "content": TOOL_SYSTEM}]
        for day in ("Monday", "Tuesday"):
            said = f"On {day} it is {12 + len(day)} degrees and cloudy in {city}."
            turns += [{"role": "user", "content": f"What is the weather in {city} on {day}?"},
                      {"role": "assistant", "content": call},
                      {"role": "user", "content": f"Tool result: {12 + len(day)} degrees, cloudy."},
                      {"role": "assistant", "content": said}]  # fmt: skip
        turns.append({"role": "user", "content": f"What is the weather in {city} on Wednesday?"})
        return turns, f"agent-{i}"

    def chat(i: int):
        return [{"role": "user", "content": CHAT[i % len(CHAT)]}], None

    return {"code-edit": code, "quote": quote, "agent": agent, "chat": chat}


def run(llm: LLM, convs: list[tuple[list[dict], str | None]], max_tokens: int) -> tuple[float, float, list[list[int]]]:
    """(mean TPOT in s over the streams, output tokens/s of the batch, each stream's tokens), all at once."""
    engine = llm.engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    ids = [f"r{next(_ids)}" for _ in convs]
    for rid, (messages, key) in zip(ids, convs, strict=True):
        engine.add_request(EngineRequest(rid, encode_chat(llm.tokenizer, messages)[1], params, cache_key=key))
    times: dict[str, list[float]] = {rid: [] for rid in ids}
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    start = time.perf_counter()
    while engine.has_unfinished():
        updates = engine.step()
        now = time.perf_counter()
        for u in updates:
            times[u.request_id].append(now)
            tokens[u.request_id].append(u.token_id)
    seconds = time.perf_counter() - start
    tpots = [(t[-1] - t[0]) / (len(t) - 1) for t in times.values() if len(t) > 1]
    return sum(tpots) / len(tpots), sum(map(len, tokens.values())) / seconds, [tokens[r] for r in ids]


_ids = itertools.count()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="ngram,suffix")
    p.add_argument("--streams", default="1,16")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--workloads", default="code-edit,quote,agent,chat")
    p.add_argument("--batch-sweep", default=None, help="batches to time chat at with speculation forced on")
    p.add_argument("--speculative-tokens", type=int, default=None, help="--num-speculative-tokens (default: its)")
    p.add_argument("--draft-model", default=None, help="the draft model of method draft (default: the model itself)")
    args = p.parse_args()
    print(f"# {platform.processor() or platform.machine()}, speculation at serve's defaults otherwise", flush=True)
    extra = {} if args.speculative_tokens is None else {"num_speculative_tokens": args.speculative_tokens}
    draft = {"draft_model": args.draft_model or str(resolve_model(None))}
    llms = {"off": LLM()} | {m: LLM(speculative=m, **extra, **(draft if m == "draft" else {}))
                             for m in args.methods.split(",")}  # fmt: skip
    catch_up = timed_catch_up(llms["draft"]) if "draft" in llms else None
    if args.batch_sweep:
        sweep(llms, [int(b) for b in args.batch_sweep.split(",")], args.max_tokens)
        return
    chosen = {k: v for k, v in workloads().items() if k in args.workloads.split(",")}
    print("| workload | streams | method | TPOT ms | tok/s | vs off | accepted/drafted | same tokens |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |")
    for (name, make), streams in itertools.product(chosen.items(), map(int, args.streams.split(","))):
        convs = [make(i) for i in range(streams)]
        for llm in llms.values():  # warm: each engine's first pass over these prompts, and the suffix memory
            run(llm, convs, 8)
        base = None
        for method, llm in llms.items():
            s = llm.engine.speculator.stats if llm.engine.speculator else None
            before = (s.drafted, s.accepted) if s else (0, 0)
            tpot, rate, toks = run(llm, convs, args.max_tokens)
            if base is None:
                base = (tpot, rate, toks)
            ratio = base[0] / tpot if streams == 1 else rate / base[1]
            accept = f"{s.accepted - before[1]}/{s.drafted - before[0]}" if s else ""
            print(f"| {name} | {streams} | {method} | {tpot * 1e3:.1f} | {rate:.1f} | {ratio:.2f}x | {accept} | "
                  f"{'yes' if toks == base[2] else 'NO'} |", flush=True)  # fmt: skip
    if catch_up is not None and catch_up[1]:
        seconds, tokens = catch_up
        prefill = llms["draft"].engine.prefill_tokens_per_s
        print(
            f"the draft's prompt catch-up on the decode side: {tokens} tokens in {seconds:.2f} s, "
            f"{1e3 * seconds / tokens:.2f} ms a token (the model's prefill: {1e3 / prefill:.2f} ms a token)"
        )


def timed_catch_up(llm: LLM) -> list[float]:
    """[seconds, tokens] the draft model spends running the prompts it has not seen (its catch-ups of 32 tokens
    or more: a step's own one or two new tokens are left out), updated as the engine runs."""
    proposer = llm.engine.speculator.proposer
    totals = [0.0, 0]
    catch_up = proposer._catch_up

    def timed(shadows, drafts):
        start = time.perf_counter()
        before = sum(s.request.num_computed_tokens for s in shadows.values())
        catch_up(shadows, drafts)
        tokens = sum(s.request.num_computed_tokens for s in shadows.values()) - before
        if tokens >= 32:
            totals[0] += time.perf_counter() - start
            totals[1] += tokens

    proposer._catch_up = timed
    return totals


def sweep(llms: dict[str, LLM], batches: list[int], max_tokens: int) -> None:
    """Chat at each batch size, each method forced to speculate at any batch, against off: output tokens/s."""
    make = workloads()["chat"]
    for llm in llms.values():
        if llm.engine.speculator is not None:
            llm.engine.speculator.max_batch = 1 << 30
    for b in batches:
        convs = [make(i) for i in range(b)]
        rates = {m: run(llm, convs, max_tokens)[1] for m, llm in llms.items()}
        shown = ", ".join(f"{m} {r:.1f} tok/s ({r / rates['off']:.2f}x)" for m, r in rates.items())
        print(f"chat, batch {b}: {shown}", flush=True)


if __name__ == "__main__":
    main()
