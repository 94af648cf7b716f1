"""A thousand streaming clients at once against `splitserve serve`: every one answered in time (200, 429 or 503),
memory bounded, `/health` responsive throughout.

Starts `serve` (1 prefill + 1 decode worker on the embedded model by default), measures every process's resident
memory idle, then opens `--clients` streaming completions at the same moment (each asking `--max-tokens`
tokens). Meanwhile a separate process polls `/health` every 50 ms and this one samples every process's RSS.
Reported: the answers by status, the slowest time to a status per status and whether each came within its
deadline (the router's queue timeout, plus the generation of the admitted ones), streams that ended without all
their tokens, `/health` latency (max, p99; target: under 100 ms), and per process idle RSS, peak RSS and their
ratio (target: at most 1.5x: the KV cache is allocated at start, so what admitted requests need is small).

    .venv/bin/python benchmarks/load.py                    # 1,000 clients, 8 tokens each
    .venv/bin/python benchmarks/load.py --clients 200      # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

from splitserve.launcher import ServeProcess

PROMPT = "Write one sentence about the sea."


def session_rss(session_id: int) -> dict[int, tuple[str, int]]:
    """pid -> (command, resident bytes) of every process in the session (`serve` and its workers)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) != session_id:  # field 6 of stat: the session id
                continue
            status = (stat.parent / "status").read_text()
            rss = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            out[int(stat.parent.name)] = (_name(cmd), rss)
        except (OSError, StopIteration, IndexError, ValueError):  # it exited meanwhile
            continue
    return out


def _name(cmd: str) -> str:
    if " worker " in cmd:
        return "worker " + cmd.split("--role ", 1)[1].split()[0]
    return "serve (router)" if " serve " in cmd else cmd[:40]


def poll_health(url: str, seconds: float, conn) -> None:
    """In its own process (so that the clients' work does not delay it): GET /health every 50 ms; sends back
    (wall-clock time, seconds) of each poll and the failures."""
    latencies, failures = [], 0
    end = time.monotonic() + seconds
    with httpx.Client(timeout=10) as client:
        while time.monotonic() < end and not conn.poll():
            started = time.perf_counter()
            try:
                client.get(f"{url}/health")
            except httpx.HTTPError:
                failures += 1
            latencies.append((time.time(), time.perf_counter() - started))
            time.sleep(max(0.0, 0.05 - (time.perf_counter() - started)))
    conn.send((latencies, failures))


async def one_client(client: httpx.AsyncClient, model: str, max_tokens: int, start: float) -> dict:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "return_token_ids": True}  # fmt: skip
    out: dict = {"status": None, "tokens": 0, "error": None}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            out["status"], out["status_s"] = r.status_code, time.perf_counter() - start
            if r.status_code != 200:
                await r.aread()
                return out
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    if "error" in event:
                        out["error"] = event["error"]["message"]
                    for choice in event.get("choices") or []:
                        out["tokens"] += len(choice.get("token_ids") or [])
    except httpx.HTTPError as e:
        out["error"] = f"{type(e).__name__}: {e}"
    out["end_s"] = time.perf_counter() - start
    return out


async def storm(url: str, model: str, clients: int, max_tokens: int) -> list[dict]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300, connect=60), limits=limits) as client:
        start = time.perf_counter()
        return await asyncio.gather(*(one_client(client, model, max_tokens, start) for _ in range(clients)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="default: the embedded model")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--serve-args", default="--prefill 1 --decode 1 --dtype fp32", help="options for `serve`")
    p.add_argument("--queue-timeout", type=float, default=60.0, help="the router's (a 503's deadline)")
    p.add_argument("--client-nice", type=int, default=10,
                   help="the clients' niceness: they share this machine's cores with the server, where real clients "
                        "would be elsewhere (0: compete as equals; default 10)")  # fmt: skip
    p.add_argument("--out", type=Path, help="write the report as JSON here")
    args = p.parse_args(argv)
    serve_args = [*args.serve_args.split(), "--queue-timeout", str(args.queue_timeout)]
    workers = sum(int(serve_args[i + 1]) for i, a in enumerate(serve_args) if a in ("--prefill", "--decode", "--both"))
    server = ServeProcess(Path(args.model) if args.model else None, serve_args, num_workers=workers)
    try:
        model = server.http.get("/v1/models").json()["data"][0]["id"]
        time.sleep(2)
        idle = session_rss(server.process.pid)
        peak = dict(idle)
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.25):
                for pid, (name, rss) in session_rss(server.process.pid).items():
                    peak[pid] = (name, max(rss, peak.get(pid, (name, 0))[1]))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        ours, theirs = multiprocessing.get_context("spawn").Pipe()
        poller = multiprocessing.get_context("spawn").Process(target=poll_health, args=(server.url, 900, theirs))
        poller.start()
        time.sleep(1)
        print(f"{args.clients} streaming clients at once, {args.max_tokens} tokens each", flush=True)
        storm_started = time.time()
        os.nice(args.client_nice)
        results = asyncio.run(storm(server.url, model, args.clients, args.max_tokens))
        time.sleep(1)
        ours.send("stop")
        polls, health_failures = ours.recv()
        health = [seconds for _, seconds in polls]
        slow = [(round(at - storm_started, 2), round(1000 * seconds)) for at, seconds in polls if seconds > 0.1]
        poller.join(10)
        stop.set()
        sampler.join()
        idle_after = server.wait_idle(timeout=30)
    finally:
        server.stop()
    report = summarize(args, results, health, health_failures, idle, peak, idle_after)
    report["health"]["slow_polls"] = slow  # (seconds into the storm when it was sent, its milliseconds)
    print(render(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


def summarize(args, results, health, health_failures, idle, peak, idle_after) -> dict:
    by_status: dict[str, list[dict]] = {}
    for r in results:
        by_status.setdefault(str(r["status"]), []).append(r)
    ok = by_status.get("200", [])
    short = [r for r in ok if r["tokens"] != args.max_tokens or r["error"]]
    slowest = {s: max(r.get("status_s", 0) for r in rs) for s, rs in by_status.items()}
    deadline = args.queue_timeout + 5  # queued requests: the queue timeout, and the router's reaction time
    processes = [
        {"process": name, "idle_mib": round(idle[pid][1] / 2**20), "peak_mib": round(rss / 2**20),
         "ratio": round(rss / idle[pid][1], 2)}
        for pid, (name, rss) in sorted(peak.items()) if pid in idle
    ]  # fmt: skip
    health_sorted = sorted(health)
    report = {
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "statuses": {s: len(rs) for s, rs in sorted(by_status.items())},
        "slowest_status_s": {s: round(v, 2) for s, v in slowest.items()},
        "incomplete_streams": len(short),
        "last_stream_end_s": round(max((r.get("end_s", 0) for r in ok), default=0), 1),
        "health": {
            "samples": len(health),
            "failures": health_failures,
            "max_ms": round(1000 * max(health), 1),
            "p99_ms": round(1000 * health_sorted[int(0.99 * (len(health) - 1))], 1),
            "median_ms": round(1000 * statistics.median(health), 1),
            "over_100ms": sum(h > 0.1 for h in health),
        },
        "processes": processes,
        "idle_after": all(w["free_pages"] == w["num_pages"] for w in idle_after["workers"]),
    }
    report["ok"] = (
        set(report["statuses"]) <= {"200", "429", "503"}
        and all(v <= deadline for v in slowest.values())
        and not short
        and report["health"]["over_100ms"] == 0
        and not health_failures
        and all(p["ratio"] <= 1.5 for p in processes)
        and report["idle_after"]
    )
    return report


def render(r: dict) -> str:
    h = r["health"]
    lines = [
        f"{r['clients']} streaming clients, {r['max_tokens']} tokens each",
        f"  answers: {r['statuses']}; slowest status by code: {r['slowest_status_s']} s; "
        f"incomplete 200 streams: {r['incomplete_streams']}; last stream done at {r['last_stream_end_s']} s",
        f"  /health: {h['samples']} polls, median {h['median_ms']} ms, p99 {h['p99_ms']} ms, max {h['max_ms']} ms, "
        f"{h['over_100ms']} over 100 ms {h.get('slow_polls', '')}, {h['failures']} failed",
        "  RSS: "
        + "; ".join(f"{p['process']} {p['idle_mib']} -> {p['peak_mib']} MiB ({p['ratio']}x)" for p in r["processes"]),
        f"  every page free afterwards: {r['idle_after']}",
        "  result: " + ("OK" if r["ok"] else "FAILED"),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
