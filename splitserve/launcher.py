"""`splitserve serve`: a whole cluster on one machine: the router in this process, each worker a child process.

Cores are split between the workers (torch in several processes that each use every core slows down many
times over), children die with this process, and Ctrl-C or SIGTERM stops all of it.

`ServeProcess` runs `splitserve serve` itself as a child process, on free ports, and waits for its workers:
what tests and benchmarks use to get a real cluster.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from splitserve.router.cluster import Cluster
from splitserve.router.server import ServerOptions, run_router

log = logging.getLogger(__name__)


def serve(
    server: ServerOptions,
    cluster_options: dict,
    worker_argv: list[str],
    pools: dict[str, int],
    threads: int | None,
    verbose: bool,
) -> None:
    """`pools`: how many workers of each role (prefill, decode, both); `worker_argv`: their engine options."""
    num_workers = sum(pools.values())
    per_worker = threads or max(1, (os.cpu_count() or 1) // num_workers)
    children: list[subprocess.Popen] = []

    def start_workers(address: str, cluster: Cluster) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(per_worker), "OMP_WAIT_POLICY": "PASSIVE"}
        for role, count in pools.items():
            for _ in range(count):
                argv = [sys.executable, "-m", "splitserve", *(["-v"] if verbose else []), "worker", "--role", role,
                        "--router", address, "--threads", str(per_worker), *worker_argv]  # fmt: skip
                children.append(subprocess.Popen(argv, env=env, preexec_fn=_die_with_parent))
        threading.Thread(target=_announce, args=(server, cluster, children, num_workers), daemon=True).start()

    try:
        run_router(server, cluster_options, on_bound=start_workers)
    finally:
        _stop(children)


def _announce(server: ServerOptions, cluster: Cluster, children: list[subprocess.Popen], expected: int) -> None:
    """Say when every worker has joined; report workers that exit on their own."""
    ready = False
    reported: set[int] = set()
    while True:
        time.sleep(0.2)
        if not ready and len(cluster.workers) >= expected:
            ready = True
            print(f"splitserve: serving {cluster.options.model} on http://{server.host}:{server.port} "
                  f"with {expected} workers (Ctrl-C stops)", flush=True)  # fmt: skip
        for child in children:
            if child.poll() is not None and child.pid not in reported:
                reported.add(child.pid)
                log.warning("worker process %d exited with status %s", child.pid, child.returncode)
                if not ready:  # a worker that cannot start: the cluster never will; stop it all
                    log.error("a worker failed to start; stopping")
                    os.kill(os.getpid(), signal.SIGTERM)


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


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the parent dies, however it dies (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


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
