"""`splitserve serve`: a whole cluster on one machine: the router in this process, each worker a child process.

Cores are split between the workers (torch in several processes that each use every core slows down many
times over), children die with this process, and Ctrl-C or SIGTERM stops all of it.

`ServeProcess` runs `splitserve serve` itself as a child process, on free ports, and waits for its workers:
what tests and benchmarks use to get a real cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from splitserve.children import die_with_parent
from splitserve.router.cluster.cluster import Cluster
from splitserve.router.http.server import ServerOptions, run_router

log = logging.getLogger(__name__)


def serve(
    server: ServerOptions,
    cluster_options: dict,
    worker_argv: list[str],
    pools: dict[str, int],
    threads: int | None,
    verbose: bool,
    ranks: int = 1,
    router_argv: list[str] | None = None,
) -> None:
    """`pools`: how many workers of each role (prefill, decode, both); `worker_argv`: their engine options;
    `ranks`: processes per worker (--tensor-parallel), each taking `threads` (default: its share of the cores).
    With `--routers N` this process is router replica 0 and starts replicas 1..N-1 (`router_argv`: the router's
    options), all on the HTTP port; every worker joins all of them."""
    replicas = cluster_options.get("replicas", 1)
    routers: Supervisor | None = None
    processes, cores = sum(pools.values()) * ranks, os.cpu_count() or 1
    per_worker = threads or max(1, worker_threads(pools, cores) // ranks)
    supervisor: Supervisor | None = None

    def start_routers(address: str) -> list[str]:
        """Replicas 1..N-1 as child processes, restarted (on the same worker port) when one dies; all the routers'
        worker sockets, replica i's i-th."""
        nonlocal routers
        host = address.removeprefix("tcp://").rsplit(":", 1)[0]
        addresses, slots = [address], []
        for i in range(1, replicas):
            port = free_port()
            argv = [sys.executable, "-m", "splitserve", *(["-v"] if verbose else []), "router", *(router_argv or []),
                    "--replica", str(i), "--worker-host", host, "--worker-port", str(port)]  # fmt: skip
            slots.append(("router", argv))
            addresses.append(f"tcp://{host}:{port}")
        if slots:
            routers = Supervisor(slots, dict(os.environ), joined=lambda: len(slots), on_ready=lambda: None,
                                 on_restart=lambda role: None)  # fmt: skip
            routers.start()
        return addresses

    def start_workers(address: str, cluster: Cluster) -> None:
        nonlocal supervisor
        address = ",".join(start_routers(address))
        env = {**os.environ, "OMP_NUM_THREADS": str(per_worker)}
        if processes * per_worker > cores:
            # More threads than cores: a thread of an idle worker must not spin long at a barrier, or it would
            # steal the busy worker's core; a short spin (~10 us) still spans the gaps between a step's kernels,
            # where sleeping at once (OMP_WAIT_POLICY=PASSIVE) costs a wake-up each: 16.5 against 8.4 ms a token.
            env["GOMP_SPINCOUNT"] = "20000"
        argv = {role: [sys.executable, "-m", "splitserve", *(["-v"] if verbose else []), "worker", "--role", role,
                       "--router", address, "--threads", str(per_worker), *worker_argv]
                for role in pools}  # fmt: skip
        each = f"{per_worker} thread(s) each" + (f" in each of {ranks} ranks" if ranks > 1 else "")
        print(f"splitserve serve: starting {', '.join(f'{n} {role}' for role, n in pools.items() if n)} worker(s), "
              f"{each}", flush=True)  # fmt: skip
        slots = [(role, argv[role]) for role, n in pools.items() for _ in range(n)]

        def ready() -> None:
            print(f"splitserve: serving {cluster.options.model} on http://{server.host}:{server.port} with "
                  f"{len(slots)} workers (Ctrl-C stops)", flush=True)  # fmt: skip

        supervisor = Supervisor(slots, env, joined=lambda: cluster.num_joined, on_ready=ready,
                                on_restart=cluster.report_restart)  # fmt: skip
        supervisor.start()

    try:
        run_router(server, cluster_options, on_bound=start_workers)
    finally:
        for children in (supervisor, routers):
            if children is not None:
                children.stop()


@dataclass
class _Slot:
    """One worker place of the cluster: its command, its current process, and its restart history."""

    role: str
    argv: list[str]
    process: subprocess.Popen | None = None
    started: float = 0.0
    restart_at: float | None = None  # a restart is due then
    recent_restarts: list[float] = field(default_factory=list)
    given_up: bool = False


def worker_threads(pools: dict[str, int], cores: int) -> int:
    """Threads per worker: the cores shared by the workers that decode (decode and colocated ones), which run
    without pause, while prefill workers work in bursts and take the same count, so whichever pool is busy has
    every core. 1P+1D on 2 cores, 2 threads each against 1 (benchmarks/vs_llamacpp.py, 2026-12-07): 8.4 against
    11.9 ms a token for 1 stream, 272 against 244 output tok/s for 16."""
    return max(1, cores // max(1, pools.get("decode", 0) + pools.get("both", 0)))


class Supervisor:
    """Starts `serve`'s workers and restarts any that exits: after 1, 2, 4 ... 30 s (the delay resets once a
    worker has run for a minute), at most `max_restarts` times in 10 minutes per worker place, then gives that
    place up (the cluster goes on with the others). Each restart is logged and reported (`on_restart(role)`:
    `serve` counts it on /metrics). A worker that exits before all have joined (`joined()`, then `on_ready()`)
    cannot start: everything stops."""

    MAX_BACKOFF_S = 30.0
    WINDOW_S = 600.0

    def __init__(
        self,
        workers: list[tuple[str, list[str]]],
        env: dict[str, str],
        joined: Callable[[], int],
        on_ready: Callable[[], None],
        on_restart: Callable[[str], None],
        max_restarts: int = 5,
    ):
        """`workers`: (role, command) of each worker place."""
        self.env, self.max_restarts = env, max_restarts
        self._joined, self._on_ready, self._on_restart = joined, on_ready, on_restart
        self.slots = [_Slot(role, argv) for role, argv in workers]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    def start(self) -> None:
        for slot in self.slots:
            self._spawn(slot)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(2)
        _stop([slot.process for slot in self.slots if slot.process is not None])

    def _spawn(self, slot: _Slot) -> None:
        slot.process = subprocess.Popen(slot.argv, env=self.env, preexec_fn=die_with_parent)
        slot.started, slot.restart_at = time.monotonic(), None

    def _watch(self) -> None:
        ready = False
        while not self._stopping.wait(0.2):
            if not ready and self._joined() >= len(self.slots):
                ready = True
                self._on_ready()
            now = time.monotonic()
            for slot in self.slots:
                if slot.given_up or slot.process is None:
                    continue
                if slot.restart_at is not None:
                    if now >= slot.restart_at and not self._stopping.is_set():
                        self._spawn(slot)
                    continue
                status = slot.process.poll()
                if status is None:
                    continue
                if not ready:  # a worker that cannot start: the cluster never will; stop it all
                    log.error("a %s worker failed to start (exit status %s); stopping", slot.role, status)
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
                self._schedule_restart(slot, status, now)

    def _schedule_restart(self, slot: _Slot, status: int, now: float) -> None:
        slot.recent_restarts = [t for t in slot.recent_restarts if now - t < self.WINDOW_S]
        if len(slot.recent_restarts) >= self.max_restarts:
            slot.given_up = True
            log.error("%s worker (pid %d) exited with status %s; it exited %d times in %.0f minutes, so it is not "
                      "restarted again", slot.role, slot.process.pid, status, len(slot.recent_restarts) + 1,
                      self.WINDOW_S / 60)  # fmt: skip
            return
        if now - slot.started > 60:
            slot.recent_restarts.clear()  # it ran well for a while: start the backoff over
        delay = min(self.MAX_BACKOFF_S, 2.0 ** len(slot.recent_restarts))
        slot.recent_restarts.append(now)
        slot.restart_at = now + delay
        self._on_restart(slot.role)
        log.warning("%s worker (pid %d) exited with status %s; restarting it in %.0fs", slot.role, slot.process.pid,
                    status, delay)  # fmt: skip


def _stop(children: list[subprocess.Popen]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`splitserve serve MODEL ARGS` in a child process (its own session), stopped by `stop()` whatever happens."""

    def __init__(
        self,
        model: Path | None,
        args: list[str],
        num_workers: int,
        timeout: float = 180,
        api_key: str | None = None,
        env: dict[str, str] | None = None,
    ):
        """`env`: variables added to the server's environment (and so its workers')."""
        self.port, self.worker_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.worker_address = f"tcp://127.0.0.1:{self.worker_port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="splitserve-", suffix=".log", delete=False)  # noqa: SIM115
        cmd = [sys.executable, "-m", "splitserve", "-v", "serve", "--port", str(self.port),
               "--worker-port", str(self.worker_port), *(["--model", str(model)] if model else []),
               *(["--api-key", api_key] if api_key else []), *args]  # fmt: skip
        self.process = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})}
        )
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, timeout=120, headers=headers)
        try:
            self._wait_for_workers(num_workers, timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_for_workers(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"splitserve serve exited with {self.process.returncode}:\n{self.logs()}")
            with contextlib.suppress(httpx.HTTPError):
                if len(self.health()["workers"]) == n:
                    return
            time.sleep(0.3)
        raise TimeoutError(f"{n} workers did not join within {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        return Path(self.log.name).read_text()[-6000:]

    def health(self) -> dict:
        return self.http.get("/health").json()

    def workers(self, role: str | None = None) -> list[dict]:
        return [w for w in self.health()["workers"] if role is None or w["role"] == role]

    def wait_idle(self, timeout: float = 5) -> dict:
        """Wait until no request is left anywhere and every worker's pages are all free; returns /health."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            busy = h["queue"] or any(h["jobs"].values())
            leaked = [w for w in h["workers"] if w["free_pages"] != w["num_pages"] or w["running"] or w["waiting"]]
            if not busy and not leaked:
                return h
            if time.monotonic() > deadline:
                raise AssertionError(f"not idle after {timeout}s (pages leaked or requests left): {h}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(20)
        with contextlib.suppress(ProcessLookupError):  # anything left in its session
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.log.close()
        os.unlink(self.log.name)
