"""The planner: profiles measured with the real engine, the simulator on cases with known answers, and
recommendations (including none when the SLO cannot be met)."""

from __future__ import annotations

import dataclasses

import pytest

from splitserve.bench.metrics import summarize
from splitserve.bench.workloads import LengthDist, Phase
from splitserve.engine.config import EngineConfig
from splitserve.planner import plan as planner
from splitserve.planner.link import LOOPBACK, Link, learned, parse_rate
from splitserve.planner.link import resolve as resolve_link
from splitserve.planner.profile import Profile, measure
from splitserve.planner.simulator import Hardware, SimRequest, SimRouter, sample_phases, simulate
from splitserve.router.cluster.policy import PolicyOptions
from splitserve.slo import SLO

# A hand-made profile: prefill 10 ms + 1 ms/token; decode 20 ms + 2 ms per request + 0.01 ms per context token.
PROFILE = Profile(
    model="m", dtype="bfloat16", threads=1, page_size=16, max_num_batched_tokens=512, max_num_seqs=8,
    kv_bytes_per_token=1000,
    prefill=[(16, 0.026), (512, 0.522)],
    decode=[(b, c, 0.020 + 0.002 * b + 0.00001 * b * c) for b in (1, 2, 4, 8) for c in (64, 256, 1024)],
    link_bandwidth=float("inf"),
)  # fmt: skip
IDEAL = Hardware(cores=64, hop_s=0.0)


def test_profile_interpolates_and_fits():
    assert PROFILE.prefill_time(16) == pytest.approx(0.026)
    assert PROFILE.prefill_time(264) == pytest.approx(0.274)  # between points
    assert PROFILE.prefill_time(1024) == pytest.approx(1.034)  # beyond: the last slope
    assert PROFILE.decode_time(3, 500) == pytest.approx(0.020 + 0.006 + 0.015)


def test_idle_system_ttft_is_the_prefill_time_and_tpot_the_step_time():
    [r] = simulate(PROFILE, IDEAL, 1, 1, [SimRequest(1.0, 200, 5)])
    ttft = r.chunk_times[0] - r.sent
    assert ttft == pytest.approx(PROFILE.prefill_time(200))
    gaps = [b - a for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    contexts = [201, 202, 203, 204]  # the step that makes token k sees the prompt and k-1 tokens before it
    assert gaps == pytest.approx([PROFILE.decode_time(1, c) for c in contexts])


def test_latencies_add_up_with_hops_and_transfer():
    hw = Hardware(cores=64, hop_s=0.001)
    profile = PROFILE.over(Link(1e6, "test", delay_s=0.05))
    [r] = simulate(profile, hw, 1, 1, [SimRequest(0.0, 100, 1)])
    # arrival hop, reserve + prefill hops, prefill, link delay + KV (100 tokens x 1000 B at 1 MB/s), landing,
    # first token.
    assert r.chunk_times[0] == pytest.approx(0.001 + 0.002 + PROFILE.prefill_time(100) + 0.05 + 0.1 + 0.001 + 0.001)
    [colocated] = simulate(profile, hw, 0, 1, [SimRequest(0.0, 100, 1)])
    assert colocated.chunk_times[0] == pytest.approx(0.001 + 0.001 + PROFILE.prefill_time(100) + 0.001)  # no KV moves


def test_a_chunked_prompts_kv_streams_while_its_next_chunk_computes():
    hw = Hardware(cores=64, hop_s=0.0)
    profile = PROFILE.over(Link(1e6, "test", delay_s=0.05))  # 1 ms a token's 1,000 bytes
    [r] = simulate(profile, hw, 1, 1, [SimRequest(0.0, 1000, 1)])
    first, second = PROFILE.prefill_time(512), PROFILE.prefill_time(488)  # 0.522 s, 0.498 s
    # the first chunk's 512 tokens cross (0.512 s) while the second computes (0.498 s); then the second's
    assert r.chunk_times[0] == pytest.approx(first + max(second, 0.512) + 0.488 + 0.05)


def test_prompts_share_a_prefill_pass_and_decode_steps_batch():
    a, b = simulate(PROFILE, IDEAL, 1, 1, [SimRequest(0.0, 100, 3), SimRequest(0.0, 100, 3)])
    assert a.chunk_times[0] == pytest.approx(PROFILE.prefill_time(200))  # one pass of both prompts
    assert b.chunk_times[0] == pytest.approx(a.chunk_times[0])
    assert a.chunk_times[1] - a.chunk_times[0] == pytest.approx(PROFILE.decode_time(2, 101))


def test_a_long_prompt_is_prefilled_in_chunks_behind_the_budget():
    [r] = simulate(PROFILE, IDEAL, 1, 1, [SimRequest(0.0, 1000, 1)])
    assert r.chunk_times[0] == pytest.approx(PROFILE.prefill_time(512) + PROFILE.prefill_time(488))


def test_slowdown_from_the_measured_contention():
    assert PROFILE.slowdown(busy=8, cores=8) == 1  # no pair slowdown measured: free until the cores run out
    assert PROFILE.slowdown(busy=12, cores=8) == 1.5
    slow = dataclasses.replace(PROFILE, pair_slowdown=1.6)
    assert slow.slowdown(busy=1, cores=2) == 1
    assert slow.slowdown(busy=2, cores=2) == pytest.approx(1.6)
    assert slow.slowdown(busy=3, cores=2) == pytest.approx(2.2)


def test_contention_when_workers_outnumber_cores():
    one_core = Hardware(cores=1, hop_s=0.0)
    # Two prefill workers busy at once on one core: the second pass to start takes twice as long.
    a, b = simulate(PROFILE, one_core, 2, 1, [SimRequest(0.0, 100, 1), SimRequest(0.0, 100, 1)])
    assert sorted([a.chunk_times[0], b.chunk_times[0]]) == pytest.approx(
        [PROFILE.prefill_time(100), 2 * PROFILE.prefill_time(100)]
    )


def test_decode_queue_bounds_the_batch():
    requests = [SimRequest(0.0, 10, 50) for _ in range(12)]  # 12 requests, 8 batch slots
    records = simulate(PROFILE, IDEAL, 1, 1, requests)
    assert all(r.output_tokens == 50 for r in records)
    first_tokens = sorted(r.chunk_times[0] for r in records)
    assert first_tokens[8] > first_tokens[7] + 40 * PROFILE.decode_time(1, 10)  # the last 4 waited for room


def test_the_simulated_router_prefills_short_prompts_on_their_decode_worker():
    requests = [SimRequest(0.0, 2000, 2), SimRequest(0.1, 50, 2)]  # a short prompt behind a long one
    fixed = simulate(PROFILE, IDEAL, 1, 1, requests)
    router = SimRouter(SLO(ttft=10.0, tpot=0.1), local_prefill_tokens=64, policy=None)
    conditional = simulate(PROFILE, IDEAL, 1, 1, requests, router)
    assert fixed[1].chunk_times[0] > 2.0  # it waited for the prefill pool's long prompt
    # its decode worker prefilled it at once, in a step of its own (the long prompt is still in the pool)
    assert conditional[1].chunk_times[0] - 0.1 == pytest.approx(PROFILE.prefill_time(50))
    assert conditional[0].chunk_times[0] < fixed[0].chunk_times[0]  # the pool's pass no longer carries it
    # no prefill worker at all: decode workers prefill everything, with or without an SLO
    [alone] = simulate(PROFILE, IDEAL, 0, 1, [SimRequest(0.0, 300, 2)])
    assert alone.chunk_times[0] == pytest.approx(PROFILE.prefill_time(300))


def test_the_simulated_router_moves_an_idle_prefill_worker_to_the_decode_pool():
    # Long answers at 1.2 req/s: one decode worker's 8 slots serve about 0.8 req/s, two serve 1.6.
    requests = sample_phases([Phase(120, 1.2, LengthDist("fixed:64"), LengthDist("fixed:200"))], seed=1)
    slo = SLO(ttft=2.0, tpot=0.1)
    switches: list = []
    policy = PolicyOptions(window_s=5, dwell_s=10)
    adaptive = simulate(PROFILE, IDEAL, 1, 1, requests, SimRouter(slo, policy=policy), switches)
    fixed = simulate(PROFILE, IDEAL, 1, 1, requests)
    assert [what for _, what in switches] == ["prefill->decode"]  # and no flapping back
    assert 10 < switches[0][0] < 40  # two windows agreed, then the worker drained
    attained = [summarize(r, 120, slo)["slo_attainment"] for r in (fixed, adaptive)]
    assert attained[1] > 1.3 * attained[0], attained
    fixed_split = simulate(PROFILE, IDEAL, 1, 1, requests, SimRouter(slo, policy=None), switches)
    assert len(switches) == 1 and summarize(fixed_split, 120, slo)["slo_attainment"] < attained[1]


def test_plan_recommends_and_says_when_nothing_meets_the_slo():
    workload = planner.Workload(LengthDist("uniform:50,300"), LengthDist("uniform:10,40"), num_requests=200)
    results = planner.plan({2: PROFILE, 3: PROFILE}, 8, 2.0, workload, SLO(ttft=1.0, tpot=0.1))
    assert [r.name for r in results] == ["2xboth", "1P:1D", "3xboth", "1P:2D", "2P:1D"]
    chosen, text = planner.recommend(results, 2.0, 0.9)
    assert chosen is not None and text.startswith("Recommended")
    assert chosen.goodput_per_worker == max(r.goodput_per_worker for r in results if r.at_rate["slo_attainment"] >= 0.9)
    impossible = planner.plan({2: PROFILE}, 8, 2.0, workload, SLO(ttft=0.001))
    chosen, text = planner.recommend(impossible, 2.0, 0.9)
    assert chosen is None and text.startswith("No split meets") and impossible[0].max_rate == 0
    assert "1P:1D" in planner.format_table(results, 2.0)


def test_plan_advises_disaggregation_only_where_the_link_pays_for_it():
    # Prompts of 400 tokens, answers of 100, under a tight TPOT: colocated, each prompt's prefill stalls its
    # worker's decode steps; split, its 400 kB of KV crosses the link after the prefill.
    workload = planner.Workload(LengthDist("fixed:400"), LengthDist("fixed:100"), num_requests=150)
    slo = SLO(ttft=2.0, tpot=0.05)
    verdicts = {}
    for rate in ("10gbit", "1mbit"):
        link = resolve_link(rate)
        results = planner.plan({2: PROFILE.over(link), 3: PROFILE.over(link)}, 8, 1.0, workload, slo)
        chosen, _ = planner.recommend(results, 1.0, 0.9)
        verdicts[rate] = (chosen.colocated, planner.link_verdict(results, link.describe()))
        split = [r for r in results if not r.colocated]
        # the split's TTFT carries the transfer: 400 kB is 0.32 ms at 10 Gbit/s, 3.2 s at 1 Mbit/s
        assert min(r.at_rate["p50_ttft"] for r in split) > {"10gbit": 0.4, "1mbit": 3.6}[rate]
    assert verdicts["10gbit"][0] is False and "disaggregation pays" in verdicts["10gbit"][1]
    assert verdicts["1mbit"][0] is True and "does not pay" in verdicts["1mbit"][1]


def test_a_link_is_named_or_learned_from_a_clusters_transfers():
    assert parse_rate("1gbit") == 1.25e8 and parse_rate("2.5GB/s") == 2.5e9 and parse_rate("100mbit") == 1.25e7
    for bad in ("fast", "1 parsec", "-1gbit", "0gbit", ""):
        with pytest.raises(ValueError, match="link rate"):
            parse_rate(bad)
    workers = [{"kv_bytes_sent": 3e8, "kv_seconds_sending": 2.0}, {"kv_bytes_sent": 0, "kv_seconds_sending": 0.0}]
    assert learned(workers, "http://x").bandwidth == 1.5e8
    with pytest.raises(ValueError, match="has sent no KV yet"):
        learned(workers[1:], "http://x")
    with pytest.raises(ValueError, match="cannot read"):
        resolve_link("http://127.0.0.1:9", timeout_s=2)


def test_plan_predicts_the_adaptive_cluster_on_shifting_traffic():
    phases = (Phase(60, 0.3, LengthDist("fixed:1500"), LengthDist("fixed:16")),
              Phase(60, 1.2, LengthDist("fixed:64"), LengthDist("fixed:200")))  # fmt: skip
    workload = planner.Workload(LengthDist("fixed:1"), LengthDist("fixed:1"), phases=phases)
    results = planner.plan({2: PROFILE}, 8, workload.mean_rate, workload, SLO(ttft=3.0, tpot=0.1), adaptive=True)
    assert [r.name for r in results] == ["2xboth", "1P:1D", "1P:1D+a"]
    _, fixed, adaptive = (r.at_rate["slo_attainment"] for r in results)
    assert adaptive > fixed


def test_profile_measures_the_real_engine(tiny_llama_gqa, tmp_path):
    config = EngineConfig(model=str(tiny_llama_gqa), dtype="fp32", max_num_batched_tokens=64, max_num_seqs=4,
                          kv_cache_memory="4MiB")  # fmt: skip
    profile = measure(config, threads=1, repeats=1, progress=False)
    assert [t for t, _ in profile.prefill] == [16, 32, 64]
    assert {b for b, _, _ in profile.decode} == {1, 2, 4}
    assert all(s > 0 for *_, s in profile.decode)
    path = tmp_path / "p.json"
    profile.save(path)
    loaded = Profile.load(path)
    assert loaded.prefill == profile.prefill and loaded.decode_time(2, 100) == pytest.approx(
        profile.decode_time(2, 100)
    )
    assert loaded.pair_slowdown >= 1.0 and loaded.pair_slowdown == profile.pair_slowdown
    assert loaded.link.bandwidth == LOOPBACK  # until a link is named or learned
    profile.over(Link(1.25e8, "given as 1gbit")).save(path)
    assert Profile.load(path).link == Link(1.25e8, "given as 1gbit")
    records = simulate(loaded, Hardware(cores=2), 1, 1, [SimRequest(0.0, 30, 4)])
    assert summarize(records, 1.0)["completed"] == 1
