"""splitserve on Ray: a local Ray cluster of two nodes (a head and a second node, both on this machine, each
with its own raylet and resources), the prefill worker placed on one and the decode worker on the other.
Completions equal transformers'; KV moves over UCX TCP between them; Ray restarts a killed worker actor and
the cluster serves again; resizing the decode pool under load loses no request and leaks no page."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from splitserve.launcher import ServeProcess  # noqa: E402
from splitserve.ray_cluster import MANAGER_NAME, NAMESPACE, ClusterSpec, PoolManager, RayPlacement  # noqa: E402
from tests.helpers import hf_greedy  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ENGINE = ["--dtype", "fp32", "--page-size", "8", "--kv-cache-memory", "8MiB", "--max-num-batched-tokens", "64"]
NODE_MEMORY = dict(object_store_memory=80 * 1024 * 1024)


@pytest.fixture(scope="module")
def ray_cluster():
    """A head node with resource `node_a` and a second node with `node_b`, on 127.0.0.1."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"node_a": 4}, **NODE_MEMORY})
    cluster.add_node(num_cpus=2, resources={"node_b": 4}, **NODE_MEMORY)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=NAMESPACE)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_chat_llama):
    args = ["--ray", ray_cluster.address, "--prefill", "1", "--decode", "1",
            "--prefill-resources", json.dumps({"node_a": 1}), "--decode-resources", json.dumps({"node_b": 1}),
            *ENGINE]  # fmt: skip
    # UCX between the two nodes as between hosts: TCP only (no shared memory: pages are sent, not pulled).
    s = ServeProcess(tiny_chat_llama, args, num_workers=2, timeout=240, env={"UCX_TLS": "tcp"})
    yield s
    s.stop()


def _manager():
    return ray.get_actor(MANAGER_NAME, namespace=NAMESPACE)


def _complete(server, prompt: list[int], max_tokens: int) -> list[int]:
    model = server.http.get("/v1/models").json()["data"][0]["id"]
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}  # fmt: skip
    r = server.http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    return [[(seed * 31 + i * 7 + j * 13) % 370 + 8 for j in range(length + i)] for i in range(n)]


def _wait_for_workers(server, n: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = server.health()
        if len(h["workers"]) == n and h["status"] == "ok":
            return h
        time.sleep(0.2)
    raise TimeoutError(f"{n} workers not there after {timeout}s: {server.health()['workers']}")


def test_pools_on_two_nodes_serve_transformers_tokens_with_kv_over_tcp(server, tiny_chat_llama):
    actors = ray.get(_manager().actors.remote())
    where = {role: ray.get(actors[role][0].where.remote()) for role in ("prefill", "decode")}
    resources = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    assert "node_a" in resources[where["prefill"]["node_id"]]  # each pool on the node with its resource
    assert "node_b" in resources[where["decode"]["node_id"]]
    prompts = _prompts(3, 40, seed=1)
    assert [_complete(server, p, 8) for p in prompts] == hf_greedy(tiny_chat_llama, prompts, [8] * 3)
    time.sleep(0.6)  # transfer counters come with heartbeats
    workers = {w["role"]: w for w in server.workers()}
    assert {workers[r]["pid"] for r in workers} == {where[r]["pid"] for r in where}  # the actors' processes
    assert workers["decode"]["kv_bytes_received"] > 0 and workers["decode"]["kv_transfers_pulled"] == 0
    assert workers["prefill"]["kv_bytes_sent"] == workers["decode"]["kv_bytes_received"]


def test_a_killed_worker_actor_is_restarted_and_the_cluster_serves_again(server, tiny_chat_llama):
    (decode,) = ray.get(_manager().actors.remote())["decode"]
    old = {w["id"] for w in server.workers("decode")}
    killed = time.monotonic()
    ray.kill(decode, no_restart=False)
    deadline = killed + 30
    while time.monotonic() < deadline:
        now = {w["id"] for w in server.workers("decode")}
        if now and not now & old:
            break
        time.sleep(0.2)
    prompt = _prompts(1, 30, seed=2)[0]
    assert _complete(server, prompt, 6) == hf_greedy(tiny_chat_llama, [prompt], [6])[0]
    assert time.monotonic() - killed < 30
    assert not {w["id"] for w in server.workers("decode")} & old


def test_scaling_the_decode_pool_under_load_loses_no_request(server, ray_cluster, tiny_chat_llama):
    prompts = _prompts(8, 30, seed=3)
    expected = hf_greedy(tiny_chat_llama, prompts, [16] * len(prompts))
    results: dict[int, list[int]] = {}

    def load(i: int) -> None:
        results[i] = _complete(server, prompts[i], 16)

    def scale(n: int) -> str:
        cmd = [sys.executable, "-m", "splitserve", "scale", "--decode", str(n), "--ray", ray_cluster.address]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout

    threads = [threading.Thread(target=load, args=(i,)) for i in range(len(prompts))]
    for t in threads[:4]:
        t.start()
    assert "2 decode" in scale(2)  # returns once the new worker has joined
    _wait_for_workers(server, 3, 60)
    for t in threads[4:]:
        t.start()
    assert "1 decode" in scale(1)  # drains one decode worker first
    for t in threads:
        t.join(120)
    assert [results.get(i) for i in range(len(prompts))] == expected
    assert len(server.workers("decode")) == 1
    server.wait_idle(timeout=10)


def test_autoscaling_grows_the_pool_the_slo_router_finds_behind(monkeypatch):
    spec = ClusterSpec([], [], 1, "127.0.0.1", 1, 0, None, RayPlacement(), {}, max_workers=3)
    manager = PoolManager(spec)
    manager.workers = {"prefill": ["p"], "decode": ["d"], "both": []}
    grown: list[dict] = []
    room = {"decode": True, "prefill": False}
    monkeypatch.setattr(manager, "_has_room", lambda role: room[role])
    monkeypatch.setattr(manager, "scale", lambda pools: grown.append(pools) or manager.workers["decode"].append("d"))

    def poll(behind: str | None, now: float) -> str | None:
        return manager.autoscale_step({"routing": {"behind": behind}}, now)

    assert poll("decode", 0) is None  # once is not enough
    assert poll("decode", 5) == "decode" and grown == [{"decode": 2}]
    assert poll("decode", 10) is None  # at most one a minute
    assert poll("decode", 70) is None  # 3 workers: the most it may have
    manager.workers["decode"].pop()
    assert poll("prefill", 80) is None and poll("prefill", 85) is None  # no room for a prefill worker
    assert poll(None, 90) is None and poll("decode", 95) is None  # the streak starts again
    assert poll("decode", 100) == "decode"


def test_a_worker_of_several_ranks_asks_ray_for_all_of_them(monkeypatch):
    """--tensor-parallel N on Ray: a worker's ranks are its actor's process and its children, so the actor asks for
    N ranks' CPUs and GPUs (and the role's resources): Ray places it whole on one node, its devices together."""
    placement = RayPlacement("pack", {"decode": {"node_b": 1}}, cpus_per_worker=2.0, gpus_per_worker=1.0, ranks=4)
    spec = ClusterSpec([], ["--tensor-parallel", "4"], 2, "127.0.0.1", 1, 0, None, placement, {})
    asked: list[dict] = []

    class Remote:
        def options(self, **options):
            asked.append(options)
            return self

        def remote(self, *args):
            return "actor"

    monkeypatch.setattr(ray, "remote", lambda cls: Remote())
    PoolManager(spec)._worker_actor("decode")
    assert asked[0]["num_cpus"] == 8 and asked[0]["num_gpus"] == 4 and asked[0]["resources"] == {"node_b": 1}
    assert placement.needs("decode") == {"CPU": 8.0, "GPU": 4.0, "node_b": 1}
