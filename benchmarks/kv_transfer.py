"""KV page transfer throughput over UCX between two processes, next to memcpy of the same bytes.

For each transport (UCX shared memory, UCX TCP on loopback) and request size (256 KiB to 256 MiB, in
pages of 256 KiB), a sender process sends one request after another into pages a receiver process
reserved, and times each from `send()` to its completion. memcpy is a single-threaded copy of the same
bytes in this process. Prints GB/s, the ratio to memcpy, and the per-request time of the smallest size.

    .venv/bin/python benchmarks/kv_transfer.py [--sizes-mib 0.25,1,4,16,64,256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from splitserve.kv_transfer.messages import CompatKey
from splitserve.kv_transfer.testing import Peer, page_shape

# 8 layers x K/V x 16 tokens x 8 heads x 64 dims x fp16 = 256 KiB per page
KEY = CompatKey(model="bench", dtype="fp16", page_size=16, num_layers=8, num_kv_heads=8, head_dim=64)
PAGE_BYTES = 256 * 1024


def memcpy_gbps(nbytes: int, reps: int) -> float:
    src = np.random.randint(0, 255, nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / 1e9


def transfer_seconds(sender: Peer, receiver: Peer, num_pages: int, reps: int) -> list[float]:
    pages = list(range(num_pages))
    tickets = [receiver.call("reserve", pages=pages, timeout=120)["ticket"] for _ in range(reps)]
    answer = sender.call("timed_sends", tickets=tickets, pages=pages, timeout=120)
    if "error" in answer:
        raise RuntimeError(answer["error"])
    done = receiver.call("wait", count=reps, timeout=120)["completions"]
    if len(done) != reps or not all(c["ok"] for c in done):
        raise RuntimeError(f"receiver: {done}")
    return answer["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mib", default="0.25,1,4,16,64,256", help="request sizes in MiB, comma-separated")
    args = ap.parse_args()
    sizes = [int(float(s) * 2**20) for s in args.sizes_mib.split(",")]
    max_pages = max(sizes) // PAGE_BYTES
    assert np.prod(page_shape(KEY)) * 2 == PAGE_BYTES

    results: dict[str, dict[int, tuple[float, float]]] = {}
    for transport in ("shm", "tcp"):
        sender = Peer("sender", KEY, max_pages, transport, fill_seed=1)
        receiver = Peer("receiver", KEY, max_pages, transport, fill_seed=None)
        try:
            transfer_seconds(sender, receiver, 1, 3)  # handshake and connection set-up
            results[transport] = {}
            for size in sizes:
                reps = max(3, min(50, (256 << 20) // size))
                seconds = statistics.median(transfer_seconds(sender, receiver, size // PAGE_BYTES, reps))
                results[transport][size] = (size / seconds / 1e9, seconds)
        finally:
            sender.stop()
            receiver.stop()

    print(f"{'request':>10} {'memcpy GB/s':>12} {'shm GB/s':>9} {'shm/memcpy':>11} {'tcp GB/s':>9} {'tcp/memcpy':>11}")
    for size in sizes:
        mem = memcpy_gbps(size, max(3, min(50, (256 << 20) // size)))
        shm, tcp = results["shm"][size][0], results["tcp"][size][0]
        label = f"{size / 2**20:g} MiB"
        print(f"{label:>10} {mem:>12.2f} {shm:>9.2f} {shm / mem:>10.0%} {tcp:>9.2f} {tcp / mem:>10.0%}")
    smallest = sizes[0]
    print(
        f"\nper-request time at {smallest / 2**10:g} KiB: shm {1000 * results['shm'][smallest][1]:.3f} ms, "
        f"tcp {1000 * results['tcp'][smallest][1]:.3f} ms (median)"
    )


if __name__ == "__main__":
    main()
