"""`OffloadTier`: the KV cache's second tier. A cached page (a conversation's kept history, a shared prefix)
that the pool overwrites for new work is first copied here, by its content hash: into host memory (a slab of
page slots, `--kv-offload-memory`), and when that is full its least recently used pages move on to a disk
folder (`--kv-offload-dir`, bounded by `--kv-offload-size`); past both they are dropped. A request whose
prefix goes on in the tier takes pool pages for it and has them copied back instead of computing them
(`RequestPages.admit`).

The tier lives and dies with its worker: nothing in it survives a restart (the disk folder is the worker's
own, made at start and removed at exit), and it holds no reference to any pool page: a copy in, a copy out.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class OffloadStats:
    stored: int = 0  # pages copied out of the pool
    loaded: int = 0  # pages copied back into it
    dropped: int = 0  # pages that left the last tier
    bytes_written: int = 0  # to host memory and to disk
    bytes_read: int = 0
    seconds_writing: float = 0.0
    seconds_reading: float = 0.0


class OffloadTier:
    def __init__(self, kv_cache: torch.Tensor, memory_bytes: int, disk_dir: str | Path | None = None,
                 disk_bytes: int = 0):  # fmt: skip
        """`kv_cache`: the pool's page tensor (page-major); `memory_bytes` of host memory and, with `disk_dir`,
        `disk_bytes` of disk hold offloaded pages."""
        self._pool = kv_cache
        page = kv_cache[0]
        self.page_bytes = page.numel() * page.element_size()
        self.host_capacity = memory_bytes // self.page_bytes
        self.disk_capacity = disk_bytes // self.page_bytes if disk_dir is not None else 0
        if self.host_capacity < 1 and self.disk_capacity < 1:
            raise ValueError(f"a KV offload tier of {memory_bytes} bytes of memory and {disk_bytes} of disk holds no "
                             f"page of {self.page_bytes} bytes")  # fmt: skip
        pin = kv_cache.device.type == "cuda"  # page-locked, so that copies to and from the GPU run at full speed
        self._host = torch.empty((self.host_capacity, *page.shape), dtype=page.dtype, pin_memory=pin)
        if not pin:
            # Touch every slot now: otherwise the first copy into each slot pays the kernel's page faults (a
            # fifth of memcpy speed), on the path of the request whose allocation evicted the page.
            self._host.zero_()
        self._free_slots = list(range(self.host_capacity))
        self._in_memory: OrderedDict[int, int] = OrderedDict()  # page hash -> host slot, least recently used first
        self._on_disk: OrderedDict[int, None] = OrderedDict()  # page hashes in files, least recently used first
        self._dir = None
        if self.disk_capacity:
            _remove_orphans(Path(disk_dir))
            self._dir = Path(tempfile.mkdtemp(prefix=f"splitserve-kv-{os.getpid()}-", dir=disk_dir))
            weakref.finalize(self, shutil.rmtree, self._dir, True)  # at exit, or when the tier goes
        self.stats = OffloadStats()
        self.on_drop: Callable[[int], None] | None = None  # told each page hash the tier lets go of

    @property
    def capacity(self) -> int:
        """Pages it holds at most (host memory and disk)."""
        return self.host_capacity + self.disk_capacity

    @property
    def num_pages(self) -> int:
        return len(self._in_memory) + len(self._on_disk)

    def __contains__(self, page_hash: int) -> bool:
        return page_hash in self._in_memory or page_hash in self._on_disk

    def prefix(self, hashes: Sequence[int]) -> int:
        """How many of `hashes` (the next pages of a prompt, in order) the tier holds from the first on; they
        become its most recently used."""
        n = 0
        for h in hashes:
            if h not in self:
                break
            self._touch(h)
            n += 1
        return n

    def store(self, page_hash: int, page: int) -> bool:
        """Keep a copy of pool page `page`, which holds the content `page_hash` names (before it is overwritten).
        Returns True (the allocator's `on_evict`)."""
        if page_hash in self:
            self._touch(page_hash)  # the same content is here already
            return True
        start = time.perf_counter()
        if self.host_capacity:
            if not self._free_slots:
                self._spill()
            slot = self._free_slots.pop()
            self._host[slot].copy_(self._pool[page])
            self._in_memory[page_hash] = slot
        else:
            self._write(page_hash, self._pool[page])
        self.stats.stored += 1
        self.stats.bytes_written += self.page_bytes
        self.stats.seconds_writing += time.perf_counter() - start
        return True

    def load(self, page_hash: int, page: int) -> bool:
        """Copy the content `page_hash` names into pool page `page`; False if the tier no longer holds it."""
        start = time.perf_counter()
        if page_hash in self._in_memory:
            self._pool[page].copy_(self._host[self._in_memory[page_hash]])
        elif page_hash in self._on_disk:
            raw = np.fromfile(self._file(page_hash), dtype=np.uint8)
            self._pool[page].copy_(torch.from_numpy(raw).view(self._host.dtype).view(self._host.shape[1:]))
        else:
            return False
        self._touch(page_hash)
        self.stats.loaded += 1
        self.stats.bytes_read += self.page_bytes
        self.stats.seconds_reading += time.perf_counter() - start
        return True

    def _touch(self, page_hash: int) -> None:
        (self._in_memory if page_hash in self._in_memory else self._on_disk).move_to_end(page_hash)

    def _spill(self) -> None:
        """Free a host slot: its least recently used page goes to disk, or is dropped without one."""
        page_hash, slot = self._in_memory.popitem(last=False)
        if self.disk_capacity:
            self._write(page_hash, self._host[slot])
            self.stats.bytes_written += self.page_bytes
        else:
            self._dropped(page_hash)
        self._free_slots.append(slot)

    def _write(self, page_hash: int, data: torch.Tensor) -> None:
        if len(self._on_disk) >= self.disk_capacity:
            oldest, _ = self._on_disk.popitem(last=False)
            self._file(oldest).unlink()
            self._dropped(oldest)
        data.detach().cpu().contiguous().view(torch.uint8).numpy().tofile(self._file(page_hash))
        self._on_disk[page_hash] = None

    def _dropped(self, page_hash: int) -> None:
        self.stats.dropped += 1
        if self.on_drop is not None:
            self.on_drop(page_hash)

    def _file(self, page_hash: int) -> Path:
        assert self._dir is not None
        return self._dir / f"{page_hash:016x}.kv"


def _remove_orphans(folder: Path) -> None:
    """Remove the tier folders of workers that died without removing theirs (SIGKILL)."""
    for entry in folder.glob("splitserve-kv-*"):
        match = re.fullmatch(r"splitserve-kv-(\d+)-.*", entry.name)
        if match and not _alive(int(match[1])):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
