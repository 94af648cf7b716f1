"""Prefix caching: pages named by hash chains of their tokens, shared by reference count, evicted least
recently freed first, and kept for a conversation's next turn. Greedy tokens with cache hits equal Hugging
Face transformers' (fp32), and every page comes back (the conftest leak check) after every test."""

from __future__ import annotations

import random
import time

import pytest
import torch

from splitserve.decode.engine import DecodeEngine
from splitserve.engine.config import EngineConfig
from splitserve.engine.kv_cache import PageAllocator, page_bytes
from splitserve.engine.params import SamplingParams
from splitserve.engine.prefix_cache import page_hashes, reusable_pages, root_hash
from splitserve.engine.request import EngineRequest
from splitserve.model.config import ModelConfig
from splitserve.prefill.engine import PrefillEngine
from tests.helpers import hf_greedy

PAGE = 4


def _run(engine: DecodeEngine, requests: dict[str, tuple[list[int], int]], cache_key: str | None = None):
    """Add every request (prompt, max_tokens), greedy; run to the end; returns each one's output tokens."""
    out: dict[str, list[int]] = {}
    for rid, (prompt, n) in requests.items():
        engine.add_request(
            EngineRequest(rid, prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), cache_key)
        )
        out[rid] = []
    while engine.has_unfinished():
        for u in engine.step():
            out[u.request_id].append(u.token_id)
    return out


@pytest.fixture
def engine(tiny_llama_gqa) -> DecodeEngine:
    return DecodeEngine(
        EngineConfig(model=str(tiny_llama_gqa), dtype="fp32", page_size=PAGE, max_num_batched_tokens=64)
    )


def test_hash_chains_name_prefixes():
    root = root_hash(b"model A")
    a = page_hashes(list(range(40)), PAGE, root)
    assert len(a) == 10 and len(set(a)) == 10
    assert page_hashes(list(range(38)), PAGE, root) == a[:9]  # a partial last page has no hash
    changed = page_hashes([*range(21), 999, *range(22, 40)], PAGE, root)
    assert changed[:5] == a[:5] and all(x != y for x, y in zip(changed[5:], a[5:], strict=True))
    assert set(page_hashes(list(range(40)), PAGE, root_hash(b"model B"))).isdisjoint(a)  # other weights/layout
    assert page_hashes(list(range(40)), PAGE, root, limit=3) == a[:3]
    assert reusable_pages(8, PAGE) == 1 and reusable_pages(9, PAGE) == 2  # the last token's page is computed


def test_allocator_reuses_cached_pages_and_evicts_oldest_freed_first():
    alloc = PageAllocator(4)
    pages = alloc.allocate(3)
    for p, h in zip(pages, (101, 102, 103), strict=True):
        alloc.register(p, h)
    alloc.free(pages)
    assert alloc.num_free == 4 and alloc.num_cached == 3
    assert alloc.cached_prefix([101, 102, 999]) == pages[:2]
    assert alloc.cached_prefix([102]) == [pages[1]]  # a hash names its page wherever it appears
    hit = alloc.allocate(1, reuse=alloc.cached_prefix([101, 102]))
    assert hit[:2] == pages[:2] and hit[2] not in pages
    assert alloc.num_free == 1 and alloc.num_cached == 3
    # The one free page left holds 103 (freed last page first, so before the untouched spare was reused).
    more = alloc.allocate(1)
    assert alloc.stats.evictions == 1 and alloc.cached_prefix([101, 102, 103]) == pages[:2]
    alloc.free(hit + more)
    # Cached pages never refuse an allocation: all four are handed out, evicting whatever they held.
    everything = alloc.allocate(4)
    assert alloc.num_cached == 0 and alloc.stats.evictions == 3
    alloc.free(everything)


def test_expired_conversations_are_overwritten_before_other_cached_pages():
    alloc = PageAllocator(6)
    a, b = alloc.allocate(2), alloc.allocate(2)
    for p, h in zip([*a, *b], (1, 2, 3, 4), strict=True):
        alloc.register(p, h)
    alloc.free(a)  # an ordinary request's pages, freed first
    alloc.retain("conversation", b, ttl_s=10)
    alloc.free(b)
    assert alloc.num_retained == 2 and alloc.num_free == 4
    alloc.expire(time.monotonic() + 11)
    assert alloc.num_free == 6 and alloc.num_cached == 4
    assert alloc.allocate(1) == [b[1]] and alloc.allocate(1) == [b[0]]  # the stale conversation goes first
    assert alloc.cached_prefix([1, 2]) == a and alloc.cached_prefix([3]) == []
    alloc.free([b[1], b[0]])


def test_hits_equal_transformers_and_skip_the_prefix(engine, tiny_llama_gqa):
    rng = random.Random(5)
    system = [rng.randrange(8, 384) for _ in range(37)]
    prompts = [system + [rng.randrange(8, 384) for _ in range(n)] for n in (1, 3, 6, 11)]
    first = _run(engine, {"a": (prompts[0], 7)})
    computed = []
    execute = engine.runner.execute
    engine.runner.execute = lambda chunks: computed.extend(c.num_tokens for c in chunks) or execute(chunks)
    try:
        rest = _run(engine, {f"b{i}": (p, 7) for i, p in enumerate(prompts[1:])})
    finally:
        del engine.runner.execute
    got = [first["a"], *(rest[f"b{i}"] for i in range(3))]
    assert got == hf_greedy(tiny_llama_gqa, prompts, [7] * 4)
    stats = engine.allocator.stats
    assert stats.hits == 3 * (37 // PAGE) * PAGE  # each later prompt reused the system prompt's full pages
    assert stats.queries == sum(map(len, prompts))
    # Only the uncached suffixes were prefilled (then one token per step).
    assert sum(computed) == sum(len(p) - 36 for p in prompts[1:]) + 3 * 6


def test_a_prompt_found_whole_still_computes_its_last_page(engine, tiny_llama_gqa):
    prompt = list(range(10, 42))  # exactly 8 pages
    out = [_run(engine, {f"r{i}": (prompt, 5)})[f"r{i}"] for i in range(2)]
    assert out[0] == out[1] == hf_greedy(tiny_llama_gqa, [prompt], [5])[0]
    assert engine.allocator.stats.hits == 7 * PAGE


def test_sharers_abort_independently(engine, tiny_llama_gqa):
    """Requests share the prefix's pages at once; aborting one leaves the others' tokens intact."""
    prefix = list(range(50, 90))
    _run(engine, {"warm": ([*prefix, 7], 1)})
    prompts = {f"s{i}": [*prefix, 100 + i, 200 + i] for i in range(3)}
    for rid, p in prompts.items():
        engine.add_request(EngineRequest(rid, p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)))
    out = {rid: [] for rid in prompts}
    engine.step()  # all three admitted, sharing the prefix's pages
    shared = engine.scheduler.running[0].pages[0]
    assert all(r.pages[0] == shared for r in engine.scheduler.running)
    engine.abort("s1")
    del out["s1"]
    while engine.has_unfinished():
        for u in engine.step():
            out[u.request_id].append(u.token_id)
    ref = hf_greedy(tiny_llama_gqa, [prompts["s0"], prompts["s2"]], [12, 12])
    assert [[*out["s0"]], [*out["s2"]]] == [r[1:] for r in ref]  # their first tokens came from the step above


def test_eviction_under_pressure_never_fails_a_request(tiny_llama_gqa):
    page = page_bytes(ModelConfig.from_pretrained(tiny_llama_gqa), PAGE, torch.float32)
    engine = DecodeEngine(
        EngineConfig(model=str(tiny_llama_gqa), dtype="fp32", page_size=PAGE, kv_cache_memory=24 * page)
    )
    a = list(range(20, 60))  # 10 pages, all cached once it ends
    _run(engine, {"a": (a, 4)})
    assert engine.allocator.num_cached >= 10
    big = [list(range(100 + 3 * i, 150 + 3 * i)) for i in range(2)]  # 2 x 13 pages: more than is uncached
    out = _run(engine, {"x": (big[0], 30), "y": (big[1], 30)})
    assert engine.allocator.stats.evictions > 0
    assert [out["x"], out["y"]] == hf_greedy(tiny_llama_gqa, big, [30, 30])


def test_conversation_pages_kept_for_the_ttl_then_released(tiny_llama_gqa):
    cfg = EngineConfig(model=str(tiny_llama_gqa), dtype="fp32", page_size=PAGE, cache_ttl_s=60)
    engine = DecodeEngine(cfg)
    turn1 = list(range(30, 63))
    out1 = _run(engine, {"t1": (turn1, 9)}, cache_key="conv")
    alloc = engine.allocator
    assert alloc.num_retained == (33 + 9 - 1) // PAGE  # every full page of prompt and answer
    assert alloc.num_free == alloc.capacity - alloc.num_retained
    assert alloc.num_available == alloc.capacity  # retained pages give way under pressure
    turn2 = turn1 + out1["t1"] + [70, 71, 72]
    before = alloc.stats.hits
    out2 = _run(engine, {"t2": (turn2, 5)}, cache_key="conv")
    assert alloc.stats.hits - before == 10 * PAGE  # the first turn's prompt and answer, whole pages
    assert out2["t2"] == hf_greedy(tiny_llama_gqa, [turn2], [5])[0]
    alloc.expire()
    assert alloc.num_retained > 0  # not yet
    alloc.expire(time.monotonic() + 61)
    assert alloc.num_retained == 0 and alloc.num_free == alloc.capacity
    # Released, not erased: the pages stay cached until something needs them.
    assert len(alloc.cached_prefix(page_hashes(turn2, PAGE, engine.pages.root_hash))) == len(turn2) // PAGE


def test_retained_conversations_give_way_to_new_requests(tiny_llama_gqa):
    page = page_bytes(ModelConfig.from_pretrained(tiny_llama_gqa), PAGE, torch.float32)
    cfg = EngineConfig(model=str(tiny_llama_gqa), dtype="fp32", page_size=PAGE, kv_cache_memory=16 * page)
    engine = DecodeEngine(cfg)
    for i in range(3):
        _run(engine, {f"c{i}": (list(range(10 + i, 30 + i)), 4)}, cache_key=f"conv{i}")
    assert engine.allocator.num_retained == 3 * 5
    prompt = list(range(200, 250))  # 13 pages: only there if conversations let go
    out = _run(engine, {"big": (prompt, 8)})
    assert out["big"] == hf_greedy(tiny_llama_gqa, [prompt], [8])[0]
    assert engine.allocator.num_retained < 3 * 5
    engine.allocator.expire(float("inf"))


def test_decode_worker_receives_only_the_pages_it_lacks(tiny_llama_gqa):
    cfg = EngineConfig(model=str(tiny_llama_gqa), dtype="fp32", page_size=PAGE)
    prefill, decode = PrefillEngine(cfg), DecodeEngine(cfg)
    prefix = list(range(40, 80))
    _run(decode, {"warm": ([*prefix, 5, 6], 2)})
    prompt = [*prefix, 9, 9, 9]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    reserved = decode.reserve(EngineRequest("r", prompt, params))
    assert len(reserved) == -(-len(prompt) // PAGE) - 10  # the cached prefix's 10 pages are not sent
    prefill.add_request(EngineRequest("r", prompt, params))
    (done,) = prefill.step()
    decode.runner.kv_cache[reserved] = prefill.runner.kv_cache[done.request.pages[-len(reserved) :]]
    out = [decode.start_decode("r", done.token_id, None, None).token_id]
    prefill.release("r")
    while decode.has_unfinished():
        out += [u.token_id for u in decode.step()]
    assert out == hf_greedy(tiny_llama_gqa, [prompt], [6])[0]


def test_prefix_caching_off_changes_nothing_but_speed(tiny_llama_gqa):
    cfg = EngineConfig(model=str(tiny_llama_gqa), dtype="fp32", page_size=PAGE, prefix_caching=False)
    engine = DecodeEngine(cfg)
    prompt = list(range(60, 90))
    out = [_run(engine, {f"r{i}": (prompt, 4)}, cache_key="conv")[f"r{i}"] for i in range(2)]
    assert out[0] == out[1] == hf_greedy(tiny_llama_gqa, [prompt], [4])[0]
    alloc = engine.allocator
    assert alloc.stats.hits == 0 and alloc.num_cached == 0 and alloc.num_retained == 0
