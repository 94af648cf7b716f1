"""Failures, end to end: a decode or a prefill worker SIGKILLed under load, and a worker fed garbage frames.

The streams of a dead decode worker migrate to the other one and go on, every token equal to an undisturbed
run's (greedy: transformers'; seeded sampling: the same requests without the kill); with `--migration-limit 0`
their clients get an error event within 5 s instead and the rest keep being served. Requests that had not
started decoding when their prefill worker died are retried on the other one and come out right. No page
leaks on the survivors."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import msgspec
import psutil
import pytest
import zmq

from splitserve.engine.params import SamplingParams
from splitserve.launcher import ServeProcess, free_port
from splitserve.protocol import PROTOCOL_VERSION, Abort, Heartbeat, Reserve, Reserved, decode_to_router, encode
from tests.helpers import hf_greedy
from tests.test_serving import ENGINE, complete

pytestmark = pytest.mark.slow


def _model(server: ServeProcess) -> str:
    return server.http.get("/v1/models").json()["data"][0]["id"]


def _stream_all(
    server: ServeProcess, bodies: list[dict], started: threading.Barrier | None = None, at: int = 3
) -> list[dict]:
    """Stream every body at once; each result: the token ids, the error event (if any), whether [DONE] came, and
    `cut` where the connection broke. Each stream waits at `started` once it has `at` tokens."""
    results: list[dict] = [{"tokens": [], "done": False} for _ in bodies]

    def stream(i: int) -> None:
        out = results[i]
        try:
            with server.http.stream("POST", "/v1/completions", json={**bodies[i], "return_token_ids": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        event = json.loads(line.removeprefix("data: "))
                        if "error" in event:
                            out["error"] = event["error"]["message"]
                            continue
                        out["tokens"] += event["choices"][0]["token_ids"]
                        if started is not None and len(out["tokens"]) == at:
                            started.wait()
                    elif line == "data: [DONE]":
                        out["done"] = True
        except httpx.TransportError as e:  # the connection itself broke (its router died): the stream was cut
            out["cut"] = str(e)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def _kill_the_busier_decode_worker_midstream(
    server: ServeProcess, bodies: list[dict], at: int, role: str = "decode", rank: int = 0
) -> list[dict]:
    """Stream every body at once and SIGKILL the decode worker running the most of them (of `role`; its process of
    tensor-parallel `rank`) once each stream has `at` tokens; every stream must end whole, without an error.
    Returns the streams' results."""
    started = threading.Barrier(len(bodies) + 1)
    results: list[dict] = []
    runner = threading.Thread(target=lambda: results.extend(_stream_all(server, bodies, started, at)))
    runner.start()
    started.wait(timeout=120)  # every stream is decoding
    victim = max(server.workers(role), key=lambda w: w["running"])
    assert victim["running"] > 0
    pid = victim["pid"]
    if rank > 0:  # the worker's follower of that rank (engine/tensor_parallel.py)
        (pid,) = [p.pid for p in psutil.Process(pid).children() if p.cmdline()[-2:] == ["--rank", str(rank)]]
    os.kill(pid, signal.SIGKILL)
    runner.join(300)
    assert all("error" not in r and r["done"] for r in results), [r.get("error") for r in results]
    migrations = server.health()["migrations"]
    assert migrations.get("worker_lost", 0) >= 1, migrations
    return results


def test_streams_of_a_killed_decode_worker_migrate_and_equal_an_undisturbed_run(tiny_chat_llama):
    server = ServeProcess(tiny_chat_llama, ["--prefill", "1", "--decode", "2", *ENGINE], num_workers=3)
    try:
        model = _model(server)
        rng = random.Random(25)
        prompts = [[rng.randrange(100, 49152) for _ in range(rng.randrange(5, 40))] for _ in range(8)]
        bodies = [{"model": model, "prompt": prompts[i], "max_tokens": 300, "ignore_eos": True, "stream": True,
                   **({"temperature": 0} if i % 2 == 0 else {"temperature": 0.9, "top_k": 8, "seed": i})}
                  for i in range(8)]  # fmt: skip
        expected = _stream_all(server, bodies[1::2])  # the seeded ones, undisturbed
        assert all(r["done"] and len(r["tokens"]) == 300 for r in expected)
        greedy = hf_greedy(tiny_chat_llama, prompts[::2], [300] * 4)
        results = _kill_the_busier_decode_worker_midstream(server, bodies, at=3)
        assert [r["tokens"] for r in results[::2]] == greedy
        assert [r["tokens"] for r in results[1::2]] == [r["tokens"] for r in expected]
        migrations = server.health()["migrations"]
        metrics = server.http.get("/metrics").text
        assert f'splitserve_migrations_total{{reason="worker_lost"}} {float(migrations["worker_lost"])}' in metrics
        assert "1 migration(s) (worker_lost)" in Path(server.log.name).read_text()  # the request's log line
        server.wait_idle(timeout=10)
    finally:
        server.stop()


def test_migrated_streams_equal_the_undisturbed_run_in_the_default_mode():
    """The embedded model with serve's default numerics (the native quantized kernels here): 6 greedy and 6
    seeded streams of 160 tokens, the busier of two decode workers killed once each has a dozen; every migrated
    stream, prefilled again with its tokens on the other worker, equals the undisturbed run's."""
    server = ServeProcess(None, ["--prefill", "1", "--decode", "2", "--kv-cache-memory", "128MiB"], num_workers=3)
    try:
        model = _model(server)
        rng = random.Random(38)
        bodies = [{"model": model, "prompt": [rng.randrange(100, 49152) for _ in range(rng.randrange(8, 120))],
                   "max_tokens": 160, "ignore_eos": True, "stream": True,
                   **({"temperature": 0} if i % 2 == 0 else {"temperature": 0.8, "top_p": 0.95, "seed": i})}
                  for i in range(12)]  # fmt: skip
        expected = _stream_all(server, bodies)  # undisturbed, the same batch
        assert all(r["done"] and len(r["tokens"]) == 160 for r in expected)
        results = _kill_the_busier_decode_worker_midstream(server, bodies, at=12)
        assert [r["tokens"] for r in results] == [r["tokens"] for r in expected]
        server.wait_idle(timeout=10)
    finally:
        server.stop()


def test_without_migration_a_killed_decode_workers_streams_end_with_an_error(tiny_chat_llama):
    args = ["--prefill", "1", "--decode", "2", "--migration-limit", "0", *ENGINE]
    server = ServeProcess(tiny_chat_llama, args, num_workers=3)
    try:
        model = _model(server)
        results: list[dict] = [{} for _ in range(8)]
        started = threading.Barrier(9)

        def stream(i: int) -> None:
            body = {"model": model, "prompt": [100 + i] * 10, "max_tokens": 490, "ignore_eos": True,
                    "temperature": 0, "stream": True}  # fmt: skip
            out = results[i]
            out["tokens"] = 0
            with server.http.stream("POST", "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                for line in lines:
                    if line.startswith("data: {"):
                        out["tokens"] += 1
                        if out["tokens"] == 3:
                            started.wait()
                        event = json.loads(line.removeprefix("data: "))
                        if "error" in event:
                            out["error_at"] = time.monotonic()
                            out["error"] = event["error"]["message"]
                    elif line == "data: [DONE]":
                        out["done"] = True

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        started.wait(timeout=60)  # every stream is decoding
        victim = max(server.workers("decode"), key=lambda w: w["running"])
        assert victim["running"] > 0
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        for t in threads:
            t.join(60)
        failed = [r for r in results if "error" in r]
        assert failed, "no stream was on the killed worker"
        assert len(failed) < len(results), "every stream failed; the other decode worker served none"
        assert all(r.get("done") for r in results)  # every stream ended properly, with [DONE]
        assert max(r["error_at"] for r in failed) - killed_at < 5, [r["error_at"] - killed_at for r in failed]
        assert all(r["tokens"] > 3 and r["tokens"] < 490 for r in failed)
        assert [w["id"] for w in server.workers("decode")] != [victim["id"]]
        assert victim["id"] not in {w["id"] for w in server.workers()}

        for i in range(10):  # the cluster keeps serving on the decode worker left
            body = {"model": model, "prompt": [7, 8, 9 + i], "max_tokens": 5, "ignore_eos": True}
            assert len(complete(server.http, "/v1/completions", body)[1]) == 5
        server.wait_idle()
    finally:
        server.stop()


def test_prefill_worker_killed_requests_retry_on_the_other(tiny_chat_llama):
    # A small token budget makes long prompts take many prefill steps, so some are in flight at the kill.
    engine = [*ENGINE[:-2], "--max-num-batched-tokens", "16"]
    server = ServeProcess(tiny_chat_llama, ["--prefill", "2", "--decode", "1", *engine], num_workers=3)
    try:
        model = _model(server)
        rng = random.Random(20)
        prompts = [[rng.randrange(100, 49152) for _ in range(rng.randrange(200, 400))] for _ in range(16)]
        expected = hf_greedy(tiny_chat_llama, prompts, [8] * 16)
        got: list = [None] * 16

        def one(i: int) -> None:
            body = {"model": model, "prompt": prompts[i], "max_tokens": 8, "temperature": 0, "stream": i % 2 == 0}
            got[i] = complete(server.http, "/v1/completions", body)[1]

        threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        victim = _freeze_a_prefill_worker_holding_jobs(server)
        os.kill(victim["pid"], signal.SIGKILL)
        for t in threads:
            t.join(120)
        assert got == expected  # every request right, those caught on the dead worker retried
        retries = [line for line in server.http.get("/metrics").text.splitlines()
                   if line.startswith("splitserve_request_retries_total")]  # fmt: skip
        assert float(retries[0].split()[1]) >= 1
        assert victim["id"] not in {w["id"] for w in server.workers()}
        server.wait_idle(timeout=10)
    finally:
        server.stop()


def _freeze_a_prefill_worker_holding_jobs(server: ServeProcess, timeout: float = 120) -> dict:
    """A prefill worker stopped (SIGSTOP) while the router counts prefills it has not finished: frozen, it cannot
    finish them before the kill that follows, however loaded the machine (the router's own count, `jobs`, is
    current; the workers' heartbeats lag). One whose prefills were done before it froze is let go again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for worker in server.workers("prefill"):
            if worker["jobs"] == 0:
                continue
            os.kill(worker["pid"], signal.SIGSTOP)
            time.sleep(0.2)  # a PrefillDone it sent before it stopped has arrived by now
            if any(w["id"] == worker["id"] and w["jobs"] > 0 for w in server.workers("prefill")):
                return worker
            os.kill(worker["pid"], signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError(f"no prefill worker held a prefill within {timeout:.0f} s")


def test_worker_drops_garbage_frames_and_keeps_working(tiny_chat_llama):
    """The test plays the router: a decode worker joins it, gets garbage, then a real reservation."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = free_port()
    router.bind(f"tcp://127.0.0.1:{port}")
    cmd = [sys.executable, "-m", "splitserve", "worker", "--role", "decode", "--router", f"tcp://127.0.0.1:{port}",
           "--model", str(tiny_chat_llama), *ENGINE]  # fmt: skip
    worker = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:

        def next_message(kind, timeout=60.0):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if router.poll(500):
                    message = decode_to_router(router.recv_multipart()[-1])
                    if isinstance(message, kind):
                        return message
            raise TimeoutError(f"no {kind.__name__} from the worker")

        beat = next_message(Heartbeat)
        identity = beat.info.worker_id.encode()
        capacity = beat.info.num_pages
        junk = [b"", b"\x00\xff", msgspec.msgpack.encode({"type": "Reserve", "job": "x"}),
                msgspec.msgpack.encode({"type": "Generate", "job": 1, "prompt_token_ids": [1],
                                        "params": {"max_tokens": -3}}),
                msgspec.msgpack.encode({"type": "Abort", "job": 1, "version": PROTOCOL_VERSION + 1}),
                b"\xc1" * 100]  # fmt: skip
        for frame in junk:
            router.send_multipart([identity, frame])
        router.send_multipart([identity, encode(Reserve(5, [3] * 20, SamplingParams(max_tokens=3)))])
        reserved = next_message(Reserved)
        assert reserved.job == 5 and reserved.ticket is not None and reserved.load.free_pages < capacity
        router.send_multipart([identity, encode(Abort(5))])
        deadline = time.monotonic() + 10
        while next_message(Heartbeat).load.free_pages != capacity:
            assert time.monotonic() < deadline, "the aborted reservation's pages did not come back"
        assert worker.poll() is None, "the worker died"
    finally:
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=20)
        router.close(0)
        ctx.term()
    assert stderr.count("dropped a malformed message") == len(junk), stderr


def test_full_decode_pool_queues_then_answers_429_and_503(tiny_chat_llama):
    """Two batch slots, room for two more in the router's queue: the rest get 429 at once, the queued
    ones 503 when no room appears within the queue timeout; both with Retry-After."""
    # The queue timeout must pass while the first two still decode their 450 tokens (about a second here).
    args = ["--prefill", "1", "--decode", "1", *ENGINE, "--max-num-seqs", "2", "--max-queue", "2",
            "--queue-timeout", "0.3"]  # fmt: skip
    server = ServeProcess(tiny_chat_llama, args, num_workers=2)
    try:
        model = _model(server)
        body = {"model": model, "prompt": [5, 6, 7], "max_tokens": 450, "ignore_eos": True, "stream": True}
        statuses: list = [None] * 8

        def one(i: int) -> None:
            with server.http.stream("POST", "/v1/completions", json=body) as r:
                statuses[i] = (r.status_code, r.headers.get("retry-after"))
                r.read()

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(60)
        codes = sorted(s[0] for s in statuses)
        assert codes.count(200) == 2 and codes.count(429) == 4 and codes.count(503) == 2, statuses
        assert all(s[1] for s in statuses if s[0] != 200), statuses
        server.wait_idle(timeout=10)
    finally:
        server.stop()


def test_workers_join_and_leave_a_running_router(tiny_chat_llama):
    """`splitserve router` alone, then workers started and stopped on their own while it runs."""
    port, worker_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "splitserve", "router", "--model", str(tiny_chat_llama), "--port", str(port),
           "--worker-port", str(worker_port)]  # fmt: skip
    router = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    workers: list[subprocess.Popen] = []
    url = f"http://127.0.0.1:{port}"

    def start(role: str) -> None:
        argv = [sys.executable, "-m", "splitserve", role, "--router", f"tcp://127.0.0.1:{worker_port}",
                "--model", str(tiny_chat_llama), *ENGINE]  # fmt: skip
        workers.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def wait_for(roles: list[str]) -> dict:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                h = httpx.get(f"{url}/health", timeout=5).json()
                if sorted(w["role"] for w in h["workers"]) == sorted(roles):
                    return h
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"workers {roles} did not show up")

    try:
        assert wait_for([])["status"] == "unavailable"
        model = httpx.get(f"{url}/v1/models", timeout=5).json()["data"][0]["id"]
        body = {"model": model, "prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": True}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 503
        start("prefill")
        start("decode")
        wait_for(["decode", "prefill"])
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200
        workers[0].send_signal(signal.SIGTERM)  # the prefill worker leaves
        workers[0].wait(20)
        wait_for(["decode"])  # the decode worker alone prefills for itself
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 200
        assert httpx.get(f"{url}/health", timeout=5).json()["routing"]["local_prefills"] == 1
        workers[1].send_signal(signal.SIGTERM)
        workers[1].wait(20)
        start("prefill")  # a prefill worker alone cannot serve
        wait_for(["prefill"])
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code == 503
        start("decode")  # another joins
        wait_for(["decode", "prefill"])
        r = httpx.post(f"{url}/v1/completions", json={**body, "return_token_ids": True}, timeout=30)
        assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 4
    finally:
        for p in [*workers, router]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in [*workers, router]:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.mark.parametrize("fault", ["truncate", "corrupt"])
def test_kv_that_did_not_arrive_whole_is_prefilled_again_and_the_answer_stays_exact(tiny_chat_llama, fault):
    """The decode worker's first two transfers are damaged on arrival (SPLITSERVE_KV_FAULT): it never decodes
    from them; their requests are prefilled again and answer exactly as transformers does."""
    server = ServeProcess(tiny_chat_llama, ["--prefill", "1", "--decode", "1", *ENGINE], num_workers=2,
                          env={"SPLITSERVE_KV_FAULT": f"{fault}:2"})  # fmt: skip
    try:
        model = _model(server)
        rng = random.Random(7)
        prompts = [[rng.randrange(100, 49152) for _ in range(n)] for n in (9, 40, 100)]
        expected = hf_greedy(tiny_chat_llama, prompts, [12] * 3)
        for i, prompt in enumerate(prompts):
            body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": i == 1}
            assert complete(server.http, "/v1/completions", body)[1] == expected[i]
        deadline = time.monotonic() + 10  # until a heartbeat brings the worker's counters
        while server.workers("decode")[0]["kv_transfers_pulled"] < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        (decode,) = server.workers("decode")
        assert decode["kv_checksum_failures"] == 2 and decode["kv_transfers_pulled"] == 3, decode
        metrics = server.http.get("/metrics").text
        assert "splitserve_request_retries_total 2.0" in metrics
        server.wait_idle(timeout=10)
    finally:
        server.stop()
