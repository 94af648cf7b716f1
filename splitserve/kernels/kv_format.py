"""How a KV cache stores its pages, for each `--kv-dtype`.

Every cache is seen as `[num_pages, num_layers, 2, page_size, kv_heads, head_dim]` of its dtype. An fp32, fp16 or
bf16 cache is that tensor, contiguous. An int8 cache stores each (page, layer, K or V) block as its
`page_size * kv_heads * head_dim` int8 values followed by one fp32 scale per KV head (symmetric: value = int8 *
scale): 4 bytes per `page_size * head_dim` values, 3.98x fewer bytes than fp32 at 16 x 64. The int8 tensor is
then a strided view of those bytes (`allocate`); `scales` views the scales, `pages` every page as one row of
bytes (what moves between workers and to the offload tier, scales included).

A page's scale covers its tokens so far. A write of new tokens into a page (`write`; the native and Triton
kernels do the same arithmetic) sets scale = max(old scale, absmax(new values) / 127) and, when the scale grew,
requantizes the rows already there (q = round(q * old / new)); a write that starts at the page's first slot
starts the page afresh. Each value is divided by the scale and rounded to nearest even, ties as IEEE has them,
so every implementation stores the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SCALE_BYTES = 4  # one fp32 scale per (page, layer, K or V, KV head) of an int8 cache


def block_bytes(page_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one (page, layer, K or V) block: its values, and for int8 their scales."""
    scales = kv_heads * SCALE_BYTES if dtype == torch.int8 else 0
    return page_size * kv_heads * head_dim * dtype.itemsize + scales


def page_bytes(num_layers: int, page_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one page: K and V of `page_size` tokens in every layer."""
    return num_layers * 2 * block_bytes(page_size, kv_heads, head_dim, dtype)


def strides(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[int, ...]:
    """The strides (in elements) of a cache of `shape` and `dtype` as `allocate` lays it out."""
    _, num_layers, _, page_size, kv_heads, head_dim = shape
    block = block_bytes(page_size, kv_heads, head_dim, dtype) // dtype.itemsize
    return (num_layers * 2 * block, 2 * block, block, kv_heads * head_dim, head_dim, 1)


def laid_out(kv_cache: torch.Tensor) -> bool:
    """Whether `kv_cache` is a whole cache as `allocate` lays it out (what the native kernels index)."""
    return kv_cache.dim() == 6 and kv_cache.stride() == strides(tuple(kv_cache.shape), kv_cache.dtype)


def _int8_view(raw: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The `[num_pages, num_layers, 2, page_size, kv_heads, head_dim]` values over an int8 cache's bytes."""
    if shape[-1] % SCALE_BYTES:
        raise ValueError(f"an int8 KV cache needs a head dim that is a multiple of 4, got {shape[-1]}")
    return raw.as_strided(shape, strides(shape, torch.int8), raw.storage_offset())


def allocate(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    allocate_raw: Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor] | None = None,
) -> torch.Tensor:
    """A zeroed cache of `shape` (`[num_pages, num_layers, 2, page_size, kv_heads, head_dim]`); its memory from
    `allocate_raw(shape, dtype, device)` when given (an int8 cache asks for `[num_pages, page_bytes]` int8)."""
    raw_shape = (shape[0], page_bytes(*shape[1:2], *shape[3:], dtype)) if dtype == torch.int8 else shape
    raw = allocate_raw(raw_shape, dtype, device) if allocate_raw else torch.zeros(raw_shape, dtype=dtype, device=device)
    return _int8_view(raw, shape) if dtype == torch.int8 else raw


def pages(kv_cache: torch.Tensor) -> torch.Tensor:
    """Every page of the cache as one row of bytes, `[num_pages, page_bytes]` uint8 (a view)."""
    num_pages, num_layers, _, page_size, kv_heads, head_dim = kv_cache.shape
    size = page_bytes(num_layers, page_size, kv_heads, head_dim, kv_cache.dtype)
    flat = kv_cache.as_strided((num_pages, size // kv_cache.itemsize), (size // kv_cache.itemsize, 1))
    return flat.view(torch.uint8)


def copy(kv_cache: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """A new cache holding the same bytes (on `device`, default the cache's): `clone` and `to` would drop an
    int8 cache's scales, which lie outside its values' view."""
    new = allocate(tuple(kv_cache.shape), kv_cache.dtype, torch.device(device or kv_cache.device))
    pages(new).copy_(pages(kv_cache))
    return new


def scales(kv_cache: torch.Tensor) -> torch.Tensor:
    """An int8 cache's scales, `[num_pages, num_layers, 2, kv_heads]` fp32 (a view)."""
    num_pages, num_layers, _, page_size, kv_heads, head_dim = kv_cache.shape
    s = kv_cache.stride()
    values = page_size * kv_heads * head_dim
    raw = kv_cache.as_strided((num_pages, num_layers, 2, kv_heads * SCALE_BYTES), (s[0], s[1], s[2], 1),
                              kv_cache.storage_offset() + values)  # fmt: skip
    return raw.view(torch.float32)


def read(kv_cache: torch.Tensor, layer: int, page_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Pages `page_ids` (any shape) of `layer` as `dtype` values, `[*page_ids.shape, 2, page_size, kv_heads,
    head_dim]`."""
    values = kv_cache[:, layer][page_ids]
    if kv_cache.dtype != torch.int8:
        return values.to(dtype)
    scale = scales(kv_cache)[:, layer][page_ids]  # [..., 2, kv_heads]
    return (values.float() * scale[..., None, :, None]).to(dtype)


def segments(slot_pages: torch.Tensor, slot_offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """New tokens' slots as runs of consecutive slots in one page: each run's page, first offset, first token
    and token count (a sequence's tokens are consecutive in a step's batch, so a run is one page's share of a
    sequence's new tokens)."""
    starts = torch.ones_like(slot_pages, dtype=torch.bool)
    starts[1:] = (slot_pages[1:] != slot_pages[:-1]) | (slot_offsets[1:] != slot_offsets[:-1] + 1)
    first = starts.nonzero().squeeze(1)
    counts = torch.diff(first, append=first.new_tensor([len(slot_pages)]))
    return slot_pages[first], slot_offsets[first], first, counts


def _round(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp(-127, 127)


def write(
    kv_cache: torch.Tensor,
    layer: int,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_pages: torch.Tensor,
    slot_offsets: torch.Tensor,
    runs: tuple[torch.Tensor, ...] | None = None,
) -> None:
    """Store new keys and values (`[num_tokens, kv_heads, head_dim]`, any float dtype) in their slots of `layer`,
    as the cache stores them. `runs`: `segments(slot_pages, slot_offsets)`, when already known."""
    if kv_cache.dtype != torch.int8:
        kv_cache[:, layer, 0][slot_pages, slot_offsets] = k.to(kv_cache.dtype)
        kv_cache[:, layer, 1][slot_pages, slot_offsets] = v.to(kv_cache.dtype)
        return
    page, first, _, count = runs if runs is not None else segments(slot_pages, slot_offsets)
    run_of = torch.repeat_interleave(torch.arange(len(page), device=page.device), count)
    page_size = kv_cache.shape[3]
    new = torch.zeros(len(page), 2, page_size, *k.shape[1:], device=k.device)  # [runs, 2, page_size, heads, dim]
    new[run_of, 0, slot_offsets] = k.float()
    new[run_of, 1, slot_offsets] = v.float()
    slots = torch.arange(page_size, device=page.device)
    is_new = ((slots >= first[:, None]) & (slots < (first + count)[:, None]))[:, None, :, None, None]
    is_old = (slots < first[:, None])[:, None, :, None, None]
    stored = kv_cache[:, layer][page]  # [runs, 2, page_size, heads, dim]
    old = torch.where(first[:, None, None] > 0, scales(kv_cache)[:, layer][page], 0.0)  # [runs, 2, heads]
    scale = torch.maximum(old, new.abs().amax(dim=(2, 4)) / 127)
    old, step = old[:, :, None, :, None], torch.where(scale > 0, scale, 1.0)[:, :, None, :, None]
    requantized = torch.where(scale[:, :, None, :, None] > old, _round(stored.float() * old / step), stored.float())
    rows = torch.where(is_new, _round(new / step), torch.where(is_old, requantized, stored.float()))
    kv_cache[:, layer][page] = rows.to(torch.int8)
    scales(kv_cache)[:, layer][page] = scale


def from_float(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A cache of `dtype` holding `x` (`[num_pages, num_layers, 2, page_size, kv_heads, head_dim]`, every page
    written whole)."""
    cache = allocate(tuple(x.shape), dtype, x.device)
    if dtype != torch.int8:
        return cache.copy_(x)
    scale = x.float().abs().amax(dim=(3, 5)) / 127  # [num_pages, num_layers, 2, kv_heads]
    step = torch.where(scale > 0, scale, 1.0)[:, :, :, None, :, None]
    cache.copy_(_round(x.float() / step).to(torch.int8))
    scales(cache).copy_(scale)
    return cache


def to_float(kv_cache: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The whole cache as `dtype` values (a new tensor of its shape)."""
    if kv_cache.dtype != torch.int8:
        return kv_cache.to(dtype)
    return (kv_cache.float() * scales(kv_cache)[:, :, :, None, :, None]).to(dtype)
