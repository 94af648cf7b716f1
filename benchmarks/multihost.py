"""Disaggregation across two hosts on one machine (`splitserve/bench/hosts.py`, as root): the router and a prefill
worker in one network namespace, a decode worker in another, the veth link between them unshaped or shaped
with `tc` (a rate, and a delay each way where the kernel has netem), against the same three processes on one
host (KV pulled through shared memory). Prompts of 1,000-2,000 random tokens of the embedded model (fp32, no
prefix caching: every prompt is prefilled and its KV moved), one at a time so that nothing queues,
`max_tokens` 2: a request's TTFT is its prefill, its KV's transfer and the first token's way back.

A prompt prefilled in chunks (`--max-num-batched-tokens`, default 1,024 tokens a pass: these prompts take one
or two) streams its KV: each message of pages leaves as soon as its chunk is done, while the next one computes,
so that over a slow link only what the last chunk completes adds to TTFT. `--serve-args` passes engine flags to
both workers (e.g. `--max-num-batched-tokens 256` for more, smaller chunks).

The planner's prediction of each link's TTFT is printed next to the measured one: the simulator
(`splitserve/planner/simulator.py`) on the same prompt lengths, with a profile of the same engine (measured
here, `--profile` to load one) and the link as `splitserve plan --link` would have it: named (a shaped link's
rate) and learned (the rate this run's transfers moved at).

    .venv/bin/python benchmarks/multihost.py                          # one host, unshaped, 10gbit, 1gbit
    .venv/bin/python benchmarks/multihost.py --links 1gbit --prompts 3 --delay-ms 0.2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shlex
import statistics
import time
from pathlib import Path

from splitserve.bench.hosts import Host, processes, two_hosts
from splitserve.planner.link import Link, learned, parse_rate
from splitserve.planner.profile import Profile
from splitserve.planner.simulator import Hardware, SimRequest, simulate

HTTP_PORT, WORKER_PORT = 8000, 8001
ENGINE = ["--dtype", "fp32", "--device", "cpu", "--no-prefix-caching"]

CLIENT = """
import httpx, json, time
url, prompts, model = {url!r}, {prompts!r}, {model!r}
ttfts = []
with httpx.Client(timeout=300) as client:
    for prompt in prompts:
        start = time.perf_counter()
        body = dict(model=model, prompt=prompt, max_tokens=2, temperature=0, ignore_eos=True, stream=True)
        with client.stream("POST", url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: {{") and '"text"' in line:
                    ttfts.append(time.perf_counter() - start)
                    break
            for _ in lines:  # the rest of the answer
                pass
    time.sleep(1.5)  # the workers' next heartbeats carry their transfer counters
    health = client.get(url + "/health").json()
print(json.dumps(dict(ttfts=ttfts, workers=health["workers"])))
"""


def _ready(host: Host, url: str, timeout: float = 180) -> str:
    """Wait until both workers joined; the served model's name."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(RuntimeError, json.JSONDecodeError):
            health = host.python(f"import httpx; print(httpx.get({url!r} + '/health', timeout=10).text)")
            if len(health["workers"]) == 2:
                return host.python(f"import httpx; print(httpx.get({url!r} + '/v1/models').text)")["data"][0]["id"]
        time.sleep(1)
    raise TimeoutError("the workers did not join")


def run_link(a: Host, b: Host, link: str, prompts: list[list[int]], args) -> dict:
    name, _, how = link.partition("/")
    decode = a if name == "one host" else b
    rate = None if name in ("one host", "unshaped") else name
    shaped = a.shape(rate, args.delay_ms if rate else 0.0)
    b.shape(rate, args.delay_ms if rate else 0.0)
    url = f"http://{a.address}:{HTTP_PORT}"
    engine = [*(["--model", args.model] if args.model else []), *ENGINE, *shlex.split(args.serve_args), "--router",
              f"tcp://{a.address}:{WORKER_PORT}"]  # fmt: skip
    with processes() as started:
        started.append(a.splitserve(["router", *(["--model", args.model] if args.model else []), "--host", a.address,
                                     "--port", str(HTTP_PORT), "--worker-host", a.address,
                                     "--worker-port", str(WORKER_PORT)]))  # fmt: skip
        across = decode is b  # then UCX goes over the link's TCP only, as between machines
        started.append(a.splitserve(["worker", "--role", "prefill", *engine], a.ucx_env if across else {}))
        # `/whole`: each reservation takes its pages in one message, which leaves only once every page is final:
        # the whole-request send there was before streaming.
        env = {**(b.ucx_env if across else {}), **({"SPLITSERVE_KV_MAX_MESSAGES": "1"} if how == "whole" else {})}
        started.append(decode.splitserve(["worker", "--role", "decode", *engine], env))
        model = _ready(a, url)
        a.python(CLIENT.format(url=url, prompts=prompts[:1], model=model), timeout=600)  # warm-up
        out = a.python(CLIENT.format(url=url, prompts=prompts, model=model), timeout=1800)
    sent = sum(w["kv_bytes_sent"] for w in out["workers"] if w["role"] == "prefill")
    seconds = sum(w["kv_seconds_receiving"] for w in out["workers"] if w["role"] == "decode")
    result = {"link": link, "shaped": shaped, "ttfts_s": out["ttfts"], "median_ttft_s": statistics.median(out["ttfts"]),
              "kv_mb_per_request": sent / (len(prompts) + 1) / 1e6,
              "kv_seconds_per_request": seconds / (len(prompts) + 1),
              "learned_bytes_per_s": learned(out["workers"], link).bandwidth}  # fmt: skip
    ttft_ms, kv_ms = result["median_ttft_s"] * 1000, result["kv_seconds_per_request"] * 1000
    print(f"{link:>15} | median TTFT {ttft_ms:7.0f} ms | KV {result['kv_mb_per_request']:6.1f} MB a request, "
          f"{kv_ms:6.0f} ms from reservation to arrival, prefill included ({shaped})", flush=True)  # fmt: skip
    return result


def predicted_ttft(profile: Profile, link: Link, prompts: list[list[int]]) -> float:
    """The simulator's median TTFT of the prompts, one at a time, on 1P+1D over `link`."""
    requests = [SimRequest(1000.0 * i, len(p), 2) for i, p in enumerate(prompts)]
    records = simulate(profile.over(link), Hardware(cores=os.cpu_count() or 1), 1, 1, requests)
    return statistics.median(r.chunk_times[0] - r.sent for r in records)


def predictions(results: list[dict], prompts: list[list[int]], args) -> None:
    """Print the planner's TTFT next to the measured one, per link (and store it in the results)."""
    if args.profile:
        profile = Profile.load(Path(args.profile))
    else:
        import torch

        from splitserve import options
        from splitserve.engine.config import EngineConfig
        from splitserve.planner.profile import measure

        parser = argparse.ArgumentParser()
        options.add_arguments(parser, EngineConfig)
        served = parser.parse_args([*ENGINE, *shlex.split(args.serve_args)])  # the workers' engine
        config = EngineConfig(**{**options.values(served, EngineConfig), "model": args.model})
        profile = measure(config, torch.get_num_threads(), quick=True)
    print(f"\nthe planner's prediction (profile: {profile.threads} thread(s), {profile.model}, {profile.dtype}):")
    for r in results:
        name, _, how = r["link"].partition("/")
        if how == "whole":
            continue  # the planner simulates the system as it is: streaming
        rate = None if name in ("one host", "unshaped") else name
        links = {"learned": Link(r["learned_bytes_per_s"], "this run's transfers")}
        if rate:
            delay = args.delay_ms / 1000 if r["shaped"].startswith("netem") else 0.0
            links = {"named": Link(parse_rate(rate), f"given as {rate}", delay), **links}
        r["predicted_ttft_s"] = {how: predicted_ttft(profile, link, prompts) for how, link in links.items()}
        said = [f"{1000 * t:6.0f} ms with the link {how} ({links[how].bandwidth * 8 / 1e9:.3g} Gbit/s, "
                f"{t / r['median_ttft_s']:.2f}x)" for how, t in r["predicted_ttft_s"].items()]  # fmt: skip
        print(f"{r['link']:>15} | measured {1000 * r['median_ttft_s']:6.0f} ms | predicted " + ", ".join(said))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--links", default="one host,10gbit,10gbit/whole,1gbit,1gbit/whole",
                   help="comma-separated: one host, unshaped, or a tc rate; /whole: each request's KV in one message "
                   "once its prefill ends, as before streaming (default %(default)s)")  # fmt: skip
    p.add_argument(
        "--serve-args", default="", help="engine flags for both workers, e.g. '--max-num-batched-tokens 2048'"
    )
    p.add_argument("--delay-ms", type=float, default=0.2, help="each way on a shaped link (default 0.2)")
    p.add_argument("--prompts", type=int, default=6, help="prompts per link (default 6)")
    p.add_argument("--prompt-len", default="1000,2000", help="tokens, low,high (default %(default)s)")
    p.add_argument("--profile", default=None, help="a saved planner profile (else one is measured, about a minute)")
    p.add_argument("--no-predict", action="store_true", help="skip the planner's predictions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results to this JSON file")
    args = p.parse_args()
    rng = random.Random(args.seed)
    low, high = (int(x) for x in args.prompt_len.split(","))
    prompts = [[rng.randrange(100, 40000) for _ in range(rng.randint(low, high))] for _ in range(args.prompts)]
    print(f"{args.prompts} prompts of {args.prompt_len} tokens, one at a time; shaped links delay {args.delay_ms} ms "
          "each way")  # fmt: skip
    with two_hosts() as (a, b):
        results = [run_link(a, b, link, prompts, args) for link in args.links.split(",")]
    base = next((r["median_ttft_s"] for r in results if r["link"] == "one host"), None)
    if base:
        print("\nTTFT against one host (target with layer-wise streaming: within 1.2x at 1gbit): "
              + ", ".join(f"{r['link']} {r['median_ttft_s'] / base:.2f}x" for r in results))  # fmt: skip
    if not args.no_predict:
        predictions(results, prompts, args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
