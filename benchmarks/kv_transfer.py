"""KV page transfer throughput over UCX between two processes, next to memcpy of the same bytes.

For each transport (UCX shared memory, UCX TCP on loopback) and request size (256 KiB to 256 MiB, in
pages of 256 KiB), a sender process sends one request after another into pages a receiver process
reserved, and times each from `send()` to its completion. Over shared memory the receiver copies the pages
out of the sender's UCX-mapped memory; over TCP they travel as tagged messages. Each peer runs one thread.

memcpy is a single-threaded copy of the same bytes in this process, measured twice: between numpy buffers
(which numpy backs with transparent huge pages where the kernel allows: the stricter baseline, which the
ratios use) and between torch buffers like the page tensors (4 KiB pages, as the shared memory is here).
Rounds of memcpy and of transfers alternate, so that a noisy neighbour slows both alike; each figure is
the median over every repetition (memcpy's over both transports' runs). Prints GB/s, the ratios to memcpy,
and the per-request time of the smallest size.

    .venv/bin/python benchmarks/kv_transfer.py [--sizes-mib 0.25,1,4,16,64,256] [--rounds 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from splitserve.kv_transfer.messages import CompatKey
from splitserve.kv_transfer.testing import Peer, page_shape

# 8 layers x K/V x 16 tokens x 8 heads x 64 dims x fp16 = 256 KiB per page
KEY = CompatKey(model="bench", dtype="fp16", page_size=16, num_layers=8, num_kv_heads=8, head_dim=64)
PAGE_BYTES = 256 * 1024
TRANSPORTS = ("shm", "tcp")


def memcpy_buffers(size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Source and destination of each memcpy baseline, written once (no page faults in the timings)."""
    huge = np.random.randint(0, 255, size, dtype=np.uint8)  # numpy asks for transparent huge pages
    small = torch.randint(0, 255, (size,), dtype=torch.uint8)  # torch does not: 4 KiB pages, as page tensors
    buffers = {"memcpy": (huge, np.empty_like(huge)), "memcpy 4K": (small.numpy(), torch.empty_like(small).numpy())}
    for src, dst in buffers.values():
        np.copyto(dst, src)
    return buffers


def memcpy_seconds(src: np.ndarray, dst: np.ndarray, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return times


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
    ap.add_argument("--rounds", type=int, default=8, help="alternating rounds per size")
    args = ap.parse_args()
    sizes = [int(float(s) * 2**20) for s in args.sizes_mib.split(",")]
    max_pages = max(sizes) // PAGE_BYTES
    assert np.prod(page_shape(KEY)) * 2 == PAGE_BYTES

    seconds: dict[tuple[str, int], list[float]] = {}
    for transport in TRANSPORTS:  # one pair of peers at a time: their busy polling would slow the other pair
        sender = Peer("sender", KEY, max_pages, transport, fill_seed=1)
        receiver = Peer("receiver", KEY, max_pages, transport, fill_seed=None)
        try:
            transfer_seconds(sender, receiver, 1, 3)  # handshake and connection set-up
            for size in sizes:
                reps = max(2, min(10, (64 << 20) // size))
                buffers = memcpy_buffers(size)
                for _ in range(args.rounds):
                    for name, (src, dst) in buffers.items():
                        seconds.setdefault((name, size), []).extend(memcpy_seconds(src, dst, reps))
                    times = transfer_seconds(sender, receiver, size // PAGE_BYTES, reps)
                    seconds.setdefault((transport, size), []).extend(times)
        finally:
            sender.stop()
            receiver.stop()

    def gbps(name: str, size: int) -> float:
        return size / statistics.median(seconds[(name, size)]) / 1e9

    print(
        f"{'request':>10} {'memcpy GB/s':>12} {'memcpy 4K':>10} {'shm GB/s':>9} {'shm/memcpy':>11} "
        f"{'shm/memcpy 4K':>14} {'tcp GB/s':>9} {'tcp/memcpy':>11}"
    )
    for size in sizes:
        mem, mem4k, shm, tcp = (gbps(name, size) for name in ("memcpy", "memcpy 4K", "shm", "tcp"))
        label = f"{size / 2**20:g} MiB"
        print(
            f"{label:>10} {mem:>12.2f} {mem4k:>10.2f} {shm:>9.2f} {shm / mem:>10.0%} {shm / mem4k:>13.0%} "
            f"{tcp:>9.2f} {tcp / mem:>10.0%}"
        )
    smallest = sizes[0]
    ms = {t: 1000 * statistics.median(seconds[(t, smallest)]) for t in TRANSPORTS}
    print(f"\nper-request time at {smallest / 2**10:g} KiB: shm {ms['shm']:.3f} ms, tcp {ms['tcp']:.3f} ms (median)")


if __name__ == "__main__":
    main()
