"""`Profile`: how long a worker's forward passes take on this hardware, measured with the real engine.

Prefill: one pass over a chunk of T prompt tokens, for T up to the token budget. Decode: one step of a
batch of B requests whose contexts hold C tokens each. K/V contents do not change the time, so decode
points are measured on pages that were never filled (no prefill needed to get there). Contention: how
much a pass slows down while a second worker computes next to it (shared caches, memory bandwidth,
hyperthreads: on this 2-vCPU machine about 1.7x, although each worker has a core of its own).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from splitserve.engine.config import EngineConfig
from splitserve.engine.core import EngineCore
from splitserve.engine.kv_cache import page_bytes
from splitserve.engine.params import SamplingParams
from splitserve.engine.request import Chunk, Request
from splitserve.planner.link import LOOPBACK, Link


@dataclass
class Profile:
    model: str
    dtype: str
    threads: int
    page_size: int
    max_num_batched_tokens: int
    max_num_seqs: int
    kv_bytes_per_token: float  # a token's share of its page, as the KV dtype stores it
    prefill: list[tuple[int, float]]  # (tokens in the pass, seconds)
    decode: list[tuple[int, int, float]]  # (batch, context tokens per request, seconds)
    pair_slowdown: float = 1.0  # a pass's time with a second worker busy next to it / its time alone
    # The link KV crosses between the pools (`link.Link`): not measured with the engine, but named or learned
    # (`splitserve plan --link`) and kept with the profile.
    link_bandwidth: float = LOOPBACK
    link_delay_s: float = 0.0
    link_source: str = "UCX over TCP on loopback, as measured on 2 cores (the default)"

    @property
    def link(self) -> Link:
        return Link(self.link_bandwidth, self.link_source, self.link_delay_s)

    def over(self, link: Link) -> Profile:
        """This profile with KV crossing `link`."""
        return dataclasses.replace(self, link_bandwidth=link.bandwidth, link_delay_s=link.delay_s,
                                   link_source=link.source)  # fmt: skip

    def slowdown(self, busy: int, cores: int) -> float:
        """How much longer a pass takes while `busy` workers (itself included) compute at once: each other
        busy worker adds the measured pair slowdown, and workers beyond cores / threads share the cores."""
        shared = busy * self.threads / cores
        return max(1.0, 1 + (self.pair_slowdown - 1) * (busy - 1), shared)

    def prefill_time(self, tokens: int) -> float:
        """Piecewise linear between measured points, linear beyond the last two."""
        xs = [p[0] for p in self.prefill]
        ys = [p[1] for p in self.prefill]
        if tokens <= xs[-1]:
            return float(np.interp(tokens, xs, ys))
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return ys[-1] + slope * (tokens - xs[-1])

    def decode_time(self, batch: int, context: float) -> float:
        """A least-squares fit of a + b*batch + c*batch*context (weights, then attention over the contexts)."""
        a, b, c = self._decode_fit()
        return max(0.0, a + b * batch + c * batch * context)

    def _decode_fit(self) -> tuple[float, float, float]:
        if not hasattr(self, "_fit"):
            rows = np.array([[1.0, b, b * c] for b, c, _ in self.decode])
            t = np.array([s for _, _, s in self.decode])
            # Relative error matters, not absolute: weight each point by 1/t.
            coef, *_ = np.linalg.lstsq(rows / t[:, None], np.ones_like(t), rcond=None)
            self._fit = tuple(float(x) for x in coef)
        return self._fit

    def save(self, path: Path) -> None:
        data = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        Path(path).write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: Path) -> Profile:
        data = json.loads(Path(path).read_text())
        data["prefill"] = [tuple(p) for p in data["prefill"]]
        data["decode"] = [tuple(p) for p in data["decode"]]
        return cls(**data)


def measure(
    config: EngineConfig,
    threads: int,
    repeats: int = 3,
    progress: bool = True,
    contention: bool = True,
    quick: bool = False,
) -> Profile:
    """Profile the engine `config` describes with `threads` torch threads (what each worker will get).
    `quick`: a third of the points, each timed once (the fits need no more than that to rank splits)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        core = EngineCore(config)
        budget, max_seqs = config.max_num_batched_tokens, config.max_num_seqs
        prefill_grid = (32, 128, 512) if quick else (16, 32, 64, 128, 256, 512, 1024, 2048)
        longest = min(budget, core.max_model_len - 1)  # a prompt longer than the context is never prefilled
        prefill_sizes = sorted({t for t in prefill_grid if t < longest} | {longest})
        batch_grid = (1, 8) if quick else (1, 2, 4, 8, 16, 32, 64)
        batches = sorted({b for b in batch_grid if b <= max_seqs} | {max_seqs})
        contexts = [c for c in ((64, 512) if quick else (64, 256, 1024)) if c < core.max_model_len]
        repeats = 1 if quick else repeats
        ps, capacity = config.page_size, core.allocator.capacity
        grid = [(b, c) for c in contexts for b in batches if b * -(-(c + 1) // ps) <= capacity]  # what fits
        points = len(prefill_sizes) + len(grid)
        rng = random.Random(0)
        with tqdm(total=points, desc="profiling", unit="point", disable=not progress) as bar:
            prefill = []
            for t in prefill_sizes:
                prefill.append((t, _time(core, [t], 0, repeats, rng)))
                bar.update(1)
            decode = []
            for b, c in grid:
                decode.append((b, c, _time(core, [c] * b, 1, repeats, rng)))
                bar.update(1)
        pair_slowdown = _pair_slowdown(config, threads, core, rng, 1 if quick else 5) if contention else 1.0
        model_config = core.model_config
        return Profile(
            model=core.model_path.name,
            dtype=str(config.torch_dtype).removeprefix("torch."),
            threads=threads,
            page_size=config.page_size,
            max_num_batched_tokens=budget,
            max_num_seqs=max_seqs,
            kv_bytes_per_token=page_bytes(model_config, config.page_size, config.torch_kv_dtype) / config.page_size,
            prefill=prefill,
            decode=decode,
            pair_slowdown=pair_slowdown,
        )
    finally:
        torch.set_num_threads(previous)


def _time(core: EngineCore, lengths: list[int], decode: int, repeats: int, rng: random.Random) -> float:
    """Median seconds of one pass: `decode` 0 prefills each length whole; 1 decodes one token after each."""
    ps = core.config.page_size
    requests = []
    for i, n in enumerate(lengths):
        ids = [rng.randrange(100, core.model_config.vocab_size) for _ in range(n + decode)]
        r = Request.create(str(i), ids, SamplingParams(max_tokens=1, temperature=0), frozenset())
        r.pages = core.allocator.allocate(core.runner.kv_layout.num_pages(-(-(n + decode) // ps)))
        r.num_computed_tokens = n if decode else 0
        requests.append(r)
    chunks = [Chunk(r, 1 if decode else r.num_tokens) for r in requests]
    try:
        core.runner.execute(chunks)  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            core.runner.execute(chunks)
            times.append(time.perf_counter() - started)
        return statistics.median(times)
    finally:
        for r in requests:
            core.allocator.free(r.pages)


def _pair_slowdown(config: EngineConfig, threads: int, core: EngineCore, rng: random.Random, repeats: int = 5) -> float:
    """A prefill pass's time while another process runs decode steps, over its time alone."""
    tokens = min(256, config.max_num_batched_tokens, core.max_model_len - 1)
    alone = _time(core, [tokens], 0, repeats, rng)
    spawn = multiprocessing.get_context("spawn")
    ready, stop = spawn.Event(), spawn.Event()
    neighbour = spawn.Process(target=_keep_busy, args=(config, threads, ready, stop), daemon=True)
    neighbour.start()
    try:
        deadline = time.monotonic() + 300
        while not ready.wait(0.5):
            if not neighbour.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the contention helper did not start")
        loaded = _time(core, [tokens], 0, repeats, rng)
    finally:
        stop.set()
        neighbour.join(30)
    return max(1.0, loaded / alone)


def _keep_busy(config: EngineConfig, threads: int, ready, stop) -> None:
    """Another worker's load: decode steps of a batch of 16, until told to stop."""
    torch.set_num_threads(threads)
    core = EngineCore(config)
    rng = random.Random(1)
    context = min(256, core.max_model_len - 2)
    pages_each = -(-(context + 1) // config.page_size)
    batch = [context] * max(1, min(16, config.max_num_seqs, core.allocator.capacity // pages_each))
    _time(core, batch, 1, 1, rng)
    ready.set()
    while not stop.is_set():
        _time(core, batch, 1, 1, rng)
