"""`splitserve serve --ray`: the cluster on a Ray cluster, placed, supervised and sized by Ray.

The router and every worker run as Ray actors with their resources declared (a GPU per worker on GPU nodes,
its threads' CPUs otherwise). Each actor runs its splitserve process (`splitserve router`, `splitserve
worker`) as a child that dies with it, and exits when its child does, so Ray's actor restarts are what
restart a dead process. Workers join the router over ZeroMQ and move KV over UCX exactly as without Ray:
Ray carries no tensor and no request.

A named actor, the `PoolManager` ("splitserve-pools" in namespace "splitserve"), owns the other actors: it
starts the router on the node of the process that ran `serve --ray` (its HTTP endpoint is the cluster's),
sizes the pools (`scale`: a new worker joins as soon as it has loaded; a removed one is drained by the
router first, so no request is lost) and shuts it all down. `splitserve scale` reaches it from any process
that can join the Ray cluster. With `max_workers`, it also follows the SLO router: when two polls in a row
find the router's windows saying the same pool is behind, and the Ray cluster has room for one more worker
there, it adds one (`autoscale_step`, the same `scale`), at most one a minute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx

from splitserve.children import die_with_parent

log = logging.getLogger(__name__)

NAMESPACE = "splitserve"
MANAGER_NAME = "splitserve-pools"
# Environment the processes take from the `serve --ray` driver wherever they run (Ray starts actors with
# the node's environment, not the driver's).
_FORWARDED_ENV = ("UCX_", "SPLITSERVE_", "HF_", "TRITON_")


@dataclass(frozen=True)
class RayPlacement:
    """How workers are placed: Ray's `SPREAD` or default (`pack`) strategy, and custom Ray resources a role's
    workers must have (e.g. `{"node:10.0.0.7": 0.01}` to pin them to a node)."""

    strategy: str = "spread"  # spread | pack
    resources: dict[str, dict[str, float]] = field(default_factory=dict)  # by role
    cpus_per_worker: float = 1.0  # per rank, as the GPUs
    gpus_per_worker: float = 0.0  # 1 on GPU nodes: Ray sets CUDA_VISIBLE_DEVICES for the worker
    # Processes per worker (--tensor-parallel): its ranks are its actor's process and that process's children,
    # so one actor asking for every rank's CPUs and GPUs keeps a worker's ranks on one node, its devices together.
    ranks: int = 1

    def needs(self, role: str) -> dict[str, float]:
        """What one worker of `role` asks Ray for."""
        return {"CPU": self.cpus_per_worker * self.ranks, "GPU": self.gpus_per_worker * self.ranks,
                **self.resources.get(role, {})}  # fmt: skip


def _serving_child() -> None:
    """In the child, before exec: die with the actor, and run at the normal priority. Ray starts its workers
    niced (`RAY_worker_niceness`, 15), which a serving process must not inherit: on a busy node a niced
    worker gets a sliver of the CPU (two busy processes on 2 cores stretched a cluster's start from 9 s to
    over 6 minutes). Lowering a niceness needs privilege (root, CAP_SYS_NICE or RLIMIT_NICE); without it the
    child keeps Ray's."""
    die_with_parent()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, 0)


class ProcessActor:
    """One splitserve process, as a child of this actor: it dies with the actor (parent-death signal), and
    the actor exits when it does, so that Ray restarts both."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self._stopping = False
        self.process = subprocess.Popen(argv, env={**os.environ, **env}, preexec_fn=_serving_child)
        threading.Thread(target=self._watch, name="child", daemon=True).start()

    def _watch(self) -> None:
        status = self.process.wait()
        if not self._stopping:
            log.error("process %s exited with status %s: restarting its actor", self.process.args[4:6], status)
            os._exit(1)

    def where(self) -> dict:
        """Its host name and its child's pid (as the router's /health names the process), and its Ray node."""
        import ray

        return {
            "host": socket.gethostname(),
            "pid": self.process.pid,
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def stop(self) -> None:
        """SIGTERM the child (a worker says goodbye to the router) and wait for it."""
        self._stopping = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()


@dataclass(frozen=True)
class ClusterSpec:
    """What `serve --ray` starts: the processes' command lines and where the router listens."""

    router_argv: list[str]  # without --worker-host/--worker-port (the manager sets them on the router's node)
    worker_argv: list[str]  # engine options, shared by every role
    threads: int  # per worker
    http_host: str  # where the router serves HTTP (on its node)
    http_port: int
    worker_port: int  # 0: any free one on the router's node
    api_key: str | None
    placement: RayPlacement
    env: dict[str, str]
    max_workers: int = 0  # > 0: grow the pool the SLO router finds behind, up to this many workers in all


class PoolManager:
    """Owns the router's and the workers' actors (run as the named actor `MANAGER_NAME`)."""

    def __init__(self, spec: ClusterSpec):
        self.spec = spec
        self.router = None
        self.address = ""  # the router's worker socket, tcp://NODE_IP:PORT
        self.workers: dict[str, list] = {"prefill": [], "decode": [], "both": []}
        host = "127.0.0.1" if spec.http_host in ("0.0.0.0", "::", "") else spec.http_host
        headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
        self._http = httpx.Client(base_url=f"http://{host}:{spec.http_port}", headers=headers, timeout=30)
        self._stopping = threading.Event()
        self._resizing = threading.Lock()  # `scale` calls (an operator's, autoscaling's) one at a time
        self._last_behind: str | None = None
        self._last_growth = -float("inf")

    def start(self, pools: dict[str, int], timeout_s: float = 300.0) -> str:
        """Start the router on this node, then the pools; returns once every worker has joined."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from splitserve.launcher import free_port

        port, ip = self.spec.worker_port or free_port(), ray.util.get_node_ip_address()
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        actor = ray.remote(ProcessActor).options(num_cpus=0, max_restarts=-1, scheduling_strategy=here)
        # Workers on other nodes reach the router at this node's address (the one Ray uses).
        argv = [*self.spec.router_argv, "--worker-host", ip, "--worker-port", str(port)]
        self.router = actor.remote(argv, self.spec.env)
        self.address = f"tcp://{ip}:{port}"
        self._wait_for(lambda h: True, timeout_s, "the router did not answer")
        self.scale(pools, timeout_s)
        return self.address

    def scale(self, pools: dict[str, int], timeout_s: float = 300.0) -> dict[str, int]:
        """Grow or shrink the pools to `pools` (roles not named keep their size); returns the sizes."""
        with self._resizing:
            return self._resize(pools, timeout_s)

    def _resize(self, pools: dict[str, int], timeout_s: float) -> dict[str, int]:
        target = {**self.sizes(), **pools}
        if min(target.values()) < 0 or target["decode"] + target["both"] == 0:
            raise ValueError(f"not a cluster: {target} (it needs a decode or a colocated worker)")
        if target["prefill"] and not target["decode"]:
            raise ValueError("prefill workers need a decode worker to send their pages to")
        for role, n in pools.items():
            while len(self.workers[role]) > n:
                self._remove(role)
            for _ in range(n - len(self.workers[role])):
                self.workers[role].append(self._worker_actor(role))
        want = sum(len(a) for a in self.workers.values())
        self._wait_for(lambda h: len(h["workers"]) >= want, timeout_s, f"{want} workers did not join")
        return self.sizes()

    def sizes(self) -> dict[str, int]:
        return {role: len(actors) for role, actors in self.workers.items()}

    def actors(self) -> dict[str, list]:
        """Each role's worker actors (for tests and operators: `ray.kill` one and Ray restarts it)."""
        return {role: list(actors) for role, actors in self.workers.items()}

    def autoscale(self, period_s: float = 5.0) -> None:
        """Follow the SLO router until `shutdown` (see the module's docstring)."""
        while not self._stopping.wait(period_s):
            try:
                self.autoscale_step(self._health(), time.monotonic())
            except Exception:  # the router is restarting, or Ray is busy: try again next time
                log.exception("autoscaling")

    def autoscale_step(self, health: dict, now: float, cooldown_s: float = 60.0) -> str | None:
        """One poll of the router's /health: the role a worker was added to, if one was."""
        behind = (health.get("routing") or {}).get("behind")
        confirmed, self._last_behind = behind is not None and behind == self._last_behind, behind
        if not confirmed or now - self._last_growth < cooldown_s:
            return None
        if sum(self.sizes().values()) >= self.spec.max_workers or not self._has_room(behind):
            return None
        self._last_growth = now
        log.warning("the SLO router finds the %s pool behind: adding a worker to it", behind)
        self.scale({behind: len(self.workers[behind]) + 1})
        return behind

    def _has_room(self, role: str) -> bool:
        """Whether the Ray cluster has, free right now, what one more worker of `role` asks for."""
        import ray

        need = self.spec.placement.needs(role)
        free = ray.available_resources()
        return all(free.get(name, 0.0) >= amount for name, amount in need.items() if amount)

    def shutdown(self) -> None:
        import ray

        self._stopping.set()
        for actor in [a for actors in self.workers.values() for a in actors] + [self.router]:
            if actor is not None:
                try:
                    ray.get(actor.stop.remote(), timeout=30)
                finally:
                    ray.kill(actor, no_restart=True)
        self.workers = {role: [] for role in self.workers}
        self.router = None

    # --- inside ----------------------------------------------------------------------------------------

    def _worker_actor(self, role: str):
        import ray

        p = self.spec.placement
        need = p.needs(role)
        options = {"max_restarts": -1, "num_cpus": need.pop("CPU"), "num_gpus": need.pop("GPU"), "resources": need,
                   "scheduling_strategy": "SPREAD" if p.strategy == "spread" else "DEFAULT"}  # fmt: skip
        argv = [sys.executable, "-m", "splitserve", "worker", "--role", role, "--router", self.address,
                "--threads", str(self.spec.threads), *self.spec.worker_argv]  # fmt: skip
        env = {**self.spec.env, "OMP_NUM_THREADS": str(self.spec.threads)}
        return ray.remote(ProcessActor).options(**options).remote(argv, env)

    def _remove(self, role: str, timeout_s: float = 600.0) -> None:
        """Drain the newest worker of `role` (the router sends it nothing new; its requests finish), then stop
        its actor: no request is lost, no page leaks."""
        import ray

        actor = self.workers[role].pop()
        at = ray.get(actor.where.remote())
        worker = next((w for w in self._health()["workers"] if (w["host"], w["pid"]) == (at["host"], at["pid"])), None)
        if worker is not None:
            r = self._http.post(f"/admin/workers/{worker['id']}/drain")
            r.raise_for_status()
            self._wait_for(lambda h: all(w["jobs"] == 0 for w in h["workers"] if w["id"] == worker["id"]),
                           timeout_s, f"worker {worker['id']} did not drain")  # fmt: skip
        try:
            ray.get(actor.stop.remote(), timeout=30)
        finally:
            ray.kill(actor, no_restart=True)

    def _health(self) -> dict:
        return self._http.get("/health").json()

    def _wait_for(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if ready(self._health()):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{what} within {timeout_s:.0f}s")


def connect(address: str | None):
    """Join the Ray cluster at `address` ("auto": the one this node belongs to), or start a local one."""
    try:
        import ray
    except ImportError:
        raise SystemExit("Ray is not installed: pip install 'splitserve[ray]'") from None
    ray.init(address=address or None, namespace=NAMESPACE, ignore_reinit_error=True, log_to_driver=True,
             configure_logging=False)  # fmt: skip
    return ray


def serve_on_ray(address: str | None, spec: ClusterSpec, pools: dict[str, int]) -> None:
    """Start the cluster on Ray and serve until Ctrl-C or SIGTERM, then stop every actor."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray = connect(address)
    if (
        spec.placement.gpus_per_worker == 0
        and ray.cluster_resources().get("GPU", 0)
        and "--device" not in (spec.worker_argv)
    ):
        spec = dataclasses.replace(spec, placement=dataclasses.replace(spec.placement, gpus_per_worker=1.0))
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    manager_class = ray.remote(PoolManager).options(name=MANAGER_NAME, num_cpus=0, max_concurrency=4,
                                                    scheduling_strategy=here)  # fmt: skip
    manager = manager_class.remote(spec)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        worker_address = ray.get(manager.start.remote(pools))
        sizes = ray.get(manager.sizes.remote())
        if spec.max_workers:
            manager.autoscale.remote()
        print(f"splitserve: serving on http://{spec.http_host}:{spec.http_port} (this node) with "
              f"{', '.join(f'{n} {role}' for role, n in sizes.items() if n)} worker(s) on Ray "
              f"(workers join at {worker_address}; `splitserve scale` resizes; Ctrl-C stops)", flush=True)  # fmt: skip
        stopping.wait()
    finally:
        try:
            ray.get(manager.shutdown.remote(), timeout=120)
        finally:
            ray.kill(manager, no_restart=True)
            ray.shutdown()


def scale(address: str | None, pools: dict[str, int]) -> dict[str, int]:
    """Resize the pools of the cluster `serve --ray` runs on the Ray cluster at `address`."""
    ray = connect(address or "auto")
    try:
        manager = ray.get_actor(MANAGER_NAME, namespace=NAMESPACE)
    except ValueError:
        raise SystemExit("no splitserve cluster runs on this Ray cluster (start one with `serve --ray`)") from None
    return ray.get(manager.scale.remote(pools))


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_ENV)}
