"""`run_router`: the router process: load the tokenizer, bind the worker socket, serve HTTP with uvicorn."""

from __future__ import annotations

import gc
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn
import zmq

from splitserve.errors import ModelLoadError, SplitserveError
from splitserve.model.chat_templates import choose_chat_template
from splitserve.model.checkpoint import model_name, resolve_model
from splitserve.model.config import architecture, vocab_size
from splitserve.model.tokenizer import load_tokenizer
from splitserve.router.cluster.cluster import Cluster
from splitserve.router.cluster.options import RouterOptions
from splitserve.router.http.app import RouterState, create_app

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerOptions:
    """What `splitserve router` was told (its defaults are the command line's)."""

    model: str | None
    host: str
    port: int
    worker_address: str  # where workers connect (ZeroMQ)
    api_key: str | None
    served_model_name: str | None  # the name clients use (None: the model's)
    access_log: bool  # log every HTTP request (-v)
    tool_call_parser: str = "auto"  # the format of the model's tool calls (auto: its chat template's)
    chat_template: str | None = None  # a Jinja file (None: the model's own, else a built-in one for its family)


def run_router(
    options: ServerOptions, cluster_options: dict, on_bound: Callable[[str, Cluster], None] | None = None
) -> None:
    """Serve until SIGINT/SIGTERM. `on_bound` gets the worker socket's address once it is bound (before HTTP).
    Among replicas (`--routers N`) every router listens on the same HTTP port (SO_REUSEPORT)."""
    shared = cluster_options.get("replicas", 1) > 1
    if not shared:
        _check_port_free(options.host, options.port)
    path = resolve_model(options.model)
    arch = architecture(path)  # an unsupported model fails here, before any worker starts, naming the supported ones
    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        raise ModelLoadError(f"{path} has no tokenizer; the router needs one to serve text")
    template = choose_chat_template(tokenizer, arch, options.chat_template)
    name = model_name(options.model)
    cluster = Cluster(RouterOptions(model=name, **cluster_options))
    try:
        address = cluster.bind(options.worker_address)
    except zmq.ZMQError as e:
        raise SplitserveError(f"cannot bind the workers' socket {options.worker_address}: {e}") from None
    served = options.served_model_name or name
    print(f"splitserve router: model {name}" + (f" served as {served}" if served != name else "")
          + f", HTTP on http://{options.host}:{options.port}, workers join at {address}; {template.source}",
          flush=True)  # fmt: skip
    if on_bound is not None:
        on_bound(address, cluster)
    state = RouterState(cluster, tokenizer, vocab_size(path), served, options.api_key, cluster.options.slo,
                        options.tool_call_parser, template.stop_token_ids)  # fmt: skip
    config = uvicorn.Config(
        create_app(state),
        host=options.host,
        port=options.port,
        log_level="info" if options.access_log else "warning",
        access_log=options.access_log,
        timeout_graceful_shutdown=5,
    )
    # What is loaded by now (the tokenizer, the web framework) lives as long as the process: out of the garbage
    # collector's sight, a full collection during a flood of requests scans only what they allocate.
    gc.collect()
    gc.freeze()
    uvicorn.Server(config).run(sockets=[_shared_socket(options.host, options.port)] if shared else None)


def _shared_socket(host: str, port: int) -> socket.socket:
    """The HTTP socket, bound with SO_REUSEPORT: the replicas' sockets on one port, the kernel spreading new
    connections among them (Linux)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SplitserveError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _check_port_free(host: str, port: int) -> None:
    """A one-line error now, instead of uvicorn's errno message after the model and workers have loaded."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind((host, port))
    except OSError as e:
        raise SplitserveError(
            f"cannot listen on {host}:{port}: {e.strerror or e} (another server there? choose another --port)"
        ) from None
