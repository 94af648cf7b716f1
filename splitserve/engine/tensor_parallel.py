"""A worker of `--tensor-parallel N` is N processes. Rank 0 is the worker itself: it talks to the router, schedules,
owns the one page allocator and samples. Ranks 1..N-1 (`follow`, this module's `main`) each load their slice of
the model (model/parallel.py) and a KV cache of their heads over the same page ids, and run every pass rank 0 runs,
on the inputs it broadcasts before each (a `StepPlan`: msgpack, validated, on a gloo group of its own); the model's
all-reduces join the ranks inside the pass.

Failure takes the worker down whole: a follower dies with rank 0 (`children.die_with_parent`), and rank 0's
next pass raises once a follower is gone (its connections close), so the worker exits and its supervisor restarts
it; its requests migrate as a dead worker's do.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import torch
import torch.distributed as dist

from splitserve.children import die_with_parent
from splitserve.engine.config import EngineConfig
from splitserve.engine.request import Chunk
from splitserve.model.collectives import (
    GroupCollectives,
    SharedMemoryCollectives,
    create_slots,
    shared_memory_supported,
)
from splitserve.model.parallel import TensorParallel

if TYPE_CHECKING:
    from splitserve.engine.runner import ModelRunner
    from splitserve.model.config import ModelConfig

log = logging.getLogger(__name__)

PLAN_VERSION = 1
_IDLE = datetime.timedelta(days=365)  # a follower waits for the next pass as long as the worker lives
_HOST = "127.0.0.1"  # a worker's ranks share a host
_MAX_SLOT_BYTES = 64 << 20


class ChunkPlan(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """What a pass needs of one scheduled chunk (engine/request.py's `Chunk`) on every rank."""

    start: int  # the request's tokens computed before this chunk
    tokens: list[int]  # the chunk's own
    draft: list[int]
    pages: list[int]  # the request's pages, as rank 0's allocator gave them
    completes: bool  # the pass samples after this chunk


class StepPlan(msgspec.Struct, forbid_unknown_fields=True):
    version: int
    kind: str  # "execute" (a pass and its logits), "logits" (teacher forcing: `prompt_logits`), "stop"
    chunks: list[ChunkPlan] = []


class _Window:
    """A request's token ids where a follower knows only the chunk's: `token_ids[start:end]` within them."""

    def __init__(self, start: int, tokens: list[int]):
        self.start, self.tokens = start, tokens

    def __getitem__(self, span: slice) -> list[int]:
        return self.tokens[span.start - self.start : span.stop - self.start]


class _Mirror:
    """The fields of a `Request` that `ModelRunner._prepare` reads, rebuilt from a `ChunkPlan`."""

    def __init__(self, plan: ChunkPlan):
        self.num_computed_tokens = plan.start
        self.num_tokens = plan.start + len(plan.tokens) + (0 if plan.completes else 1)
        self.token_ids = _Window(plan.start, plan.tokens)
        self.pages = plan.pages


def plan_of(kind: str, chunks: list[Chunk]) -> StepPlan:
    plans = []
    for c in chunks:
        start = c.request.num_computed_tokens
        tokens = list(c.request.token_ids[start : start + c.num_tokens])
        plans.append(ChunkPlan(start, tokens, list(c.draft), list(c.request.pages), c.completes))
    return StepPlan(PLAN_VERSION, kind, plans)


def chunks_of(plan: StepPlan) -> list[Chunk]:
    return [Chunk(_Mirror(c), len(c.tokens), tuple(c.draft)) for c in plan.chunks]  # type: ignore[arg-type]


def connect(store: dist.Store, rank: int, width: int, device: torch.device, slots: Path | None = None,
            slot_bytes: int = 0) -> TensorParallel:  # fmt: skip
    """This rank's groups: the plans' (gloo) and the model's collectives (NCCL on CUDA; on the CPU the mapped
    `slots` file where given, gloo past its slots' size). Returns once every rank has connected."""
    mapped = None if slots is None else SharedMemoryCollectives(slots, rank, width, slot_bytes)  # before the others
    control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, width, _IDLE)
    if device.type == "cuda":
        group = dist.ProcessGroupNCCL(dist.PrefixStore("model", store), rank, width)
    else:
        group = dist.ProcessGroupGloo(dist.PrefixStore("model", store), rank, width, _IDLE)
    collectives = GroupCollectives(group, width)
    if mapped is not None:
        mapped.fallback = collectives
        collectives = mapped
    return TensorParallel(rank, width, collectives, control)


class Followers:
    """Rank 0's side: starts ranks 1..N-1 and sends them each pass's plan; they are told to stop when this object
    is closed or collected (and die with this process in any case)."""

    def __init__(self, config: EngineConfig, folder: Path, model: ModelConfig):
        width, device = config.tensor_parallel, config.torch_device
        # CPU ranks' shared-memory slots hold the largest tensor they exchange: a pass's activations, or its
        # logits' vocabulary slices (larger ones, long prompts' logits, go through gloo)
        widest = max(model.hidden_size, -(-model.vocab_size // width))
        slot_bytes = min(config.max_num_batched_tokens * widest * 4, _MAX_SLOT_BYTES)
        self._store = dist.TCPStore(_HOST, 0, width, True, wait_for_workers=False)
        argv = [sys.executable, "-m", "splitserve.engine.tensor_parallel", "--port", str(self._store.port),
                "--model-folder", str(folder), "--threads", str(torch.get_num_threads())]  # fmt: skip
        slots = None
        if shared_memory_supported(device):
            shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
            fd, name = tempfile.mkstemp(prefix="splitserve-ranks-", dir=shm)
            os.close(fd)
            slots = Path(name)
            create_slots(slots, width, slot_bytes)
            argv += ["--slots", str(slots), "--slot-bytes", str(slot_bytes)]
        encoded = msgspec.json.encode(config)
        processes = [subprocess.Popen([*argv, "--rank", str(rank)], stdin=subprocess.PIPE, preexec_fn=die_with_parent)
                     for rank in range(1, width)]  # fmt: skip
        for p in processes:
            p.stdin.write(encoded)
            p.stdin.close()
        log.info("tensor parallel: %d ranks, followers' pids %s", width, [p.pid for p in processes])
        self.processes = processes  # ranks 1..N-1, in order
        try:
            self.tp = connect(self._store, 0, width, device, slots, slot_bytes)
        finally:
            if slots is not None:  # every rank has it mapped once all have connected
                slots.unlink(missing_ok=True)
        if isinstance(self.tp.collectives, SharedMemoryCollectives):
            self.tp.collectives.peers_alive = lambda: all(p.poll() is None for p in processes)
        self.close = weakref.finalize(self, _stop, self.tp.control, processes)

    def send(self, plan: StepPlan) -> None:
        _broadcast(self.tp.control, msgspec.msgpack.encode(plan))


def _stop(control: dist.ProcessGroup, processes: list[subprocess.Popen]) -> None:
    """Tell the followers to exit, and wait for them (a dead one is already gone)."""
    if all(p.poll() is None for p in processes):
        with contextlib.suppress(RuntimeError):  # one is gone: the others die of the closed connections
            _broadcast(control, msgspec.msgpack.encode(StepPlan(PLAN_VERSION, "stop")))
    for p in processes:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _broadcast(control: dist.ProcessGroup, payload: bytes | None) -> bytes:
    """Rank 0's `payload` to every rank of `control` (the others pass None); returns it on every rank."""
    size = torch.tensor([len(payload) if payload is not None else 0], dtype=torch.long)
    control.broadcast(size, 0).wait()
    if payload is not None:
        control.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8), 0).wait()
        return payload
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    control.broadcast(data, 0).wait()
    return data.numpy().tobytes()


def follow(runner: ModelRunner) -> None:
    """A follower's life: run every pass rank 0 plans until it says stop."""
    decoder = msgspec.msgpack.Decoder(StepPlan)
    while True:
        plan = decoder.decode(_broadcast(runner.tp.control, None))
        if plan.version != PLAN_VERSION:
            raise RuntimeError(f"step plan version {plan.version}, this rank speaks {PLAN_VERSION}")
        if plan.kind == "stop":
            return
        chunks = chunks_of(plan)
        if plan.kind == "execute":
            runner.forward(chunks)
        elif plan.kind == "logits":
            runner.prompt_logits(chunks[0].request)
        else:
            raise RuntimeError(f"unknown step plan kind {plan.kind!r}")


def main() -> None:
    from splitserve.engine.runner import ModelRunner
    from splitserve.model.config import ModelConfig

    p = argparse.ArgumentParser(description="a tensor-parallel worker's rank > 0 (started by rank 0)")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model-folder", type=Path, required=True)
    p.add_argument("--threads", type=int, required=True, help="torch threads: rank 0's")
    p.add_argument("--slots", type=Path, default=None, help="the shared-memory collectives' file (CPU ranks)")
    p.add_argument("--slot-bytes", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s rank {args.rank} %(name)s: %(message)s")
    config = msgspec.json.decode(sys.stdin.buffer.read(), type=EngineConfig)
    width = config.tensor_parallel
    if config.torch_device.type == "cuda":
        torch.cuda.set_device(args.rank)
    store = dist.TCPStore(_HOST, args.port, width, False)
    tp = connect(store, args.rank, width, config.torch_device, args.slots, args.slot_bytes)
    runner = ModelRunner(ModelConfig.from_pretrained(args.model_folder), args.model_folder, config, None, tp)
    follow(runner)


if __name__ == "__main__":
    main()
