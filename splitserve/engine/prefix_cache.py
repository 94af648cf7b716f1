"""Content addresses of KV pages: a full page is named by a hash chain over every token up to its end.

The hash of page i is blake2b(hash of page i-1, the page's token ids), and page 0 chains from a root derived
from what makes KV reusable at all (model, dtype, page size, layout, quantization: the `CompatKey`). Two
requests share page i exactly when they agree on every token up to its end, on workers whose pages are
interchangeable. The router computes the same hashes to find the worker that holds a prompt's prefix, so
this module imports neither torch nor the engine.
"""

from __future__ import annotations

import hashlib
from array import array


def root_hash(compat: bytes) -> int:
    """The chain's start for workers whose KV layout and weights `compat` (an encoded CompatKey) describes."""
    return int.from_bytes(hashlib.blake2b(compat, digest_size=8).digest(), "little")


def extend_hashes(hashes: list[int], token_ids: list[int], page_size: int, root: int, limit: int | None = None) -> None:
    """Append to `hashes` (those of the first pages of `token_ids`) the hashes of the following full pages,
    up to `limit` pages in all."""
    full = len(token_ids) // page_size if limit is None else min(limit, len(token_ids) // page_size)
    parent = hashes[-1] if hashes else root
    for i in range(len(hashes), full):
        tokens = array("q", token_ids[i * page_size : (i + 1) * page_size]).tobytes()
        digest = hashlib.blake2b(parent.to_bytes(8, "little") + tokens, digest_size=8).digest()
        parent = int.from_bytes(digest, "little")
        hashes.append(parent)


def page_hashes(token_ids: list[int], page_size: int, root: int, limit: int | None = None) -> list[int]:
    hashes: list[int] = []
    extend_hashes(hashes, token_ids, page_size, root, limit)
    return hashes


def reusable_pages(num_tokens: int, page_size: int) -> int:
    """How many leading full pages a prompt of `num_tokens` may take from the cache: all but the page of its
    last token, which must be computed to give the logits for the first output."""
    return (num_tokens - 1) // page_size
