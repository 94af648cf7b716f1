"""Two "hosts" on one machine, for tests and benchmarks: network namespaces joined by a veth pair (`ip netns`,
as root), so that processes in one reach those in the other only over that link, and KV pages cross it over
UCX's TCP transport as between machines (UCX's shared-memory transports are off). The link can be shaped
with `tc` (a rate each way, and a delay where the kernel has netem), as a 1 or 10 Gbit/s network would be.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from splitserve.planner.link import parse_rate


class Unavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no `ip`, no permission)."""


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str
    device: str  # its end of the veth pair

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *argv]

    @property
    def ucx_env(self) -> dict[str, str]:
        """UCX over TCP on this host's link only, as between two machines."""
        return {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": self.device}

    def splitserve(self, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """`python -m splitserve ARGS` on this host (output discarded)."""
        return subprocess.Popen(self.command([sys.executable, "-m", "splitserve", *args]),
                                env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip

    def python(self, script: str, timeout: float = 120) -> dict | list:
        """Run `script` (Python) on this host; its last printed line, as JSON."""
        out = subprocess.run(self.command([sys.executable, "-c", script]), capture_output=True, text=True,
                             timeout=timeout)  # fmt: skip
        if out.returncode:
            raise RuntimeError(f"a script on {self.namespace} failed:\n{out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def shape(self, rate: str | None, delay_ms: float = 0.0) -> str:
        """Limit what leaves this host over the link to `rate` (tc's units: 1gbit, 10gbit) after `delay_ms`;
        None and 0: unshaped. With `netem` (a kernel module some kernels lack) both; else the rate alone, by a
        token bucket (`tbf`). Returns what was applied."""
        base = ["ip", "netns", "exec", self.namespace, "tc", "qdisc"]
        subprocess.run([*base, "del", "dev", self.device, "root"], capture_output=True, timeout=30)
        if rate is None and not delay_ms:
            return "unshaped"
        netem = ["netem", "delay", f"{delay_ms}ms", *(["rate", rate] if rate else []), "limit", "100000"]
        if not subprocess.run([*base, "add", "dev", self.device, "root", *netem], capture_output=True,
                              timeout=30).returncode:  # fmt: skip
            return f"netem rate {rate} delay {delay_ms} ms"
        if rate is None:
            raise Unavailable("this kernel has no netem: a link delay cannot be shaped here")
        # A bucket of about a millisecond of the rate (at least 64 KiB): full speed for TCP's bursts, no more.
        burst = max(64 * 1024, int(parse_rate(rate) / 1000))
        subprocess.run([*base, "add", "dev", self.device, "root", "tbf", "rate", rate, "burst", str(burst),
                        "latency", "50ms"], check=True, capture_output=True, timeout=30)  # fmt: skip
        return f"tbf rate {rate} (no netem here: no delay)"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def two_hosts() -> Iterator[tuple[Host, Host]]:
    """Two namespaces with 10.213.7.1 and .2 on a veth pair; removed afterwards, whatever happens. Raises
    `Unavailable`, saying why, where namespaces cannot be made."""
    tag = uuid.uuid4().hex[:6]
    hosts = (Host(f"ss{tag}a", "10.213.7.1", f"ss{tag}a"), Host(f"ss{tag}b", "10.213.7.2", f"ss{tag}b"))
    if os.geteuid() != 0:
        raise Unavailable("network namespaces need root (ip netns)")
    made: list[str] = []
    try:
        for host in hosts:
            _ip("netns", "add", host.namespace)
            made.append(host.namespace)
        _ip("link", "add", hosts[0].device, "type", "veth", "peer", "name", hosts[1].device)
        for host in hosts:
            _ip("link", "set", host.device, "netns", host.namespace)
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.device)
            _ip("-n", host.namespace, "link", "set", host.device, "up")
            _ip("-n", host.namespace, "link", "set", "lo", "up")
    except (OSError, subprocess.CalledProcessError) as e:
        for namespace in made:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
        raise Unavailable(f"cannot make network namespaces here: {getattr(e, 'stderr', '') or e}") from None
    try:
        yield hosts
    finally:
        for namespace in made:  # the veth pair goes with them
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen]]:
    """Processes started into the list, stopped afterwards whatever happens (before the namespaces go)."""
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        for p in started:
            p.terminate()
        for p in started:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=15)
