"""A real splitserve cluster for tests: `splitserve serve` in a child process (router + workers, each its own
process) on 127.0.0.1 with free ports, stopped afterwards whatever happens."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(
        self, model: Path | None, args: list[str], num_workers: int, timeout: float = 180, api_key: str | None = None
    ):
        self.port, self.worker_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.worker_address = f"tcp://127.0.0.1:{self.worker_port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="splitserve-", suffix=".log", delete=False)  # noqa: SIM115
        cmd = [sys.executable, "-m", "splitserve", "-v", "serve", "--port", str(self.port),
               "--worker-port", str(self.worker_port), *(["--model", str(model)] if model else []),
               *(["--api-key", api_key] if api_key else []), *args]  # fmt: skip
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
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
