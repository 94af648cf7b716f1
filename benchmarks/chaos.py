"""Chaos soak: a disaggregated cluster under steady streaming load while its workers are SIGKILLed and its router
restarts, checked for lost streams, wrong tokens and leaked KV pages.

The cluster is `splitserve router` and its workers as separate processes (2 prefill + 2 decode by default), the
workers kept alive by `serve`'s own `Supervisor` (a killed worker is started again after 1, 2, 4 ... s). For
`--duration` seconds, `--concurrency` clients stream requests of mixed prompt and output lengths, half greedy and
half sampled with a seed each. Every `--kill-every` seconds (random in the range) a random joined worker is
SIGKILLed; once, halfway, the router is SIGKILLed and started again on the same ports, and the workers rejoin it.

Then the completed requests run again on the same cluster with nothing killed (the clean run), and every token is
compared. Reported: requests sent, completed and failed (with why: a stream cut by the router's restart, or a
request refused with a 503 while the new router waits for its workers to rejoin, is expected; any other failure
is not), token mismatches (and whether the request had migrated, by the router's
log lines), KV pages leaked per worker once the cluster is idle, and around each kill the worst TTFT of the
requests sent near it, the worst TPOT and the longest stall between two tokens of the requests in flight.
Targets: 0 streams failed by worker kills, 0 mismatches, 0 leaked pages.

    .venv/bin/python benchmarks/chaos.py                        # the embedded model, 5 minutes, 32 streams
    .venv/bin/python benchmarks/chaos.py --duration 60 --max-kills 2 --kill-every 15-20   # the short version
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from splitserve.children import die_with_parent
from splitserve.launcher import Supervisor, free_port


@dataclass(frozen=True)
class Spec:
    """One request of the workload (the same in the chaos run and the clean run)."""

    index: int
    prompt: list[int]
    max_tokens: int
    sampling: dict  # temperature 0, or a seeded sample


@dataclass
class Outcome:
    index: int
    sent: float  # seconds from the run's start
    token_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    end: float = 0.0
    error: str | None = None
    response_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def workload(count: int, seed: int, vocab: int, max_prompt: int, max_output: int, sampled: dict) -> list[Spec]:
    """Prompts of 8 to `max_prompt` tokens and answers of 8 to `max_output` (log-uniform); every other request
    is sampled with `sampled`'s parameters and a seed of its own, the rest greedy."""
    rng = random.Random(seed)

    def log_uniform(low: int, high: int) -> int:
        return int(math.exp(rng.uniform(math.log(low), math.log(high))))

    specs = []
    for i in range(count):
        prompt = [rng.randrange(100, vocab) for _ in range(log_uniform(8, max_prompt))]
        sampling = {"temperature": 0} if i % 2 == 0 else {**sampled, "seed": i}
        specs.append(Spec(i, prompt, log_uniform(8, max_output), sampling))
    return specs


class ChaosCluster:
    """`splitserve router` and supervised workers, each its own process, on free ports; logs in `log_dir`."""

    def __init__(self, model: str | None, pools: dict[str, int], worker_args: list[str], log_dir: Path):
        self.model, self.log_dir = model, log_dir
        self.port, self.worker_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.router: subprocess.Popen | None = None
        self.router_starts = 0
        self.restarts: list[tuple[float, str]] = []
        model_args = ["--model", model] if model else []
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
        slots = [(role, [sys.executable, "-m", "splitserve", "-v", "worker", "--role", role, "--router",
                         f"tcp://127.0.0.1:{self.worker_port}", "--threads", "1", *model_args, *worker_args])
                 for role, n in pools.items() for _ in range(n)]  # fmt: skip
        self._worker_log = open(log_dir / "workers.log", "w")  # noqa: SIM115 (closed in stop)
        self.supervisor = Supervisor(slots, env, joined=self.num_joined, on_ready=lambda: None,
                                     on_restart=lambda role: self.restarts.append((time.monotonic(), role)),
                                     max_restarts=1000)  # fmt: skip
        self._spawn = self.supervisor._spawn
        self.supervisor._spawn = self._spawn_logged  # the workers' output goes to a file

    def _spawn_logged(self, slot) -> None:
        slot.process = subprocess.Popen(slot.argv, env=self.supervisor.env, stdout=self._worker_log,
                                        stderr=subprocess.STDOUT, preexec_fn=die_with_parent)  # fmt: skip
        slot.started, slot.restart_at = time.monotonic(), None

    def start(self, timeout: float = 300) -> None:
        self.start_router()
        self.supervisor.start()
        self.wait_for_workers(len(self.supervisor.slots), timeout)

    def start_router(self) -> None:
        self.router_starts += 1
        log = open(self.log_dir / f"router-{self.router_starts}.log", "w")  # noqa: SIM115 (the process keeps it)
        cmd = [sys.executable, "-m", "splitserve", "-v", "router", "--port", str(self.port), "--worker-port",
               str(self.worker_port), *(["--model", self.model] if self.model else [])]  # fmt: skip
        self.router = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)

    def health(self) -> dict | None:
        try:
            return httpx.get(f"{self.url}/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return None

    def num_joined(self) -> int:
        h = self.health()
        return len(h["workers"]) if h else 0

    def wait_for_workers(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.num_joined() < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} workers did not join within {timeout:.0f}s (logs in {self.log_dir})")
            time.sleep(0.5)

    def kill_worker(self, rng: random.Random) -> dict | None:
        """SIGKILL a random worker that has joined (None when none has: they are all restarting)."""
        h = self.health()
        joined = {w["pid"]: w for w in (h or {}).get("workers", [])}
        alive = [s for s in self.supervisor.slots if s.process is not None and s.process.pid in joined
                 and s.process.poll() is None]  # fmt: skip
        if not alive:
            return None
        slot = rng.choice(alive)
        worker = joined[slot.process.pid]
        os.kill(slot.process.pid, signal.SIGKILL)
        return {"worker": worker["id"], "role": worker["role"], "running": worker["running"]}

    async def restart_router(self) -> float:
        """SIGKILL the router, start it again on the same ports; returns seconds until every worker rejoined.
        (The new router is started from this thread: a child dies with the thread that started it.)"""
        started = time.monotonic()
        self.router.kill()
        self.router.wait()
        self.start_router()
        await asyncio.to_thread(self.wait_for_workers, len(self.supervisor.slots), 120)
        return time.monotonic() - started

    def model_id(self) -> str:
        return httpx.get(f"{self.url}/v1/models", timeout=10).json()["data"][0]["id"]

    def router_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("router-*.log")))

    def stop(self) -> None:
        self.supervisor.stop()
        if self.router is not None and self.router.poll() is None:
            self.router.terminate()
            try:
                self.router.wait(20)
            except subprocess.TimeoutExpired:
                self.router.kill()
        self._worker_log.close()


async def stream(client: httpx.AsyncClient, model: str, spec: Spec, start: float) -> Outcome | None:
    """One streamed request; None when the router was not there to take it (connection refused)."""
    body = {"model": model, "prompt": spec.prompt, "max_tokens": spec.max_tokens, "ignore_eos": True,
            "stream": True, "return_token_ids": True, **spec.sampling}  # fmt: skip
    out = Outcome(spec.index, time.perf_counter() - start)
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread())[:200].decode(errors='replace')}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        out.error = f"error event: {event['error'].get('message')}"
                        break
                    out.response_id = event.get("id", out.response_id)
                    for choice in event.get("choices") or []:
                        ids = choice.get("token_ids") or []
                        out.token_ids += ids
                        out.token_times += [time.perf_counter() - start] * len(ids)
    except httpx.ConnectError:
        return None
    except httpx.HTTPError as e:
        out.error = f"connection lost: {type(e).__name__}"
    out.end = time.perf_counter() - start
    if out.ok and len(out.token_ids) != spec.max_tokens:
        out.error = f"{len(out.token_ids)} tokens of {spec.max_tokens}"
    return out


async def run_load(url: str, model: str, specs: list[Spec], concurrency: int, duration: float | None,
                   start: float) -> list[Outcome]:  # fmt: skip
    """Stream `specs` in order, `concurrency` at a time, until they are done or (with `duration`) no new one is
    sent after that many seconds. A request the router was not there to take is sent again a moment later, for
    up to two minutes."""
    outcomes: list[Outcome] = []
    queue = list(reversed(specs))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600, connect=5), limits=limits) as client:

        async def client_loop() -> None:
            while queue and (duration is None or time.perf_counter() - start < duration):
                spec = queue.pop()
                give_up = time.perf_counter() + 120
                while (out := await stream(client, model, spec, start)) is None:
                    if time.perf_counter() > give_up:
                        out = Outcome(spec.index, time.perf_counter() - start, error="the router was unreachable")
                        break
                    await asyncio.sleep(0.5)
                outcomes.append(out)

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return outcomes


def around_kills(events: list[dict], outcomes: list[Outcome]) -> list[dict]:
    """Per kill: worst TTFT of requests sent from 5 s before to 15 s after it, and of the requests in flight
    at it, the worst TPOT and the longest stall between two of their tokens."""
    rows = []
    for e in events:
        t = e["at"]
        near = [o for o in outcomes if t - 5 <= o.sent <= t + 15 and o.token_times]
        live = [o for o in outcomes if o.sent < t < o.end and len(o.token_times) > 1]
        stalls = [max(b - a for a, b in zip(o.token_times, o.token_times[1:], strict=False)) for o in live]
        tpots = [(o.token_times[-1] - o.token_times[0]) / (len(o.token_times) - 1) for o in live]
        worst_ttft = max((o.token_times[0] - o.sent for o in near), default=None)
        rows.append({**e, "in_flight": len(live), "worst_ttft_s": worst_ttft, "worst_tpot_s": max(tpots, default=None),
                     "longest_stall_s": max(stalls, default=None)})  # fmt: skip
    return rows


def migrations_by_response(router_logs: str) -> dict[str, int]:
    return {m[0]: int(m[1]) for m in re.findall(r"request (\S+) choice \d+ finished .* (\d+) migration", router_logs)}


async def chaos(args: argparse.Namespace, cluster: ChaosCluster, specs: list[Spec]) -> dict:
    rng = random.Random(args.seed + 1)
    model = cluster.model_id()
    start = time.perf_counter()
    load = asyncio.create_task(run_load(cluster.url, model, specs, args.concurrency, args.duration, start))
    low, high = args.kill_every
    events: list[dict] = []
    router_at = args.duration * 0.5 if args.router_restart else math.inf
    next_kill = rng.uniform(low, high)
    while not load.done():
        await asyncio.sleep(0.2)
        now = time.perf_counter() - start
        if now >= router_at:
            router_at = math.inf
            seconds = await cluster.restart_router()
            events.append({"at": now, "what": "router restart", "rejoined_s": round(seconds, 1)})
            print(f"  {now:6.1f}s  router restarted; all workers rejoined in {seconds:.1f}s", flush=True)
            next_kill = max(next_kill, time.perf_counter() - start + 5)
        elif now >= next_kill and now < args.duration and sum(e["what"] == "kill" for e in events) < args.max_kills:
            victim = await asyncio.to_thread(cluster.kill_worker, rng)
            if victim is not None:
                events.append({"at": now, "what": "kill", **victim})
                print(f"  {now:6.1f}s  SIGKILL {victim['role']} worker {victim['worker']} "
                      f"({victim['running']} running)", flush=True)  # fmt: skip
            next_kill = now + rng.uniform(low, high)
            if abs(next_kill - router_at) < 5:
                next_kill = router_at + 5
    outcomes = await load
    return {"events": events, "outcomes": outcomes, "seconds": time.perf_counter() - start}


def idle_and_leaks(cluster: ChaosCluster, timeout: float = 90) -> list[dict]:
    """Wait until no request is left anywhere (reservations of the dead router's requests expire); then each
    worker's pages not free."""
    deadline = time.monotonic() + timeout
    while True:
        h = cluster.health() or {"workers": [], "jobs": {}, "queue": 1}
        busy = h["queue"] or any(h["jobs"].values()) or any(w["running"] or w["waiting"] for w in h["workers"])
        leaks = [w for w in h["workers"] if w["free_pages"] != w["num_pages"]]
        if (not busy and not leaks) or time.monotonic() > deadline:
            return [{"worker": w["id"], "role": w["role"], "leaked_pages": w["num_pages"] - w["free_pages"]}
                    for w in h["workers"]]  # fmt: skip
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="default: the embedded model")
    p.add_argument("--prefill", type=int, default=2)
    p.add_argument("--decode", type=int, default=2)
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load (default 300)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--kill-every", default="20-40", help="seconds between kills, a range (default 20-40)")
    p.add_argument("--max-kills", type=int, default=1000)
    p.add_argument("--no-router-restart", dest="router_restart", action="store_false")
    p.add_argument("--max-prompt", type=int, default=512)
    p.add_argument("--max-output", type=int, default=128)
    p.add_argument("--vocab", type=int, default=49152, help="prompt token ids are drawn below this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sampling",
        type=json.loads,
        default={"temperature": 0.8, "top_k": 40, "top_p": 0.95},
        help="parameters of the sampled half of the requests, as JSON (each gets a seed of its own)",
    )
    p.add_argument("--worker-args", default="", help="engine options for every worker (default: serve's)")
    p.add_argument("--logs", type=Path, help="where the processes' logs go (default: a temporary folder)")
    p.add_argument("--out", type=Path, help="write the report as JSON here")
    args = p.parse_args(argv)
    args.kill_every = tuple(float(x) for x in args.kill_every.split("-"))
    log_dir = args.logs or Path(tempfile.mkdtemp(prefix="splitserve-chaos-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    specs = workload(100_000, args.seed, args.vocab, args.max_prompt, args.max_output, args.sampling)
    cluster = ChaosCluster(args.model, {"prefill": args.prefill, "decode": args.decode}, args.worker_args.split(),
                           log_dir)  # fmt: skip
    try:
        print(
            f"starting {args.prefill} prefill + {args.decode} decode workers, engine options "
            f"{args.worker_args or '(serve defaults)'!r} (logs in {log_dir})",
            flush=True,
        )
        cluster.start()
        print(f"chaos run: {args.duration:.0f}s, {args.concurrency} streams", flush=True)
        run = asyncio.run(chaos(args, cluster, specs))
        leaks = idle_and_leaks(cluster)
        done = [o for o in run["outcomes"] if o.ok]
        print(f"clean run: the {len(done)} completed requests again, nothing killed", flush=True)
        clean = asyncio.run(run_load(cluster.url, cluster.model_id(), [specs[o.index] for o in done],
                                     args.concurrency, None, time.perf_counter()))  # fmt: skip
        leaks_after_clean = idle_and_leaks(cluster)
        logs = cluster.router_logs()
    finally:
        cluster.stop()
    report = summarize(args, run, clean, leaks, leaks_after_clean, logs, cluster.restarts)
    print(render(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


def summarize(args, run, clean, leaks, leaks_after_clean, logs, restarts) -> dict:
    outcomes: list[Outcome] = run["outcomes"]
    restart_windows = [(e["at"], e["at"] + e["rejoined_s"] + 1) for e in run["events"] if e["what"] == "router restart"]
    failures: dict[str, int] = {}
    by_kill = 0
    for o in (o for o in outcomes if not o.ok):
        # While the new router waits for the workers to rejoin it answers 503 (no worker can serve yet): the
        # restart's doing as much as a cut stream.
        by_restart = "connection lost" in o.error or o.error.startswith("HTTP 503")
        cut_by_router = any(a - 1 <= o.end <= b for a, b in restart_windows) and by_restart
        why = "stream cut (or refused, 503) by the router's restart" if cut_by_router else o.error
        failures[why] = failures.get(why, 0) + 1
        by_kill += not cut_by_router
    clean_tokens = {o.index: o.token_ids for o in clean if o.ok}
    migrated = migrations_by_response(logs)
    mismatches = []
    for o in (o for o in outcomes if o.ok):
        want = clean_tokens.get(o.index)
        if want is not None and want != o.token_ids:
            first = next(
                (i for i, (a, b) in enumerate(zip(o.token_ids, want, strict=False)) if a != b),
                min(len(want), len(o.token_ids)),
            )
            mismatches.append({"request": o.index, "first_difference": first, "tokens": len(want),
                               "migrations": migrated.get(o.response_id or "", 0)})  # fmt: skip
    leaked = sum(w["leaked_pages"] for w in leaks)
    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "logs")},
        "seconds": round(run["seconds"], 1),
        "sent": len(outcomes),
        "completed": sum(o.ok for o in outcomes),
        "failed": failures,
        "failed_not_by_the_router_restart": by_kill,
        "clean_run_failed": sum(not o.ok for o in clean),
        "compared": sum(o.ok and o.index in clean_tokens for o in outcomes),
        "mismatches": mismatches,
        "migrated_requests": sum(1 for n in migrated.values() if n),
        "tokens": sum(len(o.token_ids) for o in outcomes if o.ok),
        "worker_restarts": len(restarts),
        "leaked_pages": leaks,
        "leaked_pages_after_clean_run": leaks_after_clean,
        "around_events": around_kills(run["events"], outcomes),
    }
    report["config"]["kill_every"] = list(args.kill_every)
    report["ok"] = by_kill == 0 and not mismatches and leaked == 0 and not report["clean_run_failed"]
    return report


def render(r: dict) -> str:
    def s(x):
        return "-" if x is None else f"{x:.2f}s"

    lines = [
        f"chaos soak: {r['seconds']:.0f}s, {r['config']['concurrency']} streams, "
        f"{r['config']['prefill']}P+{r['config']['decode']}D",
        f"  requests sent {r['sent']}, completed {r['completed']} ({r['tokens']} tokens), "
        f"migrated {r['migrated_requests']}, worker restarts {r['worker_restarts']}",
        f"  failed: {r['failed'] or 'none'} -> {r['failed_not_by_the_router_restart']} not by the router's restart",
        f"  tokens vs the clean run: {r['compared']} requests compared, {len(r['mismatches'])} differ"
        + (f": {r['mismatches'][:5]}" if r["mismatches"] else ""),
        "  pages leaked at the end: " + ", ".join(f"{w['role']} {w['leaked_pages']}" for w in r["leaked_pages"]),
        "  around each event (worst TTFT of requests sent -5..+15 s; of those in flight: worst TPOT, longest stall):",
    ]
    for e in r["around_events"]:
        who = f"kill {e['role']} ({e['running']} running)" if e["what"] == "kill" else e["what"]
        lines.append(f"    {e['at']:6.1f}s  {who:28s} in flight {e['in_flight']:3d}  TTFT {s(e['worst_ttft_s'])}  "
                     f"TPOT {s(e['worst_tpot_s'])}  stall {s(e['longest_stall_s'])}")  # fmt: skip
    lines.append("  result: " + ("OK" if r["ok"] else "FAILED"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
