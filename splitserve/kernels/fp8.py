"""FP8 weights (`--quantization fp8`, CUDA devices of compute capability 8.9 and up): each decoder linear
layer's weight in float8_e4m3fn with one fp32 scale per output channel (its largest magnitude over 448), half
the bytes a decode step reads in bf16. The LM head and the embedding stay in the model's dtype.

`Fp8Linear` multiplies a few rows (decode steps of up to `WEIGHT_ONLY_MAX_ROWS` requests) through
`fp8_linear`, a Triton kernel that reads the fp8 weights, widens them to the activations' dtype in registers and
scales the fp32 accumulator per channel: the activations stay exact and the step is bound by the weight bytes.
More rows (prompt passes, large decode batches) go through `torch._scaled_mm` on the fp8 tensor cores, with the
activations quantized per row the same way (amax over 448). Both are capturable in a CUDA graph (no host sync).

`dequantize` gives the weights as the kernel sees them: the CPU measures quality with them
(`benchmarks/quality.py --modes fp8`) and tests the kernel against them under `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
# Up to this many rows the weight-only kernel runs (bound by reading the weights); past it, fp8 tensor cores.
WEIGHT_ONLY_MAX_ROWS = 16
MIN_CAPABILITY = (8, 9)  # Ada, Hopper and newer have fp8 tensor cores (torch._scaled_mm)


def unsupported(device: torch.device) -> str | None:
    """Why `--quantization fp8` cannot run on `device`, or None where it can."""
    if device.type != "cuda":
        return f"it needs a CUDA device of compute capability 8.9 or newer (Ada, Hopper), not {device}"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return f"{name} is of compute capability {capability[0]}.{capability[1]}; fp8 needs 8.9 or newer (Ada, Hopper)"
    return None


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[out, in]` weights as (float8_e4m3fn weights, fp32 scale per output channel)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weights as `fp8_linear` multiplies them."""
    return (qweight.float() * scale[:, None]).to(dtype)


@triton.jit
def _fp8_linear_kernel(
    x_ptr, w_ptr, scale_ptr, out_ptr, M, N, K, stride_x, stride_w, stride_o,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        kk = k + ks
        x = tl.load(x_ptr + rows[:, None] * stride_x + kk[None, :], mask=(rows[:, None] < M) & (kk[None, :] < K),
                    other=0.0)  # fmt: skip
        w = tl.load(w_ptr + cols[:, None] * stride_w + kk[None, :], mask=(cols[:, None] < N) & (kk[None, :] < K),
                    other=0.0)  # fmt: skip
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    acc = acc * tl.load(scale_ptr + cols, mask=cols < N, other=0.0)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))  # fmt: skip


def fp8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x @ dequantize(qweight, scale).T` (`x` `[M, K]`, `qweight` `[N, K]` fp8), in `x`'s dtype, reading the
    weights as fp8."""
    m, k = x.shape
    n = qweight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    # Few rows: narrow column blocks so that a step's programs cover the device; long K blocks stream the weights.
    block_m, block_n, block_k = (16, 32, 256) if m <= WEIGHT_ONLY_MAX_ROWS else (64, 64, 64)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fp8_linear_kernel[grid](
        x, qweight, scale, out, m, n, k, x.stride(0), qweight.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=min(block_k, triton.next_power_of_2(k)),
    )  # fmt: skip
    return out


def scaled_mm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The same product on fp8 tensor cores: `x`'s rows quantized to fp8 with a scale each."""
    x_scale = (x.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    xq = (x.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return torch._scaled_mm(xq, qweight.t(), scale_a=x_scale, scale_b=scale[None, :], out_dtype=x.dtype)


class Fp8Linear(nn.Module):
    """An `nn.Linear`'s weight in fp8 with per-channel scales (its bias, if any, kept as it was)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        qweight, scale = quantize(linear.weight.data)
        self.qweight = nn.Parameter(qweight, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= WEIGHT_ONLY_MAX_ROWS:
            out = fp8_linear(rows.contiguous(), self.qweight, self.scale)
        else:
            out = scaled_mm(rows, self.qweight, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)


def round_weights(layers: nn.Module) -> None:
    """Every linear layer's weight in `layers` rounded through fp8 as `Fp8Linear` would hold it, left in its
    dtype: the model as the fp8 kernels see it, where they cannot run (the CPU's quality measure)."""
    for module in layers.modules():
        if isinstance(module, nn.Linear):
            module.weight.data = dequantize(*quantize(module.weight.data), module.weight.dtype)
