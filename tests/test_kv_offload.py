"""The KV offload tier: cached pages the pool overwrites are copied out (host memory, then disk), byte-exact,
bounded, and copied back when a prompt continues them; a conversation whose pages went there answers as
transformers does, computing only what the tier did not hold; nothing leaks (pages, slots, files)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time

import pytest
import torch

from splitserve.bench.metrics import prometheus_total
from splitserve.decode.engine import DecodeEngine
from splitserve.engine.config import EngineConfig
from splitserve.engine.kv_cache import page_bytes
from splitserve.engine.kv_offload import OffloadTier
from splitserve.launcher import ServeProcess
from splitserve.model.config import ModelConfig
from tests.helpers import hf_greedy
from tests.test_prefix_cache import PAGE, _run
from tests.test_serving import complete


def _pool(pages: int = 8) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(pages, 2, 2, PAGE, 2, 4).to(torch.bfloat16)  # bf16: the bytes must survive as they are


def test_pages_go_to_memory_then_disk_then_away_and_come_back_byte_exact(tmp_path):
    pool = _pool()
    page = pool[0].numel() * pool.element_size()
    tier = OffloadTier(pool, 2 * page, tmp_path, 3 * page)
    dropped: list[int] = []
    tier.on_drop = dropped.append
    originals = {h: pool[h].clone() for h in range(6)}
    for h in range(6):  # hash h names the content of page h
        assert tier.store(100 + h, h)
    # The two most recent in memory, the three before on disk, the first dropped.
    assert tier.num_pages == 5 and dropped == [100] and 100 not in tier
    files = list(next(tmp_path.iterdir()).iterdir())
    assert len(files) == 3 and all(f.stat().st_size == page for f in files)
    pool.zero_()
    for h in range(1, 6):
        assert tier.load(100 + h, h)
        assert torch.equal(pool[h].view(torch.int16), originals[h].view(torch.int16))
    assert not tier.load(100, 0)
    assert tier.stats.stored == 6 and tier.stats.loaded == 5
    assert tier.stats.bytes_written == 6 * page + 4 * page  # every store, and every spill from memory to disk
    # prefix() counts a run from the start, and makes it most recently used.
    assert tier.prefix([103, 104, 100, 105]) == 2
    assert tier.store(103, 3) and tier.stats.stored == 6  # content already held: no copy


def test_a_tier_with_no_room_is_refused(tmp_path):
    with pytest.raises(ValueError, match="holds no page"):
        OffloadTier(_pool(), 10)


def test_the_disk_folder_goes_with_the_tier_and_orphans_are_removed(tmp_path):
    pool = _pool()
    page = pool[0].numel() * pool.element_size()
    # A worker killed with its folder in place: the next tier in that folder removes it.
    code = (f"import torch, os; from splitserve.engine.kv_offload import OffloadTier; "
            f"t = OffloadTier(torch.zeros(2, 8, dtype=torch.uint8), 0, {str(tmp_path)!r}, 64); t.store(1, 0); "
            f"os._exit(0)")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)
    (orphan,) = tmp_path.iterdir()
    tier = OffloadTier(pool, 0, tmp_path, 2 * page)
    tier.store(7, 0)
    (mine,) = tmp_path.iterdir()
    assert mine != orphan and mine.name.startswith(f"splitserve-kv-{os.getpid()}-")
    del tier
    gc.collect()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_a_conversation_pushed_out_of_the_pool_comes_back_from_the_tier(tiny_llama_gqa, tmp_path, where):
    """Turn 1 of a conversation, then other work that needs every page; turn 2 copies the history back from
    the tier instead of computing it, and its tokens equal transformers'."""
    page = page_bytes(ModelConfig.from_pretrained(tiny_llama_gqa), PAGE, torch.float32)
    tier = {"kv_offload_memory": 64 * page} if where == "memory" else {"kv_offload_dir": str(tmp_path),
                                                                        "kv_offload_size": 64 * page}  # fmt: skip
    engine = DecodeEngine(EngineConfig(model=str(tiny_llama_gqa), dtype="fp32", page_size=PAGE,
                                       kv_cache_memory=24 * page, cache_ttl_s=60, **tier))  # fmt: skip
    turn1 = list(range(30, 63))
    out1 = _run(engine, {"t1": (turn1, 7)}, cache_key="conv")["t1"]
    history_pages = (len(turn1) + len(out1) - 1) // PAGE
    others = [list(range(100 + 3 * i, 160 + 3 * i)) for i in range(2)]  # 2 x 15 pages: the pool must give all up
    _run(engine, {"x": (others[0], 20), "y": (others[1], 20)})
    alloc, offload = engine.allocator, engine.pages.offload
    assert alloc.stats.evictions >= history_pages and offload.stats.stored >= history_pages
    turn2 = [*turn1, *out1, 70, 71, 72]
    hits, loaded = alloc.stats.hits, offload.stats.loaded
    out2 = _run(engine, {"t2": (turn2, 6)}, cache_key="conv")["t2"]
    assert offload.stats.loaded - loaded == history_pages  # the history came back, none of it computed
    assert alloc.stats.hits - hits == history_pages * PAGE
    assert out2 == hf_greedy(tiny_llama_gqa, [turn2], [6])[0]
    alloc.expire(float("inf"))


def test_an_int8_conversation_comes_back_from_the_tier_with_its_scales(tiny_llama_gqa):
    """An int8 cache's pages carry their scales: turn 2 over a history the tier gave back answers as turn 2 over
    the same history kept in a pool big enough to keep it (the same bytes read, so the same tokens)."""
    page = page_bytes(ModelConfig.from_pretrained(tiny_llama_gqa), PAGE, torch.int8)
    turn1 = list(range(30, 63))
    outs = {}
    for pool, tier in ((24, 64), (200, 0)):
        engine = DecodeEngine(EngineConfig(model=str(tiny_llama_gqa), dtype="fp32", kv_dtype="int8", page_size=PAGE,
                                           kv_cache_memory=pool * page, cache_ttl_s=60,
                                           kv_offload_memory=tier * page))  # fmt: skip
        out1 = _run(engine, {"t1": (turn1, 7)}, cache_key="conv")["t1"]
        _run(engine, {"x": (list(range(100, 160)), 20), "y": (list(range(103, 163)), 20)})
        turn2 = [*turn1, *out1, 70, 71, 72]
        offload = engine.pages.offload
        loaded = offload.stats.loaded if offload else 0
        outs[tier] = _run(engine, {"t2": (turn2, 12)}, cache_key="conv")["t2"]
        assert (offload.stats.loaded - loaded if offload else 0) == (len(turn2) - 3 - 1) // PAGE * bool(tier)
        assert offload is None or offload.page_bytes == page
        engine.allocator.expire(float("inf"))
    assert outs[64] == outs[0]


def test_without_the_tier_the_same_turn_computes_its_history(tiny_llama_gqa):
    """The baseline the tier is measured against: the same sequence, no tier, no hits for turn 2."""
    page = page_bytes(ModelConfig.from_pretrained(tiny_llama_gqa), PAGE, torch.float32)
    engine = DecodeEngine(EngineConfig(model=str(tiny_llama_gqa), dtype="fp32", page_size=PAGE,
                                       kv_cache_memory=24 * page, cache_ttl_s=60))  # fmt: skip
    turn1 = list(range(30, 63))
    out1 = _run(engine, {"t1": (turn1, 7)}, cache_key="conv")["t1"]
    _run(engine, {"x": (list(range(100, 160)), 20), "y": (list(range(103, 163)), 20)})
    hits = engine.allocator.stats.hits
    turn2 = [*turn1, *out1, 70, 71, 72]
    assert _run(engine, {"t2": (turn2, 6)}, cache_key="conv")["t2"] == hf_greedy(tiny_llama_gqa, [turn2], [6])[0]
    assert engine.allocator.stats.hits == hits and engine.pages.offload is None
    engine.allocator.expire(float("inf"))


def test_served_conversations_come_back_from_the_tier_and_metrics_count_it(tiny_chat_llama):
    """`serve` (1P+1D) with a pool of 32 pages and an offload tier: a conversation's second turn, after work
    that filled both pools, is copied back, answers as transformers does, and /metrics says so."""
    args = ["--prefill", "1", "--decode", "1", "--dtype", "fp32", "--page-size", "8", "--kv-cache-memory", "128KiB",
            "--kv-offload-memory", "1MiB", "--max-num-batched-tokens", "64"]  # fmt: skip
    server = ServeProcess(tiny_chat_llama, args, num_workers=2)
    try:
        model = server.http.get("/v1/models").json()["data"][0]["id"]
        body = {"model": model, "temperature": 0, "ignore_eos": True, "prompt_cache_key": "conv"}
        turn1 = list(range(300, 360))
        _, out1, _ = complete(server.http, "/v1/completions", {**body, "prompt": turn1, "max_tokens": 20})
        for i in range(3):  # 25 pages each, on both workers: the conversation's pages must go
            other = {"model": model, "prompt": list(range(1000 + i, 1200 + i)), "max_tokens": 2}
            assert server.http.post("/v1/completions", json=other).status_code == 200
        turn2 = [*turn1, *out1, 5, 6, 7]
        _, out2, _ = complete(server.http, "/v1/completions", {**body, "prompt": turn2, "max_tokens": 8})
        assert out2 == hf_greedy(tiny_chat_llama, [turn2], [8])[0]
        server.wait_idle(timeout=5)
        time.sleep(0.6)  # the workers' next heartbeats carry their counters
        text = server.http.get("/metrics").text
        # The history's full pages came back on the decode worker: the router, which knows that its tier keeps
        # them though its pool (32 pages) was filled three times over since, had it prefill turn 2 itself.
        loaded = prometheus_total(text, "splitserve_offload_pages_loaded_total", 'role="decode"')
        assert loaded >= (len(turn1) + len(out1) - 1) // 8, loaded
        assert prometheus_total(text, "splitserve_router_local_prefills_total") == 1
        assert prometheus_total(text, "splitserve_offload_bytes_read_total") > 0
        assert prometheus_total(text, "splitserve_worker_offloaded_pages") > 0
    finally:
        server.stop()
