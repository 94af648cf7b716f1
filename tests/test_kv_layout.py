"""The KV layout: sliding-window layers keep rings of pages of their own, so a long request holds pages for its
window rather than for every position, and its tokens still equal transformers'."""

from __future__ import annotations

import math
import random
import time

import pytest

from splitserve.bench.metrics import prometheus_total
from splitserve.decode.engine import DecodeEngine
from splitserve.engine.config import EngineConfig
from splitserve.engine.kv_layout import KVLayout
from splitserve.engine.params import SamplingParams
from splitserve.engine.request import EngineRequest
from splitserve.kernels import kv_format
from splitserve.launcher import ServeProcess
from tests.helpers import hf_greedy, run_staggered
from tests.test_serving import complete

GEMMA3_270M = tuple(0 if layer % 6 == 5 else 512 for layer in range(18))  # a global layer in six, window 512


def test_a_model_without_windows_keeps_one_page_per_position_for_every_layer():
    layout = KVLayout.for_model((), 30, 16, 8192)
    assert layout == KVLayout.single(30) and not layout.has_rings
    assert layout.num_pages(7) == 7 and layout.tables([4, 9, 2], 2) == [[4, 9]]
    # a window longer than any context: nothing to save, one group
    assert KVLayout.for_model((0, 4096, 4096), 3, 16, 2048) == KVLayout.single(3)


def test_gemma3_layers_go_to_a_full_group_and_five_rings():
    layout = KVLayout.for_model(GEMMA3_270M, 18, 16, 32768)
    assert (layout.layers_per_page, layout.num_full, layout.num_groups) == (3, 1, 6)
    assert layout.ring_pages == math.ceil(511 / 16) + 1 == 33  # the pages 512 consecutive positions can touch
    assert [layout.slots[layer] for layer in (5, 11, 17)] == [(0, 0), (0, 1), (0, 2)]
    assert sorted(layout.slots) == [(g, s) for g in range(6) for s in range(3)]  # 15 sliding layers: no padding
    # 8k tokens: 512 pages of the global layers, 33 of each ring: about a sixth of the KV past the rings
    assert layout.num_pages(512) == 512 + 5 * 33 < 6 * 512
    assert (
        layout.max_logical(layout.num_pages(512)) == 512
        and layout.max_logical(6 * 30) == 30
        and layout.max_logical(300) == 33 + 300 - 6 * 33
    )


def test_a_model_whose_every_layer_slides_holds_one_ring():
    """Mistral (window 4096 on all 32 layers): one group, a ring; a request holds the ring at most, at any length."""
    layout = KVLayout.for_model((4096,) * 32, 32, 16, 32768)
    assert (layout.num_full, layout.num_groups, layout.layers_per_page, layout.ring_pages) == (0, 1, 32, 257)
    assert layout.num_pages(2048) == 257 and layout.num_pages(100) == 100
    assert layout.tables(list(range(257)), 700)[0] == [i % 257 for i in range(700)]
    assert layout.max_logical(256) == 256 and layout.max_logical(257) > 2048


@pytest.mark.parametrize("logical", [1, 5, 33, 34, 300])
def test_every_page_of_a_request_is_in_one_table_and_rings_repeat(logical):
    layout = KVLayout.for_model(GEMMA3_270M, 18, 16, 32768)
    pages = list(range(1000, 1000 + layout.num_pages(logical)))
    tables = layout.tables(pages, logical)
    assert len(tables) == 6 and all(len(t) == logical for t in tables)
    assert len(set(tables[0])) == logical  # the global layers: a page per logical page
    held = set(tables[0])
    for ring in tables[1:]:
        assert ring == [ring[i % 33] for i in range(logical)] and len(set(ring)) == min(logical, 33)
        held |= set(ring)
    assert held == set(pages)  # each page belongs to one group
    # the list grows at its end: a longer request's first pages keep their places
    longer = layout.tables([*pages, *range(5000, 5000 + layout.num_pages(logical + 1) - len(pages))], logical + 1)
    assert [t[:logical] for t in longer] == tables


def test_a_window_of_positions_falls_in_distinct_ring_slots():
    """What a ring holds: the last `window` positions before any query (its own included), each in its own slot,
    for any page size."""
    for window, page_size in ((512, 16), (8, 8), (9, 8), (7, 4), (4096, 16)):
        layout = KVLayout.for_model((window, 0), 2, page_size, 1 << 20)
        for position in range(0, 3 * window + 5 * page_size):
            pages = range(max(position - window + 1, 0) // page_size, position // page_size + 1)
            assert len({p % layout.ring_pages for p in pages}) == len(pages)
        assert layout.ring_pages == math.ceil((window - 1) / page_size) + 1  # and not one page more


def test_a_long_request_holds_pages_for_its_window_and_matches_transformers(tiny_gemma3):
    """tiny_gemma3 (window 8; sliding, global, sliding layers), 8-token pages: a ring of 2 pages. Prompts far
    longer than that, in 16-token passes, with long outputs: greedy tokens equal transformers', each request
    holds a page per position for the global layer and 2 for each sliding one, and all pages come back."""
    engine = DecodeEngine(EngineConfig(model=str(tiny_gemma3), dtype="fp32", page_size=8, max_num_batched_tokens=16))
    layout = engine.runner.kv_layout
    assert layout.has_rings and layout.ring_pages == 2 and layout.num_groups == 3
    assert not engine.allocator.prefix_caching  # ring pages are rewritten: nothing to reuse
    rng = random.Random(4)
    prompts = [[rng.randrange(8, 384) for _ in range(n)] for n in (5, 40, 70)]
    max_tokens = [30, 25, 40]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in max_tokens]
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(EngineRequest(str(i), prompt, p))
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    longest = 0
    while engine.has_unfinished():
        for update in engine.step():
            outputs[update.request_id].append(update.token_id)
        for request in engine.scheduler.running:  # pages for the positions computed so far, and no more
            logical = math.ceil(request.num_computed_tokens / 8)
            assert len(request.pages) == logical + 2 * min(logical, 2)
            longest = max(longest, logical)
    assert [outputs[str(i)] for i in range(len(prompts))] == hf_greedy(tiny_gemma3, prompts, max_tokens)
    assert longest > 4 * 2  # well past the rings
    assert engine.allocator.num_free == engine.allocator.capacity


def test_the_compatibility_key_names_the_layout(tiny_gemma3, tiny_llama_gqa):
    """Pools must agree on the layers a page holds and the rings (their page lists map to positions alike only
    then); a model without windows sends what a peer from before layouts sends."""

    def key(model, page_size):
        return DecodeEngine(EngineConfig(model=str(model), dtype="fp32", page_size=page_size)).compat_key

    gemma = key(tiny_gemma3, 8)
    assert (gemma.layers_per_page, gemma.ring_pages, gemma.page_layers) == (1, 2, 1)
    assert "ring_pages: 2 here, 3 there" in gemma.mismatch(key(tiny_gemma3, 4))
    llama = key(tiny_llama_gqa, 8)
    assert (llama.layers_per_page, llama.ring_pages, llama.page_layers) == (0, 0, 2)


@pytest.mark.slow
def test_served_pools_move_ring_pages_as_they_are(tiny_chat_gemma3):
    """1P+1D over UCX with a windowed model: the prefill worker sends the request's page list (the global layer's
    pages and the rings) whole, not streamed; the decode worker continues from it with the colocated engine's
    tokens, for prompts longer than the rings, and every page comes back on both workers."""
    args = ["--prefill", "1", "--decode", "1", "--dtype", "fp32", "--page-size", "8",
            "--max-num-batched-tokens", "16"]  # fmt: skip
    rng = random.Random(9)
    prompts = [[rng.randrange(100, 40000) for _ in range(n)] for n in (20, 61, 90)]
    local = DecodeEngine(EngineConfig(model=str(tiny_chat_gemma3), dtype="fp32", page_size=8,
                                      max_num_batched_tokens=16))  # fmt: skip
    layout = local.runner.kv_layout
    assert layout.has_rings and layout.ring_pages == 2
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    want, _ = run_staggered(local, prompts, [params] * len(prompts), [0] * len(prompts))
    server = ServeProcess(tiny_chat_gemma3, args, num_workers=2)
    try:
        model = server.http.get("/v1/models").json()["data"][0]["id"]
        for prompt, tokens in zip(prompts, want, strict=True):
            body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
            assert complete(server.http, "/v1/completions", body)[1] == tokens
        server.wait_idle(timeout=10)
        health = server.http.get("/health").json()
        prefill = [w for w in health["workers"] if w["role"] == "prefill"]
        assert sum(w["kv_messages_streamed"] for w in prefill) == 0
        pages = sum(layout.num_pages(math.ceil(len(p) / 8)) for p in prompts)
        page_bytes = kv_format.pages(local.runner.kv_cache).shape[1]
        sent = 0.0
        for _ in range(20):  # the workers' next heartbeats carry their counters
            sent = prometheus_total(server.http.get("/metrics").text, "splitserve_kv_bytes_sent_total")
            if sent == pages * page_bytes:
                break
            time.sleep(0.3)
        assert sent == pages * page_bytes
    finally:
        server.stop()
