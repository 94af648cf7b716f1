"""splitserve against llama.cpp's `llama-server` on the same GGUF file (the embedded SmolLM2-135M-Instruct
Q4_1, or --model's), the same streamed workload, in one run: 1 stream and 16 concurrent, 128-token prompts and
128 forced output tokens; TTFT, TPOT and output tokens/s of each server, printed as ratios to llama-server's and
judged against issue 38's targets (with `serve`'s default arguments: add nothing to --serve-args for them).

llama-server is found with --llama-server, $LLAMA_SERVER or on PATH (benchmarks/README.md says how to build
it, about 15 minutes on 2 cores). It runs with every core and 16 slots; splitserve runs as `splitserve serve`
(colocated, and 1 prefill + 1 decode), each server alone on the machine in turn. Check that nothing else
runs: the load average is printed before each server.

    .venv/bin/python benchmarks/vs_llamacpp.py [--llama-server PATH] [--model FILE.gguf]
        [--serve-args "--quantization none"]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import httpx

from splitserve.bench import metrics, workloads
from splitserve.bench.cli import tokenizer_for
from splitserve.bench.client import Target, run
from splitserve.kernels import cpu_kernels
from splitserve.launcher import ServeProcess, free_port
from splitserve.model.checkpoint import default_model_path

SPLITSERVE = {"splitserve colocated": (["--prefill", "0", "--decode", "0", "--both", "1"], 1),
              "splitserve 1P+1D": (["--prefill", "1", "--decode", "1"], 2)}  # fmt: skip
SCENARIOS = {"1 stream": (1, 6), "16 concurrent": (16, 32)}  # concurrency, requests


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def find_llama_server(given: str | None) -> str:
    for candidate in (given, os.environ.get("LLAMA_SERVER"), shutil.which("llama-server")):
        if candidate and Path(candidate).is_file():
            return candidate
    raise SystemExit("llama-server not found: pass --llama-server PATH (benchmarks/README.md: how to build it)")


@contextlib.contextmanager
def llama_server(binary: str, gguf: Path, slots: int, context: int):
    port = free_port()
    cmd = [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", str(os.cpu_count()),
           "-np", str(slots), "-c", str(slots * context), "--alias", "llama-server"]  # fmt: skip
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"llama-server did not start ({' '.join(cmd)})")
            time.sleep(0.3)
        yield Target(url, "llama-server")
    finally:
        process.terminate()
        process.wait(20)


def measure(target: Target, requests) -> dict[str, dict[str, float]]:
    """Every request is sent once (prompts differ): prefix caches, both servers have one, never hit."""
    asyncio.run(run(target, requests[:2], concurrency=2, progress=False))  # warm-up
    out = {}
    start = 2
    for name, (concurrency, n) in SCENARIOS.items():
        batch = requests[start : start + n]
        start += n
        for r in batch:
            r.arrival_s = 0.0
        records, duration = asyncio.run(run(target, batch, concurrency=concurrency, progress=False))
        s = metrics.summarize(records, duration)
        failed = [r.error for r in records if not r.ok]
        if failed:
            raise SystemExit(f"{target.url}: {len(failed)} requests failed, e.g. {failed[0]}")
        out[name] = {"ttft_ms": s["p50_ttft"] * 1000, "tpot_ms": s["p50_tpot"] * 1000,
                     "out_tok_s": s["output_throughput"]}  # fmt: skip
        print(f"  {name}: median TTFT {out[name]['ttft_ms']:.0f} ms, median TPOT {out[name]['tpot_ms']:.1f} ms, "
              f"{out[name]['out_tok_s']:.1f} output tok/s", flush=True)  # fmt: skip
    return out


def judge(results: dict[str, dict], base: str) -> list[str]:
    b1, b16 = results[base]["1 stream"], results[base]["16 concurrent"]
    lines = []
    for label, r in results.items():
        if label == base:
            continue
        s1, s16 = r["1 stream"], r["16 concurrent"]
        checks = [  # (what, ratio to llama-server, the ratio's limit, whether higher is better)
            ("1-stream TPOT <= 0.7x llama-server's", s1["tpot_ms"] / b1["tpot_ms"], 0.7, False),
            ("1-stream TTFT <= 0.7x llama-server's", s1["ttft_ms"] / b1["ttft_ms"], 0.7, False),
            ("16-concurrent out tok/s >= 2.5x llama-server's", s16["out_tok_s"] / b16["out_tok_s"], 2.5, True),
            ("16-concurrent median TPOT <= llama-server's", s16["tpot_ms"] / b16["tpot_ms"], 1.0, False),
        ]
        for what, ratio, limit, higher in checks:
            ok = ratio >= limit if higher else ratio <= limit
            lines.append(f"{label:>22}  {what:<46} {ratio:6.2f}x  {'met' if ok else 'MISSED'}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-server", default=None, help="path of the llama-server binary")
    p.add_argument("--model", type=Path, default=None, help="the GGUF file both serve (default: the embedded one)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--serve-args", default="", help="extra `splitserve serve` flags (e.g. --quantization none)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    binary = find_llama_server(args.llama_server)
    gguf = args.model or default_model_path()
    tokenizer = tokenizer_for(str(gguf))
    fixed = workloads.LengthDist(f"fixed:{args.input_len}"), workloads.LengthDist(f"fixed:{args.output_len}")
    total = 2 + sum(n for _, n in SCENARIOS.values())
    requests = workloads.synthetic(tokenizer, total, *fixed, random.Random(args.seed))
    print(
        f"{gguf.name}; prompts {args.input_len} tokens, {args.output_len} output tokens; {os.cpu_count()} cores "
        f"({cpu_name()}); splitserve's native kernels: {cpu_kernels.instructions()}"
    )

    results: dict[str, dict] = {}
    print(f"llama-server (16 slots, {os.cpu_count()} threads), load average {os.getloadavg()[0]:.2f}")
    with llama_server(binary, gguf, 16, args.input_len + args.output_len + 16) as target:
        results["llama-server"] = measure(target, requests)
    for label, (flags, workers) in SPLITSERVE.items():
        time.sleep(2)
        print(f"{label}, load average {os.getloadavg()[0]:.2f}")
        server = ServeProcess(args.model, [*flags, *args.serve_args.split()], num_workers=workers)
        try:
            model = server.http.get("/v1/models").json()["data"][0]["id"]
            results[label] = measure(Target(server.url, model), requests)
        finally:
            server.stop()

    print(f"\n{'':>22}" + "".join(f"{s:>36}" for s in SCENARIOS))
    print(f"{'':>22}" + f"{'TTFT ms':>12}{'TPOT ms':>12}{'out tok/s':>12}" * len(SCENARIOS))
    for label, r in results.items():
        cells = "".join(f"{r[k]['ttft_ms']:>12.0f}{r[k]['tpot_ms']:>12.1f}{r[k]['out_tok_s']:>12.1f}"
                        for k in SCENARIOS)  # fmt: skip
        print(f"{label:>22}{cells}")
    print(
        f"\nagainst issue 38's targets (ratios to llama-server, same run; serve args: {args.serve_args or 'defaults'}):"
    )
    print("\n".join(judge(results, "llama-server")))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"load": os.getloadavg(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
