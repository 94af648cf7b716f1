"""KV-aware routing and conversations across the pools: the router learns from the workers' cache events which
worker holds which prefix, places a request where most of its prompt is cached, and sends a conversation's next
turn to the decode worker that holds its previous prompt and answer, which prefills only the new tokens.
Tokens equal Hugging Face transformers' (greedy, fp32)."""

from __future__ import annotations

import random
import time

import msgspec
import pytest

from splitserve.engine.params import SamplingParams
from splitserve.engine.prefix_cache import page_hashes, reusable_pages
from splitserve.launcher import ServeProcess
from splitserve.protocol import Generate, Heartbeat, KvStats, Load, Reserve, Role
from splitserve.router.cluster.options import RouterOptions
from tests.helpers import add_fake_worker, fake_worker_info, hf_greedy, recording_cluster
from tests.test_serving import _metric

ENGINE = ["--dtype", "fp32", "--page-size", "8", "--kv-cache-memory", "8MiB", "--max-num-batched-tokens", "64"]


@pytest.fixture(scope="module")
def server(tiny_chat_llama):
    s = ServeProcess(tiny_chat_llama, ["--prefill", "1", "--decode", "2", "--cache-ttl", "600", *ENGINE], num_workers=3)
    yield s
    s.stop()


def _complete(server, prompt: list[int], max_tokens: int, **extra) -> list[int]:
    model = server.http.get("/v1/models").json()["data"][0]["id"]
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, **extra}  # fmt: skip
    r = server.http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def _by_id(server) -> dict[str, dict]:
    return {w["id"]: w for w in server.workers()}


def _settled(server) -> dict[str, dict]:
    """Workers as /health shows them once the latest heartbeats (which carry the cache counters) are in."""
    time.sleep(0.6)  # over two heartbeat intervals
    return _by_id(server)


def test_next_turn_prefills_only_its_new_tokens_where_the_conversation_is(server, tiny_chat_llama):
    rng = random.Random(7)
    system = [rng.randrange(8, 384) for _ in range(100)]
    turn1 = [*system, *(rng.randrange(8, 384) for _ in range(12))]
    answer1 = _complete(server, turn1, 20, prompt_cache_key="conversation-1")
    before = {w: d for w, d in _settled(server).items() if d["role"] == "decode"}
    held = [w for w, d in before.items() if d["retained_pages"] > 0]
    assert len(held) == 1, before  # the decode worker that ran turn 1 keeps its pages for turn 2
    health = server.health()
    assert health["routing"]["local_prefills"] == 0

    turn2 = [*turn1, *answer1, *(rng.randrange(8, 384) for _ in range(9))]
    answer2 = _complete(server, turn2, 10, prompt_cache_key="conversation-1")
    assert [answer1, answer2] == hf_greedy(tiny_chat_llama, [turn1, turn2], [20, 10])
    after = _settled(server)
    routing = server.health()["routing"]
    assert routing["local_prefills"] == 1 and routing["prefix_routed"] >= 1
    # Turn 2 ran where turn 1 did, and found its whole earlier prompt and answer cached there.
    new_hits = after[held[0]]["prefix_cache_hits"] - before[held[0]]["prefix_cache_hits"]
    assert new_hits == reusable_pages(len(turn1) + len(answer1), 8) * 8
    text = server.http.get("/metrics").text
    assert _metric(text, "splitserve_prefix_cache_hits_total") >= new_hits
    assert _metric(text, "splitserve_router_local_prefills_total") == 1
    assert _metric(text, "splitserve_worker_cached_pages") > 0


def test_shared_system_prompt_is_computed_once_per_worker(server, tiny_chat_llama):
    rng = random.Random(8)
    system = [rng.randrange(8, 384) for _ in range(120)]
    prompts = [[*system, *(rng.randrange(8, 384) for _ in range(5 + i))] for i in range(4)]
    prefill_id = server.workers("prefill")[0]["id"]
    hits_before = _settled(server)[prefill_id]["prefix_cache_hits"]
    outs = [_complete(server, p, 6) for p in prompts]
    assert outs == hf_greedy(tiny_chat_llama, prompts, [6] * 4)
    hits = _settled(server)[prefill_id]["prefix_cache_hits"] - hits_before
    # Each request after the first found the system prompt's 15 full pages on the prefill worker (a decode
    # worker holds them too, but with the same work left there the prefill pool keeps the prompt).
    assert hits == 3 * (120 // 8) * 8


# --- the placement policy, on a router with fake workers ------------------------------------------------


@pytest.fixture
def router():
    with recording_cluster(RouterOptions(model="m")) as r:
        yield r


def test_routing_prefers_the_worker_holding_the_prefix(router):
    cluster, sent = router
    a, b = add_fake_worker(cluster, "a", Role.BOTH), add_fake_worker(cluster, "b", Role.BOTH, free_pages=90)
    prompt = list(range(200))
    cluster.prefix_index.apply("b", page_hashes(prompt, 8, b.root_hash)[:20], [])
    cluster.submit(prompt, SamplingParams())
    assert sent[-1][0] == "b"  # busier, but holds 160 of the 200 tokens
    cluster.submit(list(range(500, 700)), SamplingParams())
    assert sent[-1][0] == "a"  # nothing cached anywhere: the less loaded one
    assert cluster.stats.prefix_routed == 1 and cluster.stats.prefix_routed_tokens == 160
    assert a.jobs and b.jobs


def test_a_decode_worker_prefills_locally_only_a_short_uncached_suffix(router):
    cluster, sent = router
    add_fake_worker(cluster, "p", Role.PREFILL)
    d = add_fake_worker(cluster, "d", Role.DECODE)
    prompt = list(range(300))
    hashes = page_hashes(prompt, 8, d.root_hash)
    cluster.prefix_index.apply("d", hashes[:30], [])  # 240 cached: 60 to compute
    cluster.submit(prompt, SamplingParams())
    assert sent[-1][0] == "d" and isinstance(sent[-1][1], Generate)
    assert cluster.stats.local_prefills == 1
    cluster.prefix_index.apply("d", [], hashes[5:30])  # only 40 cached: 260 is beyond the 256-token limit
    cluster.submit(prompt, SamplingParams())
    assert isinstance(sent[-1][1], Reserve)
    cluster.prefix_index.apply("p", hashes[:35], [])  # the prefill worker holds more than the decode worker
    cluster.prefix_index.apply("d", hashes[5:30], [])
    cluster.submit(prompt, SamplingParams())
    assert isinstance(sent[-1][1], Reserve) and cluster.stats.local_prefills == 1


def test_the_index_is_bounded_and_forgets_removed_workers(router):
    cluster, _ = router
    add_fake_worker(cluster, "a", Role.BOTH)
    cluster.prefix_index.apply("a", list(range(1000)), [])
    assert cluster.prefix_index.num_pages("a") == 100  # never more hashes than the worker has pages
    assert cluster.prefix_index.matched_pages("a", [950, 951, 7]) == 2
    cluster._remove_worker("a", "it shut down")
    assert cluster.prefix_index.num_pages("a") == 0


def test_the_index_holds_what_a_worker_keeps_in_its_offload_tier(router):
    """A worker with an offload tier keeps more cached pages than its pool has (the tier's are not reported
    removed): the index must not forget its oldest, the shared system prompt's first pages, which every
    conversation's match starts from."""
    cluster, _ = router
    info = msgspec.structs.replace(fake_worker_info("d", Role.DECODE), offload_pages=300)
    cluster._heartbeat(Heartbeat(info, Load(100, 0, 0, 0), KvStats(), 0.0))
    cluster.prefix_index.apply("d", list(range(400)), [])
    assert cluster.prefix_index.num_pages("d") == 400
    assert cluster.prefix_index.matched_pages("d", [0, 1, 2, 999]) == 3
    cluster.prefix_index.apply("d", [400], [])
    assert cluster.prefix_index.matched_pages("d", [0, 1, 2]) == 0  # past both, events were lost: the oldest go


def test_a_burst_spreads_before_any_load_report(router):
    """Batch slots count the moment a request is placed: a burst does not all land on one worker while the
    workers' page counts are still those of their last message."""
    cluster, sent = router
    add_fake_worker(cluster, "a", Role.BOTH)
    add_fake_worker(cluster, "b", Role.BOTH)
    for i in range(6):
        cluster.submit(list(range(100 * i, 100 * i + 50)), SamplingParams())
    assert sorted(w for w, _ in sent) == ["a"] * 3 + ["b"] * 3


def test_prefix_affinity_gives_way_when_the_placed_load_outweighs_the_cached_tokens(router):
    """Two decode workers of 64 batch slots, one holding 240 of each prompt's 300 tokens: a burst of six does
    not all go to it (the router counts the pages of what it placed, before any report), each takes a share,
    and each burst again after the first's end spreads too."""
    cluster, sent = router
    add_fake_worker(cluster, "p", Role.PREFILL)
    workers = [add_fake_worker(cluster, name, Role.DECODE) for name in ("a", "b")]
    for w in workers:
        w.info = msgspec.structs.replace(w.info, max_num_seqs=64)
    shared = list(range(240))
    cluster.prefix_index.apply("a", page_hashes(shared, 8, workers[0].root_hash), [])
    for burst in range(3):
        sent.clear()
        for i in range(6):
            cluster.submit(shared + [1000 + 60 * i + j for j in range(60)], SamplingParams())
        placed = [w for w, m in sent if isinstance(m, (Reserve, Generate))]  # local prefills where it caches
        assert len(placed) == 6 and 2 <= placed.count("a") <= 4, (burst, placed)
        for w in workers:  # the burst ends
            for wire_id in list(w.jobs):
                w.drop(wire_id)


def test_a_large_pool_weighs_a_shortlist_the_prefix_holders_and_a_few_drawn_at_random(router, monkeypatch):
    """64 colocated workers: a request weighs a shortlist, not every worker (the same cost at 1,024 workers as
    at 8): the worker holding its prompt's prefix gets it, and a burst without one spreads (drawn at random,
    the least loaded of the draw taken)."""
    from splitserve.router.cluster import placement

    cluster, sent = router
    workers = [add_fake_worker(cluster, f"w{i}", Role.BOTH) for i in range(64)]
    weighed = []
    cost = cluster.placement.cost
    monkeypatch.setattr(cluster.placement, "cost", lambda w, job: weighed.append(w) or cost(w, job))
    shared = list(range(240))
    cluster.prefix_index.apply("w37", page_hashes(shared, 8, workers[0].root_hash), [])
    cluster.submit([*shared, 7, 8, 9], SamplingParams())
    assert sent[-1][0] == "w37"
    assert len(weighed) <= placement.SAMPLED + placement.PREFIX_HOLDERS
    weighed.clear()
    for i in range(128):
        cluster.submit([5000 + 60 * i + j for j in range(60)], SamplingParams())
    assert len(weighed) <= 128 * placement.SAMPLED
    counts = [len(w.jobs) for w in workers]
    assert max(counts) <= 5 and sum(counts) == 129, counts  # two each on average: no worker piles up
