"""Several routers in front of the same workers (`serve --routers N`): every worker joins all of them, each
router's job ids are its own (a worker answers each job to the router that issued it), one port for clients;
killing one router ends its own clients' streams only, and the workers keep serving through the others."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time

import httpx
import psutil
import pytest

from splitserve.cli import main as cli_main
from splitserve.launcher import ServeProcess
from splitserve.protocol import Heartbeat, KvStats, Load, Role, TokenOut, Tokens
from splitserve.router.cluster.cluster import Cluster
from splitserve.router.cluster.options import RouterOptions
from splitserve.worker import addressed, routers
from tests.helpers import fake_worker_info, hf_greedy
from tests.test_cluster_faults import _stream_all
from tests.test_serving import ENGINE


def test_a_jobs_messages_go_to_the_router_that_issued_it():
    """Replica i of N issues job ids that leave i modulo N; a worker sends each job's messages to that replica
    (its i-th router), splits a `Tokens` message by job, and gives every router its heartbeats."""
    ids = {}
    for replica in range(3):
        cluster = Cluster(RouterOptions(model="m", replica=replica, replicas=3))
        ids[replica] = [next(cluster._wire_ids) for _ in range(5)]
        asyncio.run(cluster.stop())
    assert all(job % 3 == replica for replica, jobs in ids.items() for job in jobs)
    load = Load(0, 0, 0, 0)
    tokens = Tokens([TokenOut(ids[0][0], 5), TokenOut(ids[2][0], 6), TokenOut(ids[0][1], 7)], load)
    parts = dict(addressed(tokens, 3))
    assert [t.job for t in parts[0].items] == ids[0][:2] and [t.job for t in parts[2].items] == [ids[2][0]]
    assert 1 not in parts
    beat = Heartbeat(fake_worker_info("w", Role.DECODE), load, KvStats(), 0.0)
    assert [i for i, _ in addressed(beat, 3)] == [0, 1, 2]
    assert addressed(tokens, 1) == [(0, tokens)]
    assert routers("tcp://a:1, tcp://b:2") == ["tcp://a:1", "tcp://b:2"]
    with pytest.raises(ValueError, match=r"--replica must be in 0\.\.1"):
        RouterOptions(model="m", replica=2, replicas=2)


def _every_router_has(server: ServeProcess, workers: int) -> bool:
    """Whether /health, asked on 16 new connections (the kernel spreads them over the routers), always counts
    `workers` workers."""
    for _ in range(16):
        r = httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=10)
        if r.status_code != 200 or len(r.json()["workers"]) != workers:
            return False
    return True


@pytest.mark.slow
def test_two_routers_share_the_workers_and_one_dying_leaves_the_other_serving(tiny_chat_llama):
    server = ServeProcess(tiny_chat_llama, ["--routers", "2", "--prefill", "1", "--decode", "1", *ENGINE],
                          num_workers=2)  # fmt: skip
    try:
        (replica,) = [p for p in psutil.Process(server.process.pid).children(recursive=True)
                      if "--replica" in p.cmdline()]  # fmt: skip
        deadline = time.monotonic() + 60  # every router has both workers (each learns them from heartbeats)
        while not _every_router_has(server, 2) and time.monotonic() < deadline:
            time.sleep(0.2)
        model = server.http.get("/v1/models").json()["data"][0]["id"]
        rng = random.Random(41)
        prompts = [[rng.randrange(100, 49152) for _ in range(rng.randrange(5, 30))] for _ in range(12)]
        bodies = [{"model": model, "prompt": p, "max_tokens": 60, "ignore_eos": True, "stream": True,
                   "temperature": 0} for p in prompts]  # fmt: skip
        expected = hf_greedy(tiny_chat_llama, prompts, [60] * 12)
        before = _stream_all(server, bodies)  # through both routers (the kernel spreads the connections)
        assert [r["tokens"] for r in before] == expected
        # Now kill replica 1 while 12 streams run: the streams it served end short, the others are whole.
        started = threading.Barrier(len(bodies) + 1)
        results: list[dict] = []
        runner = threading.Thread(target=lambda: results.extend(_stream_all(server, bodies, started, 3)))
        runner.start()
        started.wait(timeout=120)
        os.kill(replica.pid, signal.SIGKILL)
        runner.join(180)
        whole = [r["done"] for r in results]
        assert 0 < sum(whole) < len(results), "the kernel gave every stream to one router (2 in 4,096 runs)"
        for r, want in zip(results, expected, strict=True):
            if r["done"]:
                assert r["tokens"] == want and "error" not in r
            else:
                assert "cut" in r and r["tokens"] == want[: len(r["tokens"])]  # cut short, never wrong
        # The workers keep serving through the router left; the dead router's jobs end there, every page freed.
        after = _stream_all(server, bodies[:4])
        assert [r["tokens"] for r in after] == expected[:4]
        server.wait_idle(timeout=60)
        # `serve` restarts the replica on its worker port; the workers rejoin it and it serves again.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            restarted = [p for p in psutil.Process(server.process.pid).children(recursive=True)
                         if "--replica" in p.cmdline() and p.pid != replica.pid]  # fmt: skip
            if restarted and _every_router_has(server, 2):
                break
            time.sleep(0.5)
        else:
            raise AssertionError("the router replica was not restarted, or the workers did not rejoin it")
        again = _stream_all(server, bodies)
        assert [r["tokens"] for r in again] == expected and all(r["done"] for r in again)
    finally:
        server.stop()


def test_serve_numbers_its_routers_itself(capsys):
    assert cli_main(["serve", "--replica", "1"]) != 0
    assert "--replica is for a router started alone" in capsys.readouterr().err
