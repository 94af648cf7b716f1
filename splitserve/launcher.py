"""`splitserve serve`: a whole cluster on one machine: the router in this process, each worker a child process.

Cores are split between the workers (torch in several processes that each use every core slows down many
times over), children die with this process, and Ctrl-C or SIGTERM stops all of it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time

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
