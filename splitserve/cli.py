"""The `splitserve` command line: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from splitserve import options
from splitserve.engine.config import EngineConfig
from splitserve.errors import SplitserveError
from splitserve.router.cluster.options import RouterOptions
from splitserve.router.cluster.policy import PolicyOptions


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    options.add_arguments(p, EngineConfig)


def _engine_config(args: argparse.Namespace) -> dict:
    """The engine options parsed (all but the model): keyword arguments for `EngineConfig`."""
    return options.values(args, EngineConfig, skip=("model",))


def _engine_argv(args: argparse.Namespace) -> list[str]:
    """The engine options again, as command-line flags for a worker process."""
    return options.to_argv({"model": args.model, **_engine_config(args)}, EngineConfig)


CHAT_TEMPLATE_HELP = (
    "a Jinja chat template for chat requests, instead of the model's own (default: the model's; for a model "
    "without one, a built-in template of its family where it has a known one: Gemma's turns, Llama 3's headers, "
    "ChatML; else chat requests are refused)"
)


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
        "--tool-call-parser",
        choices=("auto", "hermes", "llama3_json"),
        default="auto",
        help="how tool calls are found in the model's text (tool_choice auto): hermes, <tool_call>{...}</tool_call> "
        "(Qwen, Hermes); llama3_json, JSON objects with name and parameters (Llama 3.1+); auto (default) picks "
        "from the chat template",
    )
    p.add_argument("--chat-template", metavar="FILE", default=None, help=CHAT_TEMPLATE_HELP)
    options.add_arguments(p, RouterOptions)
    options.add_arguments(p, PolicyOptions)


def _router_options(args: argparse.Namespace, worker_address: str):
    from splitserve.router.http.server import ServerOptions

    server = ServerOptions(
        args.model,
        args.host,
        args.port,
        worker_address,
        args.api_key,
        args.served_model_name,
        args.verbose,
        args.tool_call_parser,
        args.chat_template,
    )
    cluster = {**options.values(args, RouterOptions), "policy": PolicyOptions(**options.values(args, PolicyOptions))}
    return server, cluster


def _serve(args: argparse.Namespace) -> int:
    pools = {"prefill": args.prefill, "decode": args.decode, "both": args.both}
    if args.both == 0 and (args.prefill == 0 or args.decode == 0):
        raise ValueError("a cluster needs at least one prefill and one decode worker, or --both N")
    if args.replica != 0:
        raise ValueError("--replica is for a router started alone: `serve --routers N` numbers its routers itself")
    if args.tensor_parallel > 1 and (args.prefill or args.decode):
        raise ValueError(
            "--tensor-parallel above 1 runs colocated workers for now (--prefill 0 --decode 0 --both N): "
            "KV between pools of several ranks is not done yet"
        )
    if args.ray is not None:
        return _serve_on_ray(args, pools)
    from splitserve.launcher import serve

    server, cluster = _router_options(args, f"tcp://{args.worker_host}:{args.worker_port}")
    serve(server, cluster, _engine_argv(args), pools, args.threads, args.verbose, args.tensor_parallel,
          _router_argv(args))  # fmt: skip
    return 0


def _serve_on_ray(args: argparse.Namespace, pools: dict[str, int]) -> int:
    import json

    if args.replicas > 1:
        raise ValueError(
            "--routers above 1 with --ray: not yet (start further `splitserve router --replica i` "
            "yourself, and give the workers every router)"
        )
    from splitserve.ray_cluster import ClusterSpec, RayPlacement, forwarded_env, serve_on_ray

    try:
        resources = {role: json.loads(text) for role, text in (("prefill", args.prefill_resources),
                                                                ("decode", args.decode_resources)) if text}  # fmt: skip
    except json.JSONDecodeError as e:
        raise ValueError(f"--prefill-resources/--decode-resources take JSON objects: {e}") from None
    resources.setdefault("both", resources.get("decode", {}))
    threads = args.threads or 1
    placement = RayPlacement(args.placement, resources, float(threads), 1.0 if args.device == "cuda" else 0.0,
                             args.tensor_parallel)  # fmt: skip
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
        if action.dest in ("worker_host", "worker_port") or value is None or value == action.default:
            continue
        argv += [action.option_strings[0]] if action.nargs == 0 else [action.option_strings[0], str(value)]
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
    from splitserve.router.http.server import run_router

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
    llm = LLM(args.model, chat_template=args.chat_template, **_engine_config(args))
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
    gen.add_argument("--chat-template", metavar="FILE", default=None, help=CHAT_TEMPLATE_HELP)
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
                     help="torch threads per worker (default: the cores over the decode and colocated workers; prefill "
                          "workers take as many; with --ray, 1)")  # fmt: skip
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

    # `worker --role R` starts any role; `prefill` a prefill worker; `decode` a decode worker, or with --role both
    # a colocated one (the role a decode worker also takes).
    for name, roles, text in [
        ("worker", ["prefill", "decode", "both"], "start a worker of any role (--role)"),
        ("prefill", ["prefill"], "start a prefill worker"),
        ("decode", ["decode", "both"], "start a decode worker (--role both: a colocated one)"),
    ]:
        w = command(name, help=text, description=f"{text[0].upper()}{text[1:]} that joins a router.")
        w.add_argument("--router", required=True,
                       help="the router's worker socket, tcp://HOST:PORT; several routers in front of the same "
                       "workers (`router --routers N`): all of them, comma-separated, replica i's i-th")  # fmt: skip
        if len(roles) > 1:
            w.add_argument(
                "--role",
                choices=roles,
                default=None if name == "worker" else roles[0],
                required=name == "worker",
                help="prefill: prompts -> KV pages; decode: continuous batching; both: colocated",
            )
        else:
            w.set_defaults(role=roles[0])
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
