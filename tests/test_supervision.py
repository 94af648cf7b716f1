"""Supervision: `splitserve serve` restarts a worker of either role that dies under load, and the cluster is back
at full strength within 30 s (clients of the dead worker get an error, or a retry when no token was sent yet);
a standalone worker rejoins a router that went away and came back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from splitserve.launcher import ServeProcess, free_port
from tests.helpers import hf_greedy
from tests.test_serving import ENGINE, _metric

pytestmark = pytest.mark.slow

PROMPT = [5, 6, 7, 8]


def _load(server: ServeProcess, model: str, stop: threading.Event, outcomes: list[str]) -> None:
    """Keep streaming requests until told to stop; record how each ended."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": 60, "ignore_eos": True, "stream": True}
    while not stop.is_set():
        try:
            with server.http.stream("POST", "/v1/completions", json=body, timeout=60) as r:
                if r.status_code != 200:
                    outcomes.append(f"http {r.status_code}")
                    r.read()
                    continue
                ended = "no [DONE]"
                for line in r.iter_lines():
                    if line.startswith("data: {") and "error" in json.loads(line[6:]):
                        ended = "error event"
                    elif line == "data: [DONE]":
                        ended = "ok" if ended == "no [DONE]" else ended
                outcomes.append(ended)
        except httpx.HTTPError as e:
            outcomes.append(type(e).__name__)


@pytest.mark.parametrize("role", ["decode", "prefill"])
def test_serve_restarts_a_worker_killed_under_load(tiny_chat_llama, role):
    server = ServeProcess(tiny_chat_llama, ["--prefill", "1", "--decode", "1", *ENGINE], num_workers=2)
    try:
        model = server.http.get("/v1/models").json()["data"][0]["id"]
        want = hf_greedy(tiny_chat_llama, [PROMPT], [6])[0]
        stop, outcomes = threading.Event(), []
        clients = [threading.Thread(target=_load, args=(server, model, stop, outcomes)) for _ in range(4)]
        for c in clients:
            c.start()
        deadline = time.monotonic() + 30
        while len(outcomes) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        [victim] = server.workers(role)
        os.kill(victim["pid"], signal.SIGKILL)
        killed = time.monotonic()
        while True:  # back at full strength: both roles present, the victim replaced
            workers = server.workers()
            if sorted(w["role"] for w in workers) == ["decode", "prefill"] and victim["id"] not in {
                w["id"] for w in workers
            }:
                break
            assert time.monotonic() - killed < 30, f"not back within 30 s: {server.health()}\n{server.logs()}"
            time.sleep(0.2)
        recovered = time.monotonic() - killed
        time.sleep(2)  # the load runs on the new worker too
        stop.set()
        for c in clients:
            c.join(90)
        body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}  # fmt: skip
        r = server.http.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == want
        metrics = server.http.get("/metrics").text
        assert _metric(metrics, "splitserve_worker_restarts_total") == 1
        assert f'splitserve_worker_restarts_total{{role="{role}"}} 1.0' in metrics
        assert server.health()["worker_restarts"] == {role: 1}
        # Every request ended cleanly: done, or an error its client was told about; most after the kill succeed.
        assert set(outcomes) <= {"ok", "error event", "http 502", "http 503"}, outcomes
        assert outcomes.count("ok") >= 4, outcomes
        server.wait_idle(timeout=10)
        print(f"{role} worker replaced in {recovered:.1f}s; outcomes {sorted(set(outcomes))}")
    finally:
        server.stop()


def test_standalone_worker_rejoins_a_router_that_came_back(tiny_chat_llama):
    port, worker_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    router_cmd = [sys.executable, "-m", "splitserve", "router", "--model", str(tiny_chat_llama), "--port", str(port),
                  "--worker-port", str(worker_port)]  # fmt: skip
    worker_cmd = [sys.executable, "-m", "splitserve", "worker", "--role", "both", "--router",
                  f"tcp://127.0.0.1:{worker_port}", "--model", str(tiny_chat_llama), *ENGINE]  # fmt: skip
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    router = subprocess.Popen(router_cmd, **quiet)
    worker = subprocess.Popen(worker_cmd, **quiet)
    want = hf_greedy(tiny_chat_llama, [PROMPT], [5])[0]

    def served() -> list[int]:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=5).json()["workers"]:
                    model = httpx.get(f"{url}/v1/models", timeout=5).json()["data"][0]["id"]
                    body = {"model": model, "prompt": PROMPT, "max_tokens": 5, "temperature": 0,
                            "ignore_eos": True, "return_token_ids": True}  # fmt: skip
                    return httpx.post(f"{url}/v1/completions", json=body, timeout=30).json()["choices"][0]["token_ids"]
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("the worker did not join")

    try:
        assert served() == want
        router.kill()
        router.wait()
        time.sleep(3)  # the worker is alone for a while
        assert worker.poll() is None, "the worker exited when its router went away"
        router = subprocess.Popen(router_cmd, **quiet)
        assert served() == want  # it rejoined the new router by itself
    finally:
        for p in (worker, router):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in (worker, router):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
