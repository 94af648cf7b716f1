"""Two "hosts" on one machine for tests: network namespaces joined by a veth pair (`ip netns`, as root), so that
the router and a prefill worker in one and a decode worker in the other reach each other only over that link,
and KV pages cross it over UCX's TCP transport, as between machines (UCX's shared-memory transports are off)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


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


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def two_hosts() -> Iterator[tuple[Host, Host]]:
    """Two namespaces with 10.213.N.1 and .2 on a veth pair; removed afterwards, whatever happens. Skips the
    test, saying why, where namespaces cannot be made (not root, no `ip`, no permission)."""
    tag = uuid.uuid4().hex[:6]
    hosts = (Host(f"ss{tag}a", "10.213.7.1", f"ss{tag}a"), Host(f"ss{tag}b", "10.213.7.2", f"ss{tag}b"))
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns)")
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
        pytest.skip(f"cannot make network namespaces here: {getattr(e, 'stderr', '') or e}")
    try:
        yield hosts
    finally:
        for namespace in made:  # the veth pair goes with them
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
