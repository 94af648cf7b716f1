"""The collectives that join a tensor-parallel worker's ranks (model/parallel.py): the sum of every rank's tensor
(after a row-parallel layer) and every rank's tensor side by side (the LM head's vocabulary slices).

`GroupCollectives` runs them on a torch.distributed process group: NCCL on CUDA, gloo on the CPU.
`SharedMemoryCollectives` runs them for ranks on one x86 host through a file they all map: a rank writes its
tensor into its slot and raises its counter, waits for every rank's counter, and reads the slots in rank order,
so every rank computes the same sum, bit for bit. On the 2-core CPU (2026-12-08) a gloo all-reduce of a decode
step's activations took about 0.7 ms over loopback TCP, most of a small model's layer; the mapped slots take
microseconds. Two sets of slots alternate: a rank writes a set again only after every rank has moved past the
step that read it. x86 keeps each core's stores in order, which the counters rely on; elsewhere, gloo.
"""

from __future__ import annotations

import mmap
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

_LINE = 64  # each rank's counter on a cache line of its own
_SPINS = 2_000  # busy checks before a waiting rank yields its core (ranks may share cores with other work)
_CHECK_S = 0.05  # then how often it asks whether the other ranks still live


class Collectives(Protocol):
    def all_reduce(self, x: torch.Tensor) -> None:
        """x = the sum of every rank's x, in place."""

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's x, in rank order."""


class GroupCollectives:
    def __init__(self, group: dist.ProcessGroup, width: int):
        self.group, self.width = group, width

    def all_reduce(self, x: torch.Tensor) -> None:
        self.group.allreduce([x]).wait()

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(x) for _ in range(self.width)]
        self.group.allgather([parts], [x.contiguous()]).wait()
        return parts


def shared_memory_supported(device: torch.device) -> bool:
    return device.type == "cpu" and platform.machine() in ("x86_64", "AMD64")


def create_slots(path: Path, width: int, slot_bytes: int) -> None:
    """Rank 0: the file every rank maps (counters, then two sets of `width` slots of `slot_bytes`)."""
    with open(path, "wb") as f:
        f.truncate(_LINE * width + 2 * width * slot_bytes)


class SharedMemoryCollectives:
    """Ranks of one host through the mapped file `path` (`create_slots`); tensors larger than a slot go through
    `fallback` (a process group, set once the ranks have connected)."""

    def __init__(self, path: Path, rank: int, width: int, slot_bytes: int):
        self.rank, self.width, self.slot_bytes = rank, width, slot_bytes
        self.fallback: GroupCollectives | None = None
        # Rank 0's check that the others live (a dead rank never raises its counter; the others die with rank 0).
        self.peers_alive: Callable[[], bool] = lambda: True
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, _LINE * width + 2 * width * slot_bytes)
        finally:
            os.close(fd)
        self._counters = np.frombuffer(self._map, dtype=np.int64, count=_LINE // 8 * width)[:: _LINE // 8]
        self._slots = torch.frombuffer(self._map, dtype=torch.uint8, offset=_LINE * width).view(2, width, slot_bytes)
        self._seq = 0

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Write x to this rank's slot of this step's set, wait for every rank's; the set's slots as x's shape."""
        self._seq += 1
        slots = self._slots[self._seq % 2]
        nbytes = x.numel() * x.element_size()
        slots[self.rank, :nbytes].copy_(x.contiguous().view(-1).view(torch.uint8))
        self._counters[self.rank] = self._seq
        spins, checked = 0, time.monotonic()
        while self._counters.min() < self._seq:
            spins += 1
            if spins > _SPINS:
                time.sleep(0)
                if time.monotonic() - checked > _CHECK_S:
                    if not self.peers_alive():
                        raise RuntimeError("a tensor-parallel rank died mid-pass")
                    checked = time.monotonic()
        return [slots[r, :nbytes].view(x.dtype).view(x.shape) for r in range(self.width)]

    def all_reduce(self, x: torch.Tensor) -> None:
        if x.numel() * x.element_size() > self.slot_bytes:
            return self.fallback.all_reduce(x)
        parts = self._exchange(x)
        x.copy_(parts[0])
        for part in parts[1:]:  # in rank order on every rank: the same bits everywhere
            x.add_(part)
        return None

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.numel() * x.element_size() > self.slot_bytes:
            return self.fallback.all_gather(x)
        return [part.clone() for part in self._exchange(x)]
