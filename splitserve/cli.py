"""The `splitserve` command line: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from splitserve.engine.config import DTYPES, QUANTIZATIONS, EngineConfig
from splitserve.errors import SplitserveError


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    p.add_argument(
        "--model",
        default=None,
        help="a Hugging Face model folder (config.json + *.safetensors + tokenizer) or a .gguf file; "
        "default: the embedded SmolLM2-135M-Instruct",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default=d.dtype,
        help="weights and KV cache dtype; auto = bf16 on CUDA and on CPUs with native bf16 matrix instructions "
        "(AVX512-BF16/AMX, Arm BF16), else fp32; fp32 for exact comparisons (default auto)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present, else cpu")
    p.add_argument(
        "--kv-cache-memory",
        default=d.kv_cache_memory,
        help=f"memory for the paged KV cache, e.g. 512MiB or 2GiB; sets the page count (default {d.kv_cache_memory})",
    )
    p.add_argument("--page-size", type=int, default=d.page_size, help=f"tokens per KV page (default {d.page_size})")
    p.add_argument(
        "--max-num-seqs", type=int, default=d.max_num_seqs, help=f"largest running batch (default {d.max_num_seqs})"
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=d.max_num_batched_tokens,
        help=f"tokens per forward pass; longer prompts are prefilled in chunks (default {d.max_num_batched_tokens})",
    )
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + output limit (default: the model's)")
    p.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=d.quantization,
        help="CPU modes, with --dtype fp32 or auto: int8 = int8 weights for decode steps (about 3x faster per "
        "layer, perplexity within 1%%; prefills keep the fp32 weights); w8a8 = the same weights with int8 "
        "activations per block of 32 (faster still, perplexity within 2%%); w8a7 = 7-bit activations (faster "
        "again at 16+ rows, coarser: top-1 agreement 91%% on the embedded model against 97%% for w8a8); w4a8 = "
        "4-bit weights with a scale and a minimum per block of 32 (llama.cpp's Q4_1) and int8 activations, for "
        "every step: the fastest (1.15-1.3x w8a8 per decode step, 1.1-2x fp32 prefills) and exact for a GGUF "
        "model whose layers are Q4_1, as the embedded one's (top-1 agreement 98.7%%), coarser for others; auto = "
        "where --dtype auto chose fp32 on the CPU and the kernels build, w4a8 for a Q4_1 GGUF model and w8a8 for "
        "others, else none; none = weights as loaded (exactness tests) (default auto)",
    )
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        help="run every step layer by layer in Python: no fused native decode step on the CPU (for comparison "
        "and debugging; the tokens are the same)",
    )
    p.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="compute every prompt in full; by default the KV pages of a prefix computed before (a system prompt, "
        "a conversation's earlier turns) are reused",
    )
    p.add_argument(
        "--cache-ttl",
        type=float,
        default=d.cache_ttl_s,
        help="seconds a conversation's KV is kept after each turn for its next one (requests with prompt_cache_key "
        f"or user); it gives way earlier when pages run short (default {d.cache_ttl_s:g}; 0 keeps nothing)",
    )


def _engine_config(args: argparse.Namespace) -> dict:
    return {
        "dtype": args.dtype,
        "device": args.device,
        "kv_cache_memory": args.kv_cache_memory,
        "page_size": args.page_size,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_model_len": args.max_model_len,
        "quantization": args.quantization,
        "prefix_caching": not args.no_prefix_caching,
        "enforce_eager": args.enforce_eager,
        "cache_ttl_s": args.cache_ttl,
    }


def _engine_argv(args: argparse.Namespace) -> list[str]:
    """The engine options again, as command-line flags for a worker process."""
    config = _engine_config(args)
    argv = ["--cache-ttl", str(config.pop("cache_ttl_s"))]
    if not config.pop("prefix_caching"):
        argv.append("--no-prefix-caching")
    if config.pop("enforce_eager"):
        argv.append("--enforce-eager")
    for flag, value in [("--model", args.model), *(("--" + k.replace("_", "-"), v) for k, v in config.items())]:
        if value is not None:
            argv += [flag, str(value)]
    return argv


def _add_router_args(p: argparse.ArgumentParser, worker_port: int) -> None:
    p.add_argument("--worker-host", default="127.0.0.1", help="address the workers' socket binds (default 127.0.0.1)")
    p.add_argument(
        "--worker-port",
        type=int,
        default=worker_port,
        help=f"port of the workers' socket (default {worker_port or 'any free one'})",
    )
    p.add_argument("--host", default="127.0.0.1", help="HTTP address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/* (default: open)")
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model name clients send and /v1/models lists (default: the model's own name)",
    )
    p.add_argument(
        "--slo",
        default=None,
        help="e.g. ttft=0.5,tpot=0.05 (seconds; or 50ms): the router meets it by itself: decode workers prefill "
        "short prompts, and prompts the prefill pool could not start in time, themselves (conditional "
        "disaggregation), and workers move between the pools when one is the bottleneck (see --fixed-roles); "
        "/health and /metrics show the last minute's attainment and misses",
    )
    p.add_argument(
        "--fixed-roles",
        action="store_true",
        help="with --slo: never move workers between the prefill and decode pools (a fixed split)",
    )
    p.add_argument(
        "--role-window",
        type=float,
        default=5.0,
        help="with --slo: seconds of requests the role policy judges at a time (at least 4 requests; default 5); "
        "a switch needs two windows in a row that agree",
    )
    p.add_argument(
        "--role-dwell",
        type=float,
        default=30.0,
        help="with --slo: at least this many seconds between two role switches (default 30)",
    )
    p.add_argument("--max-queue", type=int, default=512, help="requests waiting for room before 429s (default 512)")
    p.add_argument(
        "--queue-timeout",
        type=float,
        default=60.0,
        help="seconds a request may wait for room, then 503 (default 60)",
    )
    p.add_argument(
        "--local-prefill-tokens",
        type=int,
        default=None,
        help="a decode worker prefills a prompt itself instead of the prefill pool when it lacks at most this many "
        "of its tokens and that is no more work: without --slo only a prompt it holds partly cached (a "
        "conversation's next turn; default 256), with --slo any prompt (default: the prompt tokens a worker "
        "computes in one TPOT budget, as measured); 0: none by length (decode workers still prefill for "
        "themselves when no prefill worker is left, and with --slo when the prefill pool's queue is too long)",
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=2.5,
        help="seconds without a heartbeat after which a worker is taken for dead (default 2.5)",
    )


def _router_options(args: argparse.Namespace, worker_address: str):
    from splitserve.bench.metrics import SLO
    from splitserve.router.policy import PolicyOptions
    from splitserve.router.server import ServerOptions

    server = ServerOptions(
        args.model, args.host, args.port, worker_address, args.api_key, args.slo, args.served_model_name, args.verbose
    )
    cluster = {
        "max_queue": args.max_queue,
        "queue_timeout_s": args.queue_timeout,
        "heartbeat_timeout_s": args.heartbeat_timeout,
        "local_prefill_tokens": args.local_prefill_tokens,
        "slo": SLO.parse(args.slo) or None,
        "role_switching": not args.fixed_roles,
        "policy": PolicyOptions(window_s=args.role_window, dwell_s=args.role_dwell),
    }
    return server, cluster


def _serve(args: argparse.Namespace) -> int:
    pools = {"prefill": args.prefill, "decode": args.decode, "both": args.both}
    if args.both == 0 and (args.prefill == 0 or args.decode == 0):
        raise ValueError("a cluster needs at least one prefill and one decode worker, or --both N")
    if args.ray is not None:
        return _serve_on_ray(args, pools)
    from splitserve.launcher import serve

    server, cluster = _router_options(args, f"tcp://{args.worker_host}:{args.worker_port}")
    serve(server, cluster, _engine_argv(args), pools, args.threads, args.verbose)
    return 0


def _serve_on_ray(args: argparse.Namespace, pools: dict[str, int]) -> int:
    import json

    from splitserve.ray_cluster import ClusterSpec, RayPlacement, forwarded_env, serve_on_ray

    try:
        resources = {role: json.loads(text) for role, text in (("prefill", args.prefill_resources),
                                                                ("decode", args.decode_resources)) if text}  # fmt: skip
    except json.JSONDecodeError as e:
        raise ValueError(f"--prefill-resources/--decode-resources take JSON objects: {e}") from None
    resources.setdefault("both", resources.get("decode", {}))
    threads = args.threads or 1
    placement = RayPlacement(args.placement, resources, float(threads), 1.0 if args.device == "cuda" else 0.0)
    verbose = ["-v"] if args.verbose else []
    spec = ClusterSpec(
        router_argv=[sys.executable, "-m", "splitserve", *verbose, "router", *_router_argv(args)],
        worker_argv=_engine_argv(args),
        threads=threads,
        http_host=args.host,
        http_port=args.port,
        worker_port=args.worker_port,
        api_key=args.api_key,
        placement=placement,
        env=forwarded_env(),
        max_workers=args.max_workers,
    )
    serve_on_ray(args.ray or None, spec, pools)
    return 0


def _router_argv(args: argparse.Namespace) -> list[str]:
    """The router's options again, as command-line flags for a router process (without its worker socket)."""
    parser = argparse.ArgumentParser(add_help=False)
    _add_router_args(parser, worker_port=0)
    argv = ["--model", args.model] if args.model else []
    for action in parser._actions:
        value = getattr(args, action.dest)
        if action.dest in ("worker_host", "worker_port") or value is None or value is False:
            continue
        argv += [action.option_strings[0]] if value is True else [action.option_strings[0], str(value)]
    return argv


def _scale(args: argparse.Namespace) -> int:
    from splitserve.ray_cluster import scale

    pools = {role: n for role, n in (("prefill", args.prefill), ("decode", args.decode), ("both", args.both))
             if n is not None}  # fmt: skip
    if not pools:
        raise ValueError("say which pools to resize: --prefill N, --decode N, --both N")
    sizes = scale(args.ray, pools)
    print("pools now: " + ", ".join(f"{n} {role}" for role, n in sizes.items() if n), flush=True)
    return 0


def _router(args: argparse.Namespace) -> int:
    from splitserve.router.server import run_router

    server, cluster = _router_options(args, f"tcp://{args.worker_host}:{args.worker_port}")
    run_router(server, cluster)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from splitserve.engine.config import EngineConfig
    from splitserve.protocol import Role
    from splitserve.worker import WorkerOptions, run_worker

    engine = EngineConfig(model=args.model, **_engine_config(args))
    options = WorkerOptions(args.router, Role(args.role), engine, args.kv_timeout, threads=args.threads)
    run_worker(options)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from splitserve.bench.cli import main as bench_main

    return bench_main(args)


def _plan(args: argparse.Namespace) -> int:
    from splitserve.engine.config import EngineConfig
    from splitserve.planner.cli import main as plan_main

    return plan_main(args, EngineConfig(model=args.model, **_engine_config(args)))


def _generate(args: argparse.Namespace) -> int:
    from splitserve.engine.params import SamplingParams
    from splitserve.llm import LLM

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    started = time.monotonic()
    llm = LLM(args.model, **_engine_config(args))
    loaded = time.monotonic()
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    for text in llm.stream(prompt, params):  # print the completion as it is generated
        print(text, end="", flush=True)
    print()
    logging.getLogger("splitserve").info(
        "loaded in %.1fs; generated in %.2fs", loaded - started, time.monotonic() - loaded
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description="Disaggregated prefill/decode LLM serving.")
    verbose_help = "log progress details, timings and (router) every HTTP request"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    # -v also after the subcommand (`splitserve serve -v`); SUPPRESS keeps the top-level value when absent.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return subcommands.add_parser(name, parents=[common], **kwargs)

    gen = command(
        "generate",
        help="generate a completion for one prompt in this process and print it",
        description="Generate a completion for one prompt with the continuous-batching engine and print its text.",
    )
    gen.add_argument("--prompt", required=True, help="the prompt text (with --chat: the user's message)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default 0)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    gen.add_argument("--top-k", type=int, default=-1, help="sample among the k most likely tokens; -1 = all")
    gen.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    _add_engine_args(gen)
    gen.set_defaults(func=_generate)

    srv = command(
        "serve",
        help="start a whole cluster on this machine: router + prefill and decode workers",
        description="Start the router (OpenAI-compatible HTTP) and its workers as child processes on this "
        "machine, cores split between the workers. Ctrl-C or SIGTERM stops all of it. "
        "`--prefill 0 --decode 0 --both 1` is the colocated baseline.",
    )
    srv.add_argument("--prefill", type=int, default=1, help="prefill workers (default 1)")
    srv.add_argument("--decode", type=int, default=1, help="decode workers (default 1)")
    srv.add_argument("--both", type=int, default=0, help="colocated workers doing prefill and decode (default 0)")
    srv.add_argument("--threads", type=int, default=None,
                     help="torch threads per worker (default: cores / workers; with --ray, 1)")  # fmt: skip
    ray = srv.add_argument_group("on a Ray cluster (pip install 'splitserve[ray]')")
    ray.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run the router and each worker as Ray actors on the Ray cluster at ADDRESS (auto: the one this node "
        "belongs to; no ADDRESS: start a local one); the router runs on this node, the workers where Ray places "
        "them, each with a GPU (on GPU nodes) or --threads CPUs; Ray restarts any that dies",
    )
    ray.add_argument(
        "--placement",
        choices=["spread", "pack"],
        default="spread",
        help="spread the workers across nodes, or pack them onto as few as fit (Ray's SPREAD or default "
        "strategy; default spread)",
    )
    ray.add_argument("--prefill-resources", default=None, metavar="JSON",
                     help="custom Ray resources each prefill worker needs, e.g. '{\"prefill_node\": 1}'")  # fmt: skip
    ray.add_argument("--decode-resources", default=None, metavar="JSON",
                     help="custom Ray resources each decode (or colocated) worker needs")  # fmt: skip
    ray.add_argument("--max-workers", type=int, default=0,
                     help="with --slo: add a worker to the pool the router finds behind (at most one a minute) "
                     "while the Ray cluster has room, up to this many workers in all (default 0: never)")  # fmt: skip
    _add_router_args(srv, worker_port=0)
    _add_engine_args(srv)
    srv.set_defaults(func=_serve)

    scl = command(
        "scale",
        help="resize the pools of a cluster started with `serve --ray`",
        description="Resize the prefill, decode or colocated pool of the splitserve cluster running on a Ray "
        "cluster: new workers join as soon as they have loaded; a removed worker is first drained by the router "
        "(no new work; its requests finish), so no request is lost.",
    )
    scl.add_argument("--prefill", type=int, default=None, help="prefill workers wanted")
    scl.add_argument("--decode", type=int, default=None, help="decode workers wanted")
    scl.add_argument("--both", type=int, default=None, help="colocated workers wanted")
    scl.add_argument("--ray", default="auto", metavar="ADDRESS", help="the Ray cluster (default auto: this node's)")
    scl.set_defaults(func=_scale)

    rtr = command(
        "router",
        help="start the router alone; workers join it with `splitserve prefill|decode --router ...`",
        description="Start the router alone: OpenAI-compatible HTTP for clients, a ZeroMQ socket for workers, "
        "which may join and leave (from any host) while it runs.",
    )
    _add_router_args(rtr, worker_port=5557)
    rtr.add_argument("--model", default=None, help="the model the workers serve (its tokenizer is loaded here)")
    rtr.set_defaults(func=_router)

    bench = command(
        "bench",
        help="SLO benchmark of an OpenAI-compatible server: latency percentiles, goodput, charts",
        description="Send a workload to an OpenAI-compatible server (streaming) at one or more request rates; "
        "print TTFT, TPOT, ITL and end-to-end latency percentiles, throughput, goodput and SLO attainment; "
        "save every request's timings as JSON and draw attainment-vs-rate and latency CDF charts.",
    )
    from splitserve.bench.cli import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(func=_bench)

    pln = command(
        "plan",
        help="recommend a prefill:decode split: profile the workers here, simulate a workload on every split",
        description="Profile the engine on this hardware (prefill time vs tokens, decode step time vs batch and "
        "context) or load saved profiles, simulate the workload on every prefill:decode split of the given "
        "numbers of workers, print predicted TTFT/TPOT percentiles and SLO attainment for each, and recommend "
        "the split with the highest goodput per worker (or say that none meets the SLO at that rate).",
    )
    from splitserve.planner.cli import add_arguments as add_plan_arguments

    add_plan_arguments(pln)
    _add_engine_args(pln)
    pln.set_defaults(func=_plan)

    for name, role, text in [
        ("worker", None, "start a worker of any role (--role)"),
        ("prefill", "prefill", "start a prefill worker"),
        ("decode", "decode", "start a decode worker (--role both: a colocated one)"),
    ]:
        w = command(name, help=text, description=f"{text[0].upper()}{text[1:]} that joins a router.")
        w.add_argument("--router", required=True, help="the router's worker socket, tcp://HOST:PORT")
        w.add_argument(
            "--role",
            choices=["prefill", "decode", "both"],
            default=role,
            required=role is None,
            help="prefill: prompts -> KV pages; decode: continuous batching; both: colocated",
        )
        w.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
        w.add_argument(
            "--kv-timeout", type=float, default=120.0, help="seconds reserved pages wait for their KV (default 120)"
        )
        _add_engine_args(w)
        w.set_defaults(func=_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (SplitserveError, ValueError) as e:
        print(f"splitserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
