"""`PrefixIndex`: the router's picture of which KV pages each worker holds in its prefix cache, by page hash
(engine/prefix_cache.py), built from the workers' `CacheEvents`.

It is approximate by design: events a worker sent while the router was away are lost, and a page may be
evicted between a lookup and the request's arrival. A wrong guess costs only speed (the worker computes what
it lacks), never correctness. Memory is bounded: at most as many hashes per worker as it can hold pages (its
pool's, and its offload tier's: pages the tier keeps are not reported removed). Past that bound, events were
lost, and the hashes stored longest ago are forgotten. `holders` answers the other way round: which workers
hold a page (placement's shortlist, without asking every worker).
"""

from __future__ import annotations

from collections import OrderedDict


class PrefixIndex:
    def __init__(self) -> None:
        self._held: dict[str, OrderedDict[int, None]] = {}
        self._capacity: dict[str, int] = {}
        self._holders: dict[int, set[str]] = {}  # page hash -> the workers holding it

    def add_worker(self, worker_id: str, capacity: int) -> None:
        """Track a worker that can hold at most `capacity` cached pages."""
        self._held[worker_id] = OrderedDict()
        self._capacity[worker_id] = capacity

    def remove_worker(self, worker_id: str) -> None:
        for h in self._held.pop(worker_id, ()):
            self._forget(h, worker_id)
        self._capacity.pop(worker_id, None)

    def apply(self, worker_id: str, stored: list[int], removed: list[int]) -> None:
        held = self._held.get(worker_id)
        if held is None:
            return
        for h in removed:
            if held.pop(h, 0) is None:
                self._forget(h, worker_id)
        for h in stored:
            held[h] = None
            held.move_to_end(h)
            self._holders.setdefault(h, set()).add(worker_id)
        while len(held) > self._capacity[worker_id]:  # events were lost: forget the oldest
            self._forget(held.popitem(last=False)[0], worker_id)

    def holders(self, page_hash: int) -> set[str]:
        """The workers that hold the page `page_hash` (read it, do not change it)."""
        return self._holders.get(page_hash, set())

    def _forget(self, page_hash: int, worker_id: str) -> None:
        workers = self._holders.get(page_hash)
        if workers is not None:
            workers.discard(worker_id)
            if not workers:
                del self._holders[page_hash]

    def matched_pages(self, worker_id: str, hashes: list[int]) -> int:
        """How many of `hashes` (a prompt's page hashes, in order) the worker holds, from the start."""
        held = self._held.get(worker_id)
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    def num_pages(self, worker_id: str) -> int:
        return len(self._held.get(worker_id, ()))
