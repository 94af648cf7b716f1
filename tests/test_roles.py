"""The router meets its SLO by itself: conditional disaggregation (a decode worker prefills short prompts, or
prompts the prefill pool could not start in time) and role switching (a worker drained and moved in place to
the pool that is the bottleneck). The policies are tested on recorded windows; the mechanism on a router with
fake workers and on a real cluster, where tokens equal Hugging Face transformers' and no page leaks."""

from __future__ import annotations

import math
import os
import signal
import threading
import time

import pytest

from splitserve.engine.params import SamplingParams
from splitserve.launcher import ServeProcess
from splitserve.protocol import Generate, Heartbeat, KvStats, Load, Reserve, Role, SwitchRole
from splitserve.router.cluster.options import RouterOptions
from splitserve.router.cluster.policy import (
    LocalPrefill,
    PolicyOptions,
    RolePolicy,
    Verdict,
    Window,
    has_decode_room,
    judge,
    local_prefill_threshold,
    prefills_locally,
)
from splitserve.slo import SLO
from tests.helpers import add_fake_worker, fake_worker_info, hf_greedy, recording_cluster
from tests.test_serving import _metric

ENGINE = ["--dtype", "fp32", "--page-size", "8", "--kv-cache-memory", "8MiB", "--max-num-batched-tokens", "64"]

# --- the policies, on recorded windows ------------------------------------------------------------------


def _window(requests=20, pre=0, dec=0, prefill_busy=0.9, decode_busy=0.9, p=1, d=1) -> Window:
    """`pre`, `dec`: requests that missed the SLO in prefill, and in decode."""
    return Window(requests, pre, dec, prefill_busy, decode_busy, p, d)


def test_short_prompts_go_local_under_an_slo_and_long_ones_when_the_pool_is_backed_up():
    rule = LocalPrefill(max_tokens=64, conditional=True)
    # short: local, even on equal work (saves the transfer); long: the pool, while it has nothing queued
    assert prefills_locally(64, 0, 64, rule)
    assert not prefills_locally(65, 0, 65, rule)
    assert not prefills_locally(64, 200, 64, rule)  # the decode worker has more prompt work queued
    # long, with the pool 700 tokens behind: here, if this decode worker runs nothing
    assert prefills_locally(800, 0, 1500, rule)
    assert not prefills_locally(800, 0, 1500, rule, decoding=2)  # it would stall running requests' TPOT
    assert not prefills_locally(800, 800, 1500, rule)  # it has as much prompt work of its own
    assert prefills_locally(5000, 0, math.inf, rule, decoding=3)  # no prefill worker at all
    # without an SLO: a tie stays with the pool, and there is no load rule
    assert not prefills_locally(64, 0, 64, LocalPrefill(64))
    assert prefills_locally(60, 0, 64, LocalPrefill(64))
    assert not prefills_locally(800, 0, 1500, LocalPrefill(64))


def test_a_decode_worker_at_the_tpot_limit_takes_no_new_request():
    assert has_decode_room(step_s=0.08, tpot_s=0.1, running=5)
    assert not has_decode_room(step_s=0.095, tpot_s=0.1, running=5)  # within 10% of the limit: full
    assert has_decode_room(step_s=0.2, tpot_s=0.1, running=0)  # idle: its figure is stale
    assert has_decode_room(step_s=0.2, tpot_s=None, running=5)  # no TPOT limit


def test_the_short_prompt_threshold_is_learned_from_measured_throughput_unless_configured():
    assert local_prefill_threshold(500.0, 0.1, None) == 50  # one TPOT budget's worth of prompt tokens
    assert local_prefill_threshold(500.0, 0.1, 300) == 300
    assert local_prefill_threshold(0.0, 0.1, None) == 0  # nothing measured yet
    assert local_prefill_threshold(500.0, None, None) == 0  # no TPOT limit


def test_misses_are_told_as_soon_as_they_are_plain_and_laid_at_the_right_pool():
    slo = SLO(ttft=1.0, tpot=0.1)
    # no first token yet: nothing to tell before the TTFT limit; after it, a miss of the pool it waits in
    assert judge(slo, now=0.9, created=0.0, first_token_at=None, num_tokens=0, waited_s=0.0, final=False) is None
    assert judge(slo, 1.5, 0.0, None, 0, waited_s=0.2, final=False) == (True, False)  # being prefilled
    assert judge(slo, 1.5, 0.0, None, 0, waited_s=1.4, final=False) == (False, True)  # no decode worker had room
    # running: a TPOT over the limit is told once it rests on enough tokens
    assert judge(slo, 1.5, 0.0, 0.5, 6, 0.0, final=False) is None  # 200 ms per token, but 6 tokens
    assert judge(slo, 2.5, 0.0, 0.5, 11, 0.0, final=False) == (False, True)
    assert judge(slo, 1.5, 0.0, 0.5, 20, 0.0, final=False) is None  # on time so far
    # ended: judged whatever it was
    assert judge(slo, 1.5, 0.0, 0.5, 20, 0.0, final=True) == (False, False)
    assert judge(slo, 3.0, 0.0, 2.0, 11, 0.0, final=True) == (True, False)
    assert judge(slo, 3.0, 0.0, 2.0, 11, 1.9, final=True) == (False, True)


def test_verdicts_name_the_bottleneck_only_when_the_other_pool_can_give():
    policy = RolePolicy(PolicyOptions(miss_share=0.1, idle_share=0.5))
    # prefill misses, an idle decode pool of two: a decode worker should become a prefill worker
    assert policy.verdict(_window(pre=6, d=2, decode_busy=0.2))[0] is Verdict.TO_PREFILL
    assert policy.verdict(_window(pre=6, d=2, decode_busy=0.8))[0] is None  # the decode pool is busy
    assert policy.verdict(_window(pre=6, d=1, decode_busy=0.0))[0] is None  # never its last worker
    assert policy.verdict(_window(pre=6, p=0, d=2, decode_busy=0.9))[0] is Verdict.TO_PREFILL  # no prefill pool
    # decode misses: the prefill pool gives a worker when it idles (its last one too: decode workers absorb
    # its work)
    assert policy.verdict(_window(dec=6, p=2, prefill_busy=0.1))[0] is Verdict.TO_DECODE
    assert policy.verdict(_window(dec=6, p=2, prefill_busy=0.9))[0] is None
    assert policy.verdict(_window(dec=6, p=1, prefill_busy=0.4))[0] is Verdict.TO_DECODE
    assert policy.verdict(_window(dec=6, p=0, prefill_busy=0.0))[0] is None
    # too few misses, too few requests: nothing; as many misses on both sides: the decode pool's first
    assert policy.verdict(_window(pre=1, d=2, decode_busy=0.0))[0] is None
    assert policy.verdict(_window(pre=6, dec=6, d=2, decode_busy=0.0))[0] is None  # the prefill pool is busy
    assert policy.verdict(_window(pre=6, dec=6, p=2, prefill_busy=0.1))[0] is Verdict.TO_DECODE
    assert policy.verdict(_window(requests=3, pre=3, d=2, decode_busy=0.0))[0] is None


def test_a_switch_needs_agreeing_windows_in_a_row_and_the_dwell_time():
    policy = RolePolicy(PolicyOptions(window_s=10, confirm_windows=2, dwell_s=30))
    behind = _window(dec=8, p=1, prefill_busy=0.0, d=1)
    fine = _window()
    assert policy.decide(behind, now=10) is None  # one window is not enough
    assert policy.decide(fine, now=20) is None  # the streak is broken
    assert policy.decide(behind, now=30) is None
    decision = policy.decide(behind, now=40)
    assert decision is not None and (decision.source, decision.target) == (Role.PREFILL, Role.DECODE)
    assert "40% in decode" in decision.reason
    opposite = _window(pre=8, p=0, d=2, decode_busy=0.9)
    assert policy.decide(opposite, now=50) is None
    assert policy.decide(opposite, now=60) is None  # agreed twice, but 20 s after the last switch
    assert policy.decide(opposite, now=70) is not None  # dwell time over, verdict held throughout


# --- the mechanism, on a router with fake workers -------------------------------------------------------


@pytest.fixture
def router():
    options = RouterOptions(model="m", slo=SLO(ttft=1.0, tpot=0.1), policy=PolicyOptions(window_s=1.0, dwell_s=0))
    with recording_cluster(options) as r:
        yield r


def test_under_an_slo_short_prompts_are_prefilled_by_their_decode_worker(router):
    cluster, sent = router
    add_fake_worker(cluster, "p", Role.PREFILL, prefill_tokens_per_s=500.0)
    add_fake_worker(cluster, "d", Role.DECODE, prefill_tokens_per_s=500.0)
    assert cluster.placement.local_prefill_rule().max_tokens == 50  # 500 tokens/s x 100 ms
    cluster.submit(list(range(40)), SamplingParams())
    assert sent[-1][0] == "d" and isinstance(sent[-1][1], Generate)
    cluster.submit(list(range(100)), SamplingParams())
    assert isinstance(sent[-1][1], Reserve)
    assert cluster.stats.local_prefills == 1


def test_a_decode_worker_waiting_for_kv_prefills_a_long_prompt_the_backed_up_pool_would_delay(router):
    """A request whose KV the prefill pool still computes costs its decode worker nothing yet: that worker
    runs nothing, so it takes a long prompt itself while the pool is behind; once it runs one, it does not."""
    cluster, sent = router
    p = add_fake_worker(cluster, "p", Role.PREFILL, prefill_tokens_per_s=500.0)
    add_fake_worker(cluster, "d", Role.DECODE, prefill_tokens_per_s=500.0)
    cluster.submit(list(range(300)), SamplingParams())
    assert sent[-1][0] == "d" and isinstance(sent[-1][1], Reserve)  # nothing queued anywhere: the pool
    p.take(-1, prefill_tokens=1000)  # the pool is 1,000 tokens behind
    cluster.submit(list(range(1000, 1300)), SamplingParams())
    assert sent[-1][0] == "d" and isinstance(sent[-1][1], Generate)
    assert cluster.stats.local_prefills == 1
    cluster.submit(list(range(2000, 2300)), SamplingParams())
    assert isinstance(sent[-1][1], Reserve) and cluster.stats.local_prefills == 1  # d prefills the second


def test_the_slo_loop_drains_a_worker_then_switches_it_and_counts_the_switch(router):
    cluster, sent = router
    p = add_fake_worker(cluster, "p", Role.PREFILL)
    add_fake_worker(cluster, "d", Role.DECODE)
    p.take(1, prefill_tokens=100)  # still busy with a prompt

    def window_of_tpot_misses() -> None:  # the prefill pool idles: busy 1 tick of 10
        cluster.roles.window.start -= 10
        cluster.roles.window.requests, cluster.roles.window.decode_misses, cluster.roles.window.ticks = 10, 5, 9
        cluster._balance(time.monotonic())

    cluster.roles.window.start -= 10
    cluster.roles.window.requests = 3
    cluster._balance(time.monotonic())
    assert cluster.roles.last_window is None  # 3 requests finished: the window goes on until there are 4
    window_of_tpot_misses()
    assert p.switch is None and "50% in decode" in cluster.roles.last_verdict  # one window is not enough
    window_of_tpot_misses()
    assert p.switch is not None and p.switch.target is Role.DECODE
    assert cluster.members.pool(Role.PREFILL) == []  # no new prompts for it...
    assert not any(isinstance(m, SwitchRole) for _, m in sent)  # ...and no switch while it holds work
    cluster.submit(list(range(300)), SamplingParams())  # meanwhile the decode worker prefills for itself
    assert sent[-1][0] == "d" and isinstance(sent[-1][1], Generate)
    p.drop(1)
    cluster._balance(time.monotonic())
    assert sent[-1] == ("p", SwitchRole(Role.DECODE, p.switch.reason))
    cluster._heartbeat(Heartbeat(fake_worker_info("p", Role.DECODE), Load(100, 0, 0, 0), KvStats(), 0.0))
    assert p.role is Role.DECODE and p.switch is None and "50% in decode" in p.role_reason
    assert dict(cluster.roles.switches) == {("prefill", "decode"): 1}
    assert {w.id: w.role for w in cluster.snapshot().workers} == {"p": "decode", "d": "decode"}


def test_an_operator_cannot_remove_the_last_decode_worker(router):
    cluster, _ = router
    add_fake_worker(cluster, "p", Role.PREFILL)
    add_fake_worker(cluster, "d", Role.DECODE)
    with pytest.raises(ValueError, match="last decode worker"):
        cluster.switch_role("d", Role.PREFILL, "test")
    with pytest.raises(ValueError, match="already"):
        cluster.switch_role("p", Role.PREFILL, "test")
    with pytest.raises(KeyError):
        cluster.switch_role("x", Role.DECODE, "test")


# --- on a real cluster ----------------------------------------------------------------------------------


def _body(server, prompt: list[int], max_tokens: int) -> dict:
    model = server.http.get("/v1/models").json()["data"][0]["id"]
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}  # fmt: skip


def _complete(server, prompt: list[int], max_tokens: int) -> list[int]:
    r = server.http.post("/v1/completions", json=_body(server, prompt, max_tokens))
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def _wait_for_roles(server, roles: list[str], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = server.health()
        if sorted(w["role"] for w in h["workers"]) == sorted(roles) and not any(
            w["switching_to"] for w in h["workers"]
        ):
            return h
        time.sleep(0.1)
    raise TimeoutError(f"roles {roles} not reached: {server.health()['workers']}")


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    return [[(seed * 31 + i * 7 + j * 13) % 370 + 8 for j in range(length + i)] for i in range(n)]


@pytest.mark.slow
def test_switching_roles_under_load_loses_no_request_and_leaks_no_page(tiny_chat_llama):
    server = ServeProcess(tiny_chat_llama, ["--prefill", "1", "--decode", "1", *ENGINE], num_workers=2)
    try:
        prompts = _prompts(6, 40, seed=1)
        expected = hf_greedy(tiny_chat_llama, prompts, [24] * len(prompts))
        results: dict[int, list[int]] = {}

        def run(i: int) -> None:
            results[i] = _complete(server, prompts[i], 24)

        (prefill,) = server.workers("prefill")
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads[:3]:
            t.start()
        time.sleep(0.3)  # requests in flight in both pools
        r = server.http.post(f"/admin/workers/{prefill['id']}/role", json={"role": "decode"})
        assert r.status_code == 200, r.text
        for t in threads[3:]:  # arrive while it drains and switches: decode workers prefill them
            t.start()
        for t in threads:
            t.join(120)
        h = _wait_for_roles(server, ["decode", "decode"])
        assert [results[i] for i in range(len(prompts))] == expected
        moved = {w["id"]: w for w in h["workers"]}[prefill["id"]]
        assert "asked by an operator" in moved["role_reason"]
        assert h["routing"]["local_prefills"] >= 3
        # the switched worker decodes (and prefills) with the weights it kept
        more = _prompts(4, 30, seed=2)
        assert [_complete(server, p, 12) for p in more] == hf_greedy(tiny_chat_llama, more, [12] * 4)
        # and back: a decode worker becomes a prefill worker again; the disaggregated path serves
        r = server.http.post(f"/admin/workers/{prefill['id']}/role", json={"role": "prefill"})
        assert r.status_code == 200, r.text
        _wait_for_roles(server, ["decode", "prefill"])
        assert [_complete(server, p, 12) for p in more] == hf_greedy(tiny_chat_llama, more, [12] * 4)
        h = server.wait_idle(timeout=10)
        assert h["routing"]["role_switches"] == [
            {"from": "decode", "to": "prefill", "count": 1},
            {"from": "prefill", "to": "decode", "count": 1},
        ]
        metrics = server.http.get("/metrics").text
        assert _metric(metrics, 'splitserve_role_switches_total{from="prefill",to="decode"}') == 1
        r = server.http.post(f"/admin/workers/{prefill['id']}/role", json={"role": "both"})
        assert r.status_code == 400 and "error" in r.json()
    finally:
        server.stop()


@pytest.mark.slow
def test_a_worker_that_dies_while_switching_is_handled_like_any_dead_worker(tiny_chat_llama):
    server = ServeProcess(tiny_chat_llama, ["--prefill", "1", "--decode", "2", *ENGINE], num_workers=3)
    try:
        prompts = _prompts(2, 30, seed=3)
        outcome: dict[int, int] = {}

        def run(i: int) -> None:
            body = _body(server, prompts[i], 400)
            outcome[i] = server.http.post("/v1/completions", json=body).status_code

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while not (busy := [w for w in server.workers("decode") if w["jobs"]]) and time.monotonic() < deadline:
            time.sleep(0.05)
        victim = busy[0]
        r = server.http.post(f"/admin/workers/{victim['id']}/role", json={"role": "prefill"})
        assert r.status_code == 200, r.text
        assert {w["id"]: w for w in server.workers()}[victim["id"]]["switching_to"] == "prefill"
        os.kill(victim["pid"], signal.SIGKILL)  # dies while draining
        for t in threads:
            t.join(120)
        # like any dead worker's: retried where no token was sent yet, failed (502) where some were; none hangs
        assert len(outcome) == 2 and set(outcome.values()) <= {200, 502}, outcome
        # serve restarts it (in its original role); the cluster serves again, nothing is stuck switching
        h = _wait_for_roles(server, ["decode", "decode", "prefill"], timeout=90)
        assert victim["id"] not in {w["id"] for w in h["workers"]}
        assert _complete(server, prompts[0], 8) == hf_greedy(tiny_chat_llama, [prompts[0]], [8])[0]
        server.wait_idle(timeout=10)
    finally:
        server.stop()


@pytest.mark.slow
def test_conditional_prefill_on_a_decode_worker_equals_the_disaggregated_tokens(tiny_chat_llama):
    args = ["--prefill", "1", "--decode", "1", "--slo", "ttft=30,tpot=5", "--local-prefill-tokens", "48", *ENGINE]
    server = ServeProcess(tiny_chat_llama, args, num_workers=2)
    try:
        short, long = _prompts(3, 20, seed=4), _prompts(2, 100, seed=5)
        outs = [_complete(server, p, 10) for p in [*short, *long]]
        assert outs == hf_greedy(tiny_chat_llama, [*short, *long], [10] * 5)
        h = server.wait_idle(timeout=10)
        assert h["routing"]["local_prefills"] == 3  # the short ones; the long ones went through the prefill pool
        time.sleep(0.6)  # the workers' transfer counters come with their heartbeats
        (decode,) = server.workers("decode")
        assert decode["kv_bytes_received"] > 0  # the long prompts' pages came from the prefill worker
    finally:
        server.stop()
