"""`run_router`: the router process: load the tokenizer, bind the worker socket, serve HTTP with uvicorn."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn

from splitserve.bench.metrics import SLO
from splitserve.errors import ModelLoadError
from splitserve.model.checkpoint import model_name, resolve_model
from splitserve.model.config import ModelConfig
from splitserve.model.tokenizer import load_tokenizer
from splitserve.router.app import RouterState, create_app
from splitserve.router.cluster import Cluster, RouterOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerOptions:
    model: str | None
    host: str = "127.0.0.1"
    port: int = 8000
    worker_address: str = "tcp://127.0.0.1:5557"  # where workers connect (ZeroMQ)
    api_key: str | None = None
    slo: str | None = None  # e.g. "ttft=0.5,tpot=0.05": attainment over the last minute on /health and /metrics


def run_router(
    options: ServerOptions, cluster_options: dict, on_bound: Callable[[str, Cluster], None] | None = None
) -> None:
    """Serve until SIGINT/SIGTERM. `on_bound` gets the worker socket's address once it is bound (before HTTP)."""
    path = resolve_model(options.model)
    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        raise ModelLoadError(f"{path} has no tokenizer; the router needs one to serve text")
    name = model_name(options.model)
    cluster = Cluster(RouterOptions(model=name, **cluster_options))
    address = cluster.bind(options.worker_address)
    log.info("workers connect to %s", address)
    if on_bound is not None:
        on_bound(address, cluster)
    vocab = ModelConfig.from_pretrained(path).vocab_size
    state = RouterState(cluster, tokenizer, vocab, name, options.api_key, SLO.parse(options.slo) or None)
    config = uvicorn.Config(
        create_app(state), host=options.host, port=options.port, log_level="warning", timeout_graceful_shutdown=5
    )
    uvicorn.Server(config).run()
