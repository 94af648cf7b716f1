"""Helpers for tests: Hugging Face greedy references, a driver that submits requests mid-run, and a router
with fake workers (placement and policy tests without processes)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec
import torch
from transformers import AutoModelForCausalLM

from splitserve.decode.engine import DecodeEngine
from splitserve.engine.params import SamplingParams
from splitserve.engine.prefix_cache import root_hash
from splitserve.engine.request import EngineRequest
from splitserve.kv_transfer.messages import CompatKey
from splitserve.protocol import KvStats, Load, Role, WorkerInfo
from splitserve.router.cluster.cluster import Cluster
from splitserve.router.cluster.membership import Worker
from splitserve.router.cluster.options import RouterOptions


def hf_greedy(folder: Path, prompts: list[list[int]], max_new_tokens: list[int]) -> list[list[int]]:
    """transformers' greedy `generate`, fp32, one prompt at a time (no padding)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for ids, n in zip(prompts, max_new_tokens, strict=True):
            x = torch.tensor([ids])
            y = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=n,
                do_sample=False,
                pad_token_id=model.generation_config.eos_token_id,
            )
            outs.append(y[0, len(ids) :].tolist())
    return outs


def run_staggered(
    engine: DecodeEngine, prompts: list[list[int]], params: list[SamplingParams], arrival_steps: list[int]
) -> tuple[list[list[int]], int]:
    """Add prompt i just before step `arrival_steps[i]`; run to the end.

    Returns each request's output tokens and the number of steps whose batch mixed a prompt chunk
    with decode rows (requests joining a running batch).
    """
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    pending = set(outputs)
    mixed_steps = 0
    execute = engine.runner.execute

    def observed_execute(chunks):
        nonlocal mixed_steps
        prefilling = [c.request.num_computed_tokens < c.request.num_prompt_tokens for c in chunks]
        mixed_steps += any(prefilling) and not all(prefilling)
        return execute(chunks)

    engine.runner.execute = observed_execute
    try:
        step = 0
        while pending:
            for i, arrival in enumerate(arrival_steps):
                if arrival == step:
                    engine.add_request(EngineRequest(str(i), prompts[i], params[i]))
            for update in engine.step():
                outputs[update.request_id].append(update.token_id)
                if update.finish_reason is not None:
                    pending.discard(update.request_id)
            step += 1
            assert step < 10_000, "engine made no progress"
    finally:
        del engine.runner.execute
    return [outputs[str(i)] for i in range(len(prompts))], mixed_steps


def hf_greedy_processed(folder: Path, prompt: list[int], max_new_tokens: int, process, stop: set[int]) -> list[int]:
    """Greedy decoding with transformers' model where `process(logits, prompt, output)` may change each step's
    fp32 logits first (an independent reference for logits processors); ends after a token in `stop`."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    output: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([prompt + output])).logits[0, -1].clone()
            token = int(process(logits, prompt, output).argmax())
            output.append(token)
            if token in stop:
                break
    return output


FAKE_KEY = CompatKey("m", "float32", 8, 2, 2, 16)


def fake_worker_info(worker_id: str, role: Role) -> WorkerInfo:
    return WorkerInfo(worker_id, role, "m", 4096, 8, 100, 8, FAKE_KEY, 1, "host")


def add_fake_worker(cluster: Cluster, worker_id: str, role: Role, free_pages: int = 100,
                    prefill_tokens_per_s: float = 0.0) -> Worker:  # fmt: skip
    """A worker the router knows (100 pages of 8 tokens, 8 batch slots), as if it had sent a heartbeat."""
    w = Worker(fake_worker_info(worker_id, role), Load(free_pages, 0, 0, 0, prefill_tokens_per_s), KvStats(),
               time.monotonic())  # fmt: skip
    w.root_hash = root_hash(msgspec.msgpack.encode(FAKE_KEY))
    cluster.workers[worker_id] = w
    cluster.prefix_index.add_worker(worker_id, 100)
    cluster.members.changed()
    return w


@contextmanager
def recording_cluster(options: RouterOptions) -> Iterator[tuple[Cluster, list[tuple[str, object]]]]:
    """A router whose messages to workers are recorded as (worker id, message) instead of sent."""
    cluster = Cluster(options)
    sent: list[tuple[str, object]] = []
    cluster._send = cluster.roles._send = lambda w, m: sent.append((w.worker_id, m))
    try:
        yield cluster, sent
    finally:
        cluster._socket.close()
        cluster._context.term()
