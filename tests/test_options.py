"""Each option is written once: the engine's and the router's flags come from their dataclasses' fields, pass to
a worker or router process unchanged, and the HTTP schema's sampling bounds are the engine's."""

from __future__ import annotations

import dataclasses

import pytest

from splitserve import cli, options
from splitserve.engine.config import EngineConfig
from splitserve.engine.params import RANGES
from splitserve.router.cluster.options import RouterOptions
from splitserve.router.cluster.policy import PolicyOptions
from splitserve.router.http.openai_schema import MAX_TEMPERATURE, ChatCompletionRequest, CompletionRequest
from splitserve.slo import SLO

ENGINE = ["--model", "/m", "--dtype", "fp32", "--device", "cpu", "--page-size", "8", "--kv-cache-memory", "64MiB",
          "--max-num-seqs", "3", "--max-num-batched-tokens", "77", "--max-model-len", "99", "--quantization", "w8a8",
          "--no-prefix-caching", "--enforce-eager", "--cache-ttl", "7"]  # fmt: skip
ROUTER = ["--heartbeat-timeout", "4", "--max-queue", "9", "--queue-timeout", "11", "--local-prefill-tokens", "5",
          "--slo", "ttft=0.5,tpot=50ms", "--fixed-roles", "--role-window", "2", "--role-dwell", "3"]  # fmt: skip


def test_every_engine_knob_is_a_flag():
    assert all("help" in f.metadata for f in dataclasses.fields(EngineConfig))


def test_a_workers_flags_give_it_the_engine_config_serve_was_given():
    parser = cli.build_parser()
    served = parser.parse_args(["serve", *ENGINE])
    argv = cli._engine_argv(served)
    worker = parser.parse_args(["decode", "--router", "tcp://h:1", *argv])
    config = EngineConfig(model=worker.model, **cli._engine_config(worker))
    assert config == EngineConfig(model="/m", dtype="fp32", device="cpu", page_size=8, kv_cache_memory="64MiB",
                                  max_num_seqs=3, max_num_batched_tokens=77, max_model_len=99, quantization="w8a8",
                                  prefix_caching=False, enforce_eager=True, cache_ttl_s=7.0)  # fmt: skip
    defaults = parser.parse_args(["serve"])
    assert cli._engine_argv(defaults) == [] and EngineConfig(**cli._engine_config(defaults)) == EngineConfig()


def test_a_router_process_gets_the_router_options_serve_was_given():
    parser = cli.build_parser()
    served = parser.parse_args(["serve", *ROUTER])
    router = parser.parse_args(["router", *cli._router_argv(served)])
    _, cluster = cli._router_options(router, "tcp://h:1")
    assert RouterOptions(model="m", **cluster) == RouterOptions(
        model="m", heartbeat_timeout_s=4.0, max_queue=9, queue_timeout_s=11.0, local_prefill_tokens=5,
        slo=SLO(ttft=0.5, tpot=0.05), role_switching=False, policy=PolicyOptions(window_s=2.0, dwell_s=3.0),
    )  # fmt: skip
    _, defaults = cli._router_options(parser.parse_args(["router"]), "tcp://h:1")
    assert RouterOptions(model="m", **defaults) == RouterOptions(model="m")
    assert options.to_argv({"slo": SLO(tpot=0.1)}, RouterOptions) == ["--slo", "tpot=0.1"]


@pytest.mark.parametrize("schema", [CompletionRequest, ChatCompletionRequest])
def test_the_http_schema_takes_the_engines_sampling_ranges(schema):
    fields = schema.model_json_schema()["properties"]
    checked = 0
    for name, r in RANGES.items():
        if schema is ChatCompletionRequest and name == "logprobs":  # a chat's count is top_logprobs
            name = "top_logprobs"
        prop = fields[name]
        kinds = ("object",) if name == "logit_bias" else ("integer", "number")
        bounds = next(b for b in prop.get("anyOf", [prop]) if b.get("type") in kinds)
        if name == "logit_bias":  # each bias
            bounds = bounds["additionalProperties"]
        low = bounds.get("exclusiveMinimum" if r.open_low else "minimum")
        high = bounds.get("maximum")
        assert low == r.low, (name, bounds)
        assert high == (MAX_TEMPERATURE if name == "temperature" else r.high), (name, bounds)
        checked += 1
    assert checked == len(RANGES)
