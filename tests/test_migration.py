"""Request migration inside the engines: a request resumed on another engine after the tokens an earlier attempt
generated (its prompt and those tokens prefilled again, its sampler where that attempt left it) continues
exactly as the undisturbed request would have: greedy, seeded sampling, penalties and min_tokens alike, on
the colocated path and the disaggregated hand-off."""

from __future__ import annotations

import time

import pytest

from splitserve.decode.engine import DecodeEngine
from splitserve.engine.config import EngineConfig
from splitserve.engine.params import SamplingParams
from splitserve.engine.request import EngineRequest
from splitserve.errors import InvalidRequestError
from splitserve.kv_transfer.messages import Ticket
from splitserve.prefill.engine import PrefillEngine
from splitserve.protocol import (
    Abort,
    Generate,
    JobFailed,
    Load,
    Prefill,
    PrefillDone,
    Reserve,
    Reserved,
    Role,
    SwitchRole,
    TokenOut,
    Tokens,
)
from splitserve.router.cluster.jobs import ErrorEvent, JobState, TokenEvent
from splitserve.router.cluster.options import RouterOptions
from tests.helpers import FAKE_KEY, add_fake_worker, hf_greedy, recording_cluster

PROMPT = [11, 42, 7, 300, 5, 19, 8, 77, 120, 3, 64, 9, 250]
PARAMS = {
    "greedy": SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
    "seeded": SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True),
    "penalized": SamplingParams(
        max_tokens=24,
        temperature=1.2,
        top_k=40,
        seed=-7,
        presence_penalty=0.8,
        frequency_penalty=0.3,
        repetition_penalty=1.2,
        min_tokens=20,
    ),
}


@pytest.fixture(scope="module")
def engines(tiny_llama_gqa):
    cfg = EngineConfig(model=str(tiny_llama_gqa), dtype="fp32", device="cpu", page_size=8, max_num_batched_tokens=16)
    return PrefillEngine(cfg), DecodeEngine(cfg)


def _colocated(decode: DecodeEngine, params: SamplingParams, resumed: list[int]) -> list[int]:
    decode.add_request(EngineRequest("r", PROMPT, params, output_token_ids=resumed))
    out = []
    while decode.has_unfinished():
        out += [u.token_id for u in decode.step()]
    return out


def _disaggregated(prefill: PrefillEngine, decode: DecodeEngine, params: SamplingParams, resumed: list[int]):
    pages = decode.reserve(EngineRequest("r", PROMPT, params, output_token_ids=resumed))
    prefill.add_request(EngineRequest("r", PROMPT, params, output_token_ids=resumed))
    done = []
    while prefill.has_work():
        done += prefill.step()
    (first,) = done
    sent = first.request.pages[len(first.request.pages) - len(pages) :]
    decode.runner.kv_cache[pages] = prefill.runner.kv_cache[sent]
    prefill.release("r")
    out = [decode.start_decode("r", first.token_id, first.logprob, first.generator_state).token_id]
    while decode.has_unfinished():
        out += [u.token_id for u in decode.step()]
    return out


@pytest.mark.parametrize("path", ["colocated", "disaggregated"])
@pytest.mark.parametrize("kind", sorted(PARAMS))
def test_a_resumed_request_continues_the_undisturbed_one(engines, tiny_llama_gqa, kind, path):
    prefill, decode = engines
    params = PARAMS[kind]

    def run(p: SamplingParams, resumed: list[int]) -> list[int]:
        return _colocated(decode, p, resumed) if path == "colocated" else _disaggregated(prefill, decode, p, resumed)

    whole = run(params, [])
    assert len(whole) == 24
    if kind == "greedy":
        assert whole == hf_greedy(tiny_llama_gqa, [PROMPT], [24])[0]
    for k in (1, 5, 8, 17, 23):  # the resumed part crosses page boundaries (page size 8)
        assert run(params, whole[:k]) == whole[k:], k


def test_a_resumed_request_must_leave_tokens_to_generate(engines):
    _, decode = engines
    with pytest.raises(InvalidRequestError, match="none left"):
        decode.add_request(EngineRequest("r", PROMPT, SamplingParams(max_tokens=3), output_token_ids=[1, 2, 3]))
    with pytest.raises(InvalidRequestError, match="prompt token ids"):
        decode.add_request(EngineRequest("r", PROMPT, SamplingParams(max_tokens=3), output_token_ids=[10**6]))


# --- the router's side, with fake workers ------------------------------------------------------------------


def _streaming(cluster, sent, prompt: list[int], params: SamplingParams, tokens: list[int]):
    """Submit a request and play its workers until `tokens` reached the client; returns (job, decode worker)."""
    job = cluster.submit(prompt, params)
    d, reserve = sent[-1]
    assert isinstance(reserve, Reserve)
    cluster._reserved(Reserved(job.wire_id, Ticket(d, b"ucx", 1, [job.pages_needed], FAKE_KEY), LOAD), d)
    p, prefill = sent[-1]
    assert isinstance(prefill, Prefill)
    cluster._prefill_done(PrefillDone(job.wire_id, True, LOAD), p)
    cluster._tokens(Tokens([TokenOut(job.wire_id, t) for t in tokens], LOAD), d)
    return job, d


def _events(job) -> list:
    out = []
    while not job.events.empty():
        out.append(job.events.get_nowait())
    return out


LOAD = Load(100, 0, 0, 0)
SEEDED = SamplingParams(max_tokens=50, temperature=0.7, seed=5)


@pytest.fixture
def router():
    with recording_cluster(RouterOptions(model="m", migration_limit=2, drain_timeout_s=5.0)) as r:
        cluster, _ = r
        for worker_id, role in (("p", Role.PREFILL), ("d1", Role.DECODE), ("d2", Role.DECODE)):
            add_fake_worker(cluster, worker_id, role)
        yield r


def test_the_router_resumes_a_dead_decode_workers_stream_on_another(router):
    cluster, sent = router
    prompt = list(range(100, 120))
    job, d = _streaming(cluster, sent, prompt, SEEDED, [7, 8, 9])
    old_wire = job.wire_id
    cluster._remove_worker(d, "no heartbeat for 3.0s")
    cluster._dispatch()  # as the router's loops do after each event
    other, reserve = sent[-1]
    assert other != d and isinstance(reserve, Reserve)
    assert reserve.prompt_token_ids == prompt and reserve.output_token_ids == [7, 8, 9] and reserve.params == SEEDED
    assert job.pages_needed == 3  # 23 tokens of 8 per page
    cluster._reserved(Reserved(job.wire_id, Ticket(other, b"ucx", 2, [3], FAKE_KEY), LOAD), other)
    _, prefill = sent[-1]
    assert isinstance(prefill, Prefill) and prefill.output_token_ids == [7, 8, 9]
    cluster._tokens(Tokens([TokenOut(old_wire, 99)], LOAD), other)  # a late token of the dead attempt: dropped
    cluster._tokens(Tokens([TokenOut(job.wire_id, 10), TokenOut(job.wire_id, 11, "length")], LOAD), other)
    events = _events(job)
    assert [e.token_id for e in events] == [7, 8, 9, 10, 11] and all(isinstance(e, TokenEvent) for e in events)
    assert job.state is JobState.DONE and job.migrations == ["worker_lost"]
    assert cluster.snapshot().migrations == {"worker_lost": 1}
    assert not cluster.jobs and not any(w.jobs for w in cluster.workers.values())


def test_a_failed_transfer_mid_stream_migrates_and_the_limit_ends_it_with_an_error(router):
    cluster, sent = router
    job, d = _streaming(cluster, sent, list(range(30)), SEEDED, [1, 2])
    cluster._job_failed(JobFailed(job.wire_id, "KV transfer failed: checksum mismatch", retryable=True), d)
    cluster._dispatch()
    assert job.migrations == ["transfer_failed"] and sent[-1][1].output_token_ids == [1, 2]
    d2 = sent[-1][0]
    cluster._reserved(Reserved(job.wire_id, Ticket(d2, b"ucx", 2, [4], FAKE_KEY), LOAD), d2)
    assert sent[-1][0] == "p" and isinstance(sent[-1][1], Prefill)
    cluster._remove_worker("p", "no heartbeat for 3.0s")  # before any token of this attempt
    cluster._dispatch()
    assert job.migrations == ["transfer_failed", "worker_lost"]
    assert isinstance(sent[-1][1], Generate) and sent[-1][1].output_token_ids == [1, 2]  # prefilled by d itself
    cluster._remove_worker(sent[-1][0], "no heartbeat for 3.0s")  # the third failure: over the limit of 2
    (error,) = [e for e in _events(job) if isinstance(e, ErrorEvent)]
    assert error.status == 502 and "moved 2 times already" in error.message, error
    assert job.state is JobState.DONE and not cluster.jobs


def test_a_non_retryable_failure_is_not_migrated(router):
    cluster, sent = router
    job, d = _streaming(cluster, sent, list(range(30)), SEEDED, [1])
    cluster._job_failed(JobFailed(job.wire_id, "sampling failed: boom", retryable=False), d)
    assert [type(e) for e in _events(job)] == [TokenEvent, ErrorEvent] and not job.migrations


def test_a_decode_worker_drained_for_a_switch_hands_its_streams_over_at_the_drain_timeout(router):
    cluster, sent = router
    job, d = _streaming(cluster, sent, list(range(30)), SEEDED, [4, 5])
    old_wire = job.wire_id
    cluster.switch_role(d, Role.PREFILL, "asked by an operator")
    assert not any(isinstance(m, (SwitchRole, Abort)) for _, m in sent)  # it finishes its streams first...
    cluster.workers[d].switch_started -= 6  # ...for at most the drain timeout
    cluster._balance(time.monotonic())
    cluster._dispatch()
    other = next(w for w in ("d1", "d2") if w != d)
    (abort, switch, (to, reserve)) = sent[-3:]  # the stream leaves it, it switches, another worker resumes it
    assert abort == (d, Abort(old_wire)) and switch == (d, SwitchRole(Role.PREFILL, "asked by an operator"))
    assert to == other and isinstance(reserve, Reserve) and reserve.output_token_ids == [4, 5]
    assert job.migrations == ["drain_timeout"]
