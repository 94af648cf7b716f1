"""A cluster over two hosts: the router and a prefill worker in one network namespace, a decode worker in
another (splitserve/bench/hosts.py), KV pages crossing the veth link over UCX's TCP transport as between machines."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from splitserve.bench.hosts import Host, Unavailable, processes, two_hosts
from tests.helpers import hf_greedy

HTTP_PORT, WORKER_PORT = 8000, 8001  # each namespace has its own ports


@pytest.fixture
def hosts() -> Iterator[tuple[Host, Host]]:
    try:
        with two_hosts() as pair:
            yield pair
    except Unavailable as e:
        pytest.skip(str(e))


def _http(host: Host, script: str) -> dict:
    """Run `script` (Python; `url` is the router's, `httpx` imported) on `host`; its last printed line, as JSON."""
    return host.python(f"import httpx, json\nurl = 'http://{host.address}:{HTTP_PORT}'\n{script}")


def _health(host: Host) -> dict:
    return _http(host, "print(httpx.get(url + '/health', timeout=10).text)")


def _wait(host: Host, ready, what: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(RuntimeError, json.JSONDecodeError):
            health = _health(host)
            if ready(health):
                return health
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(1)


def _streamed(health: dict) -> bool:
    return sum(w["kv_messages_streamed"] for w in health["workers"] if w["role"] == "prefill") > 0


def _all_pages_free(health: dict) -> bool:
    return all(pool["free_pages"] == pool["num_pages"] for pool in health["pools"].values()) and not any(
        health["jobs"].values()
    )


@pytest.mark.slow
def test_a_decode_worker_on_another_host_gets_its_kv_over_the_link(tiny_chat_llama: Path, hosts):
    folder = str(tiny_chat_llama)
    # Prompts prefilled 16 tokens a pass: their pages stream over the link while the next chunk computes (small
    # messages, which the decode worker's reservations ask for, so that a chunk completes some).
    engine = ["--model", folder, "--dtype", "fp32", "--device", "cpu", "--page-size", "4", "--max-num-batched-tokens",
              "16", "--router"]  # fmt: skip
    a, b = hosts
    with processes() as started:
        started.append(a.splitserve(["router", "--model", folder, "--host", a.address, "--port", str(HTTP_PORT),
                                       "--worker-host", a.address, "--worker-port", str(WORKER_PORT)]))  # fmt: skip
        router = f"tcp://{a.address}:{WORKER_PORT}"
        started.append(a.splitserve(["worker", "--role", "prefill", *engine, router], a.ucx_env))
        small_messages = {**b.ucx_env, "SPLITSERVE_KV_MIN_MESSAGE_BYTES": "1024"}
        started.append(b.splitserve(["worker", "--role", "decode", *engine, router], small_messages))
        _wait(a, lambda h: len(h["workers"]) == 2, "both workers to join")

        prompts = [[11, 12, 13, 14, 15], list(range(100, 140)), [7, 300, 301, 302] * 9]
        body = {"model": tiny_chat_llama.name, "prompt": prompts, "max_tokens": 10, "temperature": 0}
        answer = _http(a, f"print(httpx.post(url + '/v1/completions', json={body!r}, timeout=60).text)")
        texts = {c["index"]: c["text"] for c in answer["choices"]}
        expected = hf_greedy(tiny_chat_llama, prompts, [10] * len(prompts))
        tokenizer = AutoTokenizer.from_pretrained(tiny_chat_llama)
        assert [texts[i] for i in range(len(prompts))] == [
            tokenizer.decode(t, skip_special_tokens=True) for t in expected
        ]

        health = _health(a)
        moved = {w["role"]: (w["kv_bytes_sent"], w["kv_bytes_received"]) for w in health["workers"]}
        assert moved["prefill"][0] > 0 and moved["decode"][1] == moved["prefill"][0]  # every byte over the link
        pulled = _http(a, "print(json.dumps(sum(float(l.split()[-1]) for l in httpx.get(url + '/metrics').text"
                          ".splitlines() if l.startswith('splitserve_kv_transfers_pulled_total{'))))")  # fmt: skip
        assert pulled == 0  # not through shared memory: the hosts share none

        # A client that goes away mid-stream: its pages come back on both hosts.
        stream = {"model": tiny_chat_llama.name, "prompt": list(range(20, 80)), "max_tokens": 200, "stream": True,
                  "ignore_eos": True}  # fmt: skip
        _http(
            a,
            f"""
with httpx.stream('POST', url + '/v1/completions', json={stream!r}, timeout=60) as r:
    for line in r.iter_lines():
        if line.startswith('data: {{'):
            break
print('{{}}')
""",
        )
        _wait(a, _all_pages_free, "every page back after the client left")
        # Its 60 tokens took 4 passes, after the first request's handshake: its pages streamed while it prefilled.
        _wait(a, _streamed, "messages streamed", timeout=10)
