"""Triton kernels for residual add + RMSNorm, the gated MLP's activation, and page copies between page tensors."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, h_ptr, eps, hidden,
    stride_x, stride_r, stride_o, stride_h,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        h = h + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)  # in the model dtype
    tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
    f = h.to(tl.float32)
    f = f * tl.rsqrt(tl.sum(f * f, 0) / hidden + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, w * f.to(h.dtype), mask=mask)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    n, hidden = x.shape
    out, h = torch.empty_like(x), torch.empty_like(x)
    res = residual if residual is not None else x
    _add_rms_norm_kernel[(n,)](
        x, res, weight, out, h, eps, hidden,
        x.stride(0), res.stride(0), out.stride(0), h.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden),
    )  # fmt: skip
    return out, h


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, size, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < size
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + size + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # rounded to the model dtype, as F.silu's output is
    tl.store(out_ptr + row * stride_o + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` in one launch (PyTorch takes two and a round trip of the activation through memory)."""
    rows, size = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, size, dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        block = min(1024, triton.next_power_of_2(size))
        _silu_mul_kernel[(rows, triton.cdiv(size, block))](
            gate_up, out, size, gate_up.stride(0), out.stride(0), BLOCK=block
        )
    return out


@triton.jit
def _copy_pages_kernel(src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr, page_elems, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    chunk = tl.program_id(1)
    src_page = tl.load(src_ids_ptr + i).to(tl.int64)
    dst_page = tl.load(dst_ids_ptr + i).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < page_elems
    values = tl.load(src_ptr + src_page * page_elems + offs, mask=mask)
    tl.store(dst_ptr + dst_page * page_elems + offs, values, mask=mask)


def copy_pages(src: torch.Tensor, src_ids: list[int], dst: torch.Tensor, dst_ids: list[int]) -> None:
    # Moved as the widest integers a page's bytes divide into (pages of bytes would move a byte per lane).
    page_bytes = src[0].numel() * src.element_size()
    word = next(t for t in (torch.int64, torch.int32, torch.int16, torch.uint8) if page_bytes % t.itemsize == 0)
    src, dst = src.contiguous().view(len(src), -1).view(word), dst.view(len(dst), -1).view(word)
    page_elems = src.shape[1]
    block = min(4096, triton.next_power_of_2(page_elems))
    ids = torch.tensor([src_ids, dst_ids], dtype=torch.int64).to(src.device, non_blocking=True)
    grid = (len(src_ids), triton.cdiv(page_elems, block))
    _copy_pages_kernel[grid](src, dst, ids[0], ids[1], page_elems, BLOCK=block)
