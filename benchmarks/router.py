"""The router's ceiling, in one run: one `splitserve router` process against fake workers, real processes that
speak the worker protocol (heartbeats, `Generate` answered at once with N tokens in one `Tokens` message), so
that everything measured is the router's own: requests/s, and the latency each request sees (all of it the
router's: the workers answer instantly), p50 and p99, at 1, 64 and 1,024 concurrent clients, with 2, 64 and
1,024 workers, for short streamed and whole completions; the router's CPU (share of one core) and RSS.

The clients are one asyncio process writing HTTP/1.1 on kept-alive connections itself (an HTTP library would
cost more than the router it measures). On a 2-core machine the router, the clients and the fake workers
share the cores: the figures are a floor of what the router does with a core of its own.

    .venv/bin/python benchmarks/router.py [--workers 2,64,1024] [--clients 1,64,1024] [--tokens 16] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import zmq

from splitserve.kv_transfer.messages import CompatKey
from splitserve.launcher import free_port
from splitserve.model.checkpoint import model_name
from splitserve.protocol import (
    Generate,
    Heartbeat,
    KvStats,
    Load,
    Role,
    TokenOut,
    Tokens,
    WorkerInfo,
    decode_to_worker,
    encode,
)
from splitserve.worker import WorkerOptions

PROMPT = "Say hello."
HEARTBEAT_S = WorkerOptions.heartbeat_interval_s  # as often as a real worker


def fake_workers(address: str, ids: list[str], tokens: int, model: str, stop) -> None:
    """Workers `ids`, each a DEALER socket of its own, answering every `Generate` with `tokens` tokens at once."""
    context = zmq.Context()
    key = CompatKey(model=model, dtype="fp32", page_size=16, num_layers=1, num_kv_heads=1, head_dim=1)
    load = Load(free_pages=1 << 20, num_running=0, num_waiting=0, pending_prefill_tokens=0)
    sockets, beats = {}, {}
    poller = zmq.Poller()
    for worker_id in ids:
        s = context.socket(zmq.DEALER)
        s.setsockopt(zmq.IDENTITY, worker_id.encode())
        s.setsockopt(zmq.LINGER, 0)
        s.connect(address)
        info = WorkerInfo(worker_id, Role.BOTH, model, 8192, 16, 1 << 20, 1 << 16, key, os.getpid(), "fake")
        sockets[s], beats[s] = worker_id, encode(Heartbeat(info, load, KvStats(), 0.0))
        poller.register(s, zmq.POLLIN)
    last_beat = 0.0
    while not stop.is_set():
        if time.monotonic() - last_beat > HEARTBEAT_S:
            for s, beat in beats.items():
                s.send(beat)
            last_beat = time.monotonic()
        for s, _ in poller.poll(50):
            items = []
            while True:
                try:
                    message = decode_to_worker(s.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if isinstance(message, Generate):
                    items += [TokenOut(message.job, 100 + i) for i in range(tokens - 1)]
                    items.append(TokenOut(message.job, 100 + tokens - 1, "length"))
            if items:
                s.send(encode(Tokens(items, load)))
    context.destroy(linger=0)


async def client(port: int, body: bytes, stream: bool, until: float, latencies: list[float]) -> None:
    """One client: requests one after another on a kept-alive connection until `until`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    try:
        while time.perf_counter() < until:
            start = time.perf_counter()
            writer.write(head + body)
            await read_response(reader, stream)
            latencies.append(time.perf_counter() - start)
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader, stream: bool) -> None:
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"the router answered {status!r}")
    length, chunked = None, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
        elif name.lower() == "transfer-encoding" and "chunked" in value:
            chunked = True
    if not chunked:
        await reader.readexactly(length or 0)
        return
    while True:  # chunked: SSE events until the empty last chunk
        size = int((await reader.readline()).strip(), 16)
        await reader.readexactly(size + 2)
        if size == 0:
            return


def load(port: int, clients: int, body: bytes, stream: bool, seconds: float, out) -> None:
    """A process of `clients` clients for `seconds` (after a second of warm-up): every latency, in `out`."""

    async def main() -> list[float]:
        warm: list[float] = []
        await asyncio.gather(*(client(port, body, stream, time.perf_counter() + 1, warm) for _ in range(clients)))
        latencies: list[float] = []
        until = time.perf_counter() + seconds
        await asyncio.gather(*(client(port, body, stream, until, latencies) for _ in range(clients)))
        return latencies

    out.send(asyncio.run(main()))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def wait_for_workers(port: int, n: int, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if len(httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json().get("workers", [])) >= n:
                return
        except (httpx.HTTPError, json.JSONDecodeError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{n} fake workers did not join in {timeout} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="2,64,1024")
    p.add_argument("--clients", default="1,64,1024")
    p.add_argument("--tokens", type=int, default=16, help="tokens each request gets")
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per cell")
    args = p.parse_args()
    spawn = multiprocessing.get_context("spawn")
    model = model_name(None)
    print(f"# {os.cpu_count()} cores; one router process, fake workers answering at once with {args.tokens} tokens",
          flush=True)  # fmt: skip
    print("| workers | clients | mode | req/s | p50 ms | p99 ms | router CPU | router RSS MiB |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    per_request: dict[tuple[int, str], float] = {}
    for num_workers in map(int, args.workers.split(",")):
        port, worker_port = free_port(), free_port()
        router = subprocess.Popen([sys.executable, "-m", "splitserve", "router", "--port", str(port), "--worker-port",
                                   str(worker_port), "--max-queue", "100000"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)  # fmt: skip
        stop = spawn.Event()
        ids = [f"fake-{i}" for i in range(num_workers)]
        groups = [ids[i::2] for i in range(min(2, num_workers))]  # two processes of fake workers
        fakes = [spawn.Process(target=fake_workers, args=(f"tcp://127.0.0.1:{worker_port}", g, args.tokens, model,
                                                           stop), daemon=True) for g in groups]  # fmt: skip
        try:
            for f in fakes:
                f.start()
            wait_for_workers(port, num_workers)
            for clients in map(int, args.clients.split(",")):
                for stream in (True, False):
                    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": args.tokens, "stream": stream,
                                       "ignore_eos": True}).encode()  # fmt: skip
                    ours, theirs = spawn.Pipe()
                    gen = spawn.Process(target=load, args=(port, clients, body, stream, args.seconds, theirs))
                    cpu, started = cpu_seconds(router.pid), time.perf_counter()
                    gen.start()
                    latencies = ours.recv()
                    elapsed = time.perf_counter() - started
                    gen.join()
                    busy = (cpu_seconds(router.pid) - cpu) / elapsed
                    rate = len(latencies) / args.seconds
                    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
                    mode = "streamed" if stream else "whole"
                    if clients == 64:
                        per_request[num_workers, mode] = busy / max(rate, 1e-9)
                    print(f"| {num_workers} | {clients} | {mode} | {rate:,.0f} | {q[49] * 1e3:.1f} | {q[98] * 1e3:.1f} "
                          f"| {busy:.0%} | {rss_mib(router.pid):.0f} |", flush=True)  # fmt: skip
        finally:
            stop.set()
            for f in fakes:
                f.join(5)
            router.terminate()
            router.wait(10)
    counts = sorted({w for w, _ in per_request})
    if len(counts) > 1:
        for mode in ("streamed", "whole"):
            few, many = per_request[counts[0], mode], per_request[counts[-1], mode]
            print(f"router CPU per request at 64 clients, {mode}: {few * 1e3:.2f} ms with {counts[0]} workers, "
                  f"{many * 1e3:.2f} ms with {counts[-1]} ({many / few:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
