"""KV page transfer throughput over UCX between two processes: a request's pages sent one message per page
(how they travelled before coalescing, for pages scattered through the cache) against a few large messages
(`kv_transfer.link.message_sizes`), next to a copy of the same bytes on the same device.

Both peers' pages are scattered (random page ids, as in a cache after churn), 256 KiB each; requests of 16 to
2,048 pages (4 to 512 MiB). For each transport a sender process sends one request after another into pages a
receiver process reserved, and times each from `send()` to its completion:
- `tcp`: UCX over TCP on loopback (tagged messages, as between hosts);
- `shm-tagged`: tagged messages through UCX's shared-memory transports (pages outside UCX's shared memory);
- `shm`: the receiver pulls the pages out of the sender's UCX-mapped memory (one offer, no page messages;
  the same either way, shown for reference);
- `--device cuda`: the pages live on the GPU; `auto-tagged`: tagged messages, UCX picking its transport
  (cuda_ipc between processes on one host); `ipc`: the receiver opens the sender's pages through CUDA IPC
  (handles exchanged once, at the first transfer) and copies them device to device, as the agents do on one
  host; the baseline is then a device-to-device copy.

The baseline copy runs in this process, single-threaded on the CPU as each peer is. Each size has one
untimed round first (connections, staging buffers: the steady state is measured), then transfers and copies
alternate round by round, so that a noisy neighbour slows both alike; each figure is the median.

    .venv/bin/python benchmarks/kv_transfer.py [--pages 16,64,256,1024,2048] [--rounds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from splitserve.kv_transfer.messages import CompatKey
from splitserve.kv_transfer.testing import Peer, page_shape

# 8 layers x K/V x 16 tokens x 8 heads x 64 dims x fp16 = 256 KiB per page
PULLED = ("shm", "ipc")  # the receiver copies the pages out of the sender's memory: one offer, no page messages
KEY = CompatKey(model="bench", dtype="fp16", page_size=16, num_layers=8, num_kv_heads=8, head_dim=64)
PAGE_BYTES = 256 * 1024
MODES = {"per page": {"SPLITSERVE_KV_MAX_MESSAGES": str(1 << 30), "SPLITSERVE_KV_MIN_MESSAGE_BYTES": "1"},
         "coalesced": {}}  # fmt: skip


def copy_seconds(src: torch.Tensor, dst: torch.Tensor, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        dst.copy_(src)
        if dst.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def transfer_seconds(
    sender: Peer, receiver: Peer, num_pages: int, reps: int, rng: random.Random, consecutive: bool = False
) -> list[float]:
    """Seconds of each of `reps` transfers of `num_pages` pages: scattered at random on both sides, or with
    `consecutive` one stretch on each side (sent in place, without the gather and scatter copies). The
    receiver's reservations are all made first, so their pages are disjoint (a page is filled by one transfer
    at a time: the receiver refuses a page still being filled)."""
    if consecutive:
        src_first = rng.randrange(sender.num_pages - num_pages + 1)
        src = list(range(src_first, src_first + num_pages))
        firsts = rng.sample(range(receiver.num_pages // num_pages), reps)
        dsts = [list(range(f * num_pages, (f + 1) * num_pages)) for f in firsts]
    else:
        src = rng.sample(range(sender.num_pages), num_pages)
        free = rng.sample(range(receiver.num_pages), reps * num_pages)
        dsts = [free[i * num_pages : (i + 1) * num_pages] for i in range(reps)]
    tickets = [receiver.call("reserve", pages=dst, timeout=300)["ticket"] for dst in dsts]
    answer = sender.call("timed_sends", tickets=tickets, pages=src, timeout=300)
    if "error" in answer:
        raise RuntimeError(answer["error"])
    done = receiver.call("wait", count=reps, timeout=300)["completions"]
    if len(done) != reps or not all(c["ok"] for c in done):
        raise RuntimeError(f"receiver: {done}")
    return answer["seconds"]


def repetitions(num_pages: int) -> int:
    """Transfers per round for requests of `num_pages` pages."""
    return max(2, min(10, 256 // num_pages))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", default="16,64,256,1024,2048", help="request sizes in pages of 256 KiB")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per size")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both peers' pages live")
    ap.add_argument("--transports", default=None, help="default: tcp,shm-tagged,shm on cpu; auto-tagged,ipc on cuda")
    args = ap.parse_args()
    sizes = [int(n) for n in args.pages.split(",")]
    transports = (args.transports or ("auto-tagged,ipc" if args.device == "cuda" else "tcp,shm-tagged,shm")).split(",")
    num_pages = max(sizes) + 64
    receiver_pages = max(repetitions(n) * n for n in sizes) + 64  # a round's reservations are disjoint
    assert 2 * torch.Size(page_shape(KEY)).numel() == PAGE_BYTES
    torch.set_num_threads(1)
    rng = random.Random(0)

    seconds: dict[tuple[str, int], list[float]] = {}
    runs = [(t, m) for t in transports for m in MODES if t not in PULLED or m == "coalesced"]
    for transport, mode in runs:  # one pair of peers at a time: their busy polling would slow another pair
        label = transport if transport in PULLED else f"{transport} {mode}"
        print(f"{label}: {len(sizes)} sizes x {args.rounds} rounds", flush=True)
        options = dict(device=args.device, pulls=not transport.endswith("-tagged"), env=MODES[mode])
        base = {"shm-tagged": "shm", "auto-tagged": "auto", "ipc": "auto"}.get(transport, transport)
        sender = Peer("sender", KEY, num_pages, base, fill_seed=1, **options)
        receiver = Peer("receiver", KEY, receiver_pages, base, fill_seed=None, **options)
        try:
            transfer_seconds(sender, receiver, 1, 3, rng)  # handshake and connection set-up
            for n in sizes:
                reps = repetitions(n)
                src = torch.randint(0, 255, (n * PAGE_BYTES,), dtype=torch.uint8, device=args.device)
                dst = torch.empty_like(src)
                dst.copy_(src)  # no page faults in the timings
                transfer_seconds(sender, receiver, n, reps, rng)  # untimed: reach the steady state
                for _ in range(args.rounds):
                    seconds.setdefault(("copy", n), []).extend(copy_seconds(src, dst, reps))
                    seconds.setdefault((label, n), []).extend(transfer_seconds(sender, receiver, n, reps, rng))
        finally:
            sender.stop()
            receiver.stop()

    def gbps(name: str, n: int) -> float:
        return n * PAGE_BYTES / statistics.median(seconds[(name, n)]) / 1e9

    columns = [t if t in PULLED else f"{t} {m}" for t, m in runs]
    print(f"\nGB/s by request size (pages of 256 KiB, scattered on both sides), {args.device}:")
    print(f"{'pages':>6} {'MiB':>5} {'copy':>7} " + " ".join(f"{c:>20}" for c in columns))
    for n in sizes:
        copy = gbps("copy", n)
        cells = " ".join(f"{gbps(c, n):>8.2f} ({gbps(c, n) / copy:>4.0%} copy)" for c in columns)
        print(f"{n:>6} {n * PAGE_BYTES / 2**20:>5.0f} {copy:>7.2f} {cells}")
    print("\ncoalesced / per page:")
    for t in (t for t in transports if t not in PULLED):
        ratios = ", ".join(f"{n} pages {gbps(f'{t} coalesced', n) / gbps(f'{t} per page', n):.2f}x" for n in sizes)
        print(f"  {t}: {ratios}")


if __name__ == "__main__":
    main()
