"""Triton kernels for residual add + RMSNorm, rotary embedding, and page copies between page tensors."""

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
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    stride_xn, stride_xh, stride_cn, stride_on, stride_oh,
    HALF: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    h = tl.program_id(1)
    i = tl.arange(0, HALF)
    x = x_ptr + n * stride_xn + h * stride_xh
    lo, hi = tl.load(x + i), tl.load(x + HALF + i)
    cos_lo, cos_hi = tl.load(cos_ptr + n * stride_cn + i), tl.load(cos_ptr + n * stride_cn + HALF + i)
    sin_lo, sin_hi = tl.load(sin_ptr + n * stride_cn + i), tl.load(sin_ptr + n * stride_cn + HALF + i)
    out = out_ptr + n * stride_on + h * stride_oh
    tl.store(out + i, lo * cos_lo - hi * sin_lo)
    tl.store(out + HALF + i, hi * cos_hi + lo * sin_hi)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    n, heads, dim = x.shape
    out = torch.empty(n, heads, dim, dtype=x.dtype, device=x.device)
    if n:
        _rope_kernel[(n, heads)](
            x, cos, sin, out, x.stride(0), x.stride(1), cos.stride(0), out.stride(0), out.stride(1), HALF=dim // 2
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
    page_elems = src[0].numel()
    block = min(4096, triton.next_power_of_2(page_elems))
    s = torch.tensor(src_ids, dtype=torch.int64).to(src.device, non_blocking=True)
    d = torch.tensor(dst_ids, dtype=torch.int64).to(src.device, non_blocking=True)
    _copy_pages_kernel[(len(src_ids), triton.cdiv(page_elems, block))](
        src.contiguous(), dst, s, d, page_elems, BLOCK=block
    )
