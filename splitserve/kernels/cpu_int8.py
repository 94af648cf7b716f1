"""Int8 linear layers on the CPU: `QuantizedLinear` over the AVX2 kernel `q8_linear` (cpu_kernels.c);
`available()` says whether the kernels built here (no compiler, or a CPU without AVX2/FMA, means no int8 path,
and `--quantization auto` then keeps fp32 weights).

Three modes over the same int8 weights: `int8` is weight-only (activations stay fp32; the weights are converted
in registers); `w8a8` also quantizes each row's activations to int8 per block of 32 (dynamic, as llama.cpp's
Q8_0 does) and sums integer products (AVX2 `maddubs`): about half the instructions per weight, for approximate
activations; `w8a7` rounds them to 7 bits instead, which lets `maddubs` take them as they are (no sign
trick): a quarter fewer instructions again, for coarser activations.

Decode steps (a few rows) are memory-bound: the kernel reads a quarter of the bytes. A prefill's many rows are
compute-bound, where the fp32 GEMM wins, so the layer keeps its fp32 weights for them too: int8 buys speed here,
at the cost of 25% more weight memory (a tied LM head shares the embedding's fp32 table).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.kernels import cpu_kernels

# Up to this many rows the kernel wins; past it the fp32 GEMM does (measured on an AVX2 EPYC): with fp32
# activations, and with int8 ones (integer dot products: 1.3-1.5x the fp32 GEMM at 64 rows, even at 256).
KERNEL_MAX_ROWS = 48
W8A8_MAX_ROWS = 128


def available() -> bool:
    return cpu_kernels.library() is not None


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns (int8 weight [N, K], fp32 scale [N])."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous(), scale.contiguous()


BLOCK, GROUP = 32, 4  # the kernel's packing: blocks of 32 inputs, groups of 4 output channels


def pack(qweight: torch.Tensor) -> torch.Tensor:
    """Row-major int8 [N, K] to the kernel's layout: [ceil(N/4), ceil(K/32), 4, 32], zero-padded, flat."""
    n, k = qweight.shape
    padded = qweight.new_zeros(-(-n // GROUP) * GROUP, -(-k // BLOCK) * BLOCK)
    padded[:n, :k] = qweight
    groups, blocks = padded.shape[0] // GROUP, padded.shape[1] // BLOCK
    return padded.view(groups, GROUP, blocks, BLOCK).permute(0, 2, 1, 3).contiguous().view(-1)


def unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """`pack`'s inverse: row-major int8 [n, k]."""
    groups, blocks = -(-n // GROUP), -(-k // BLOCK)
    return packed.view(groups, blocks, GROUP, BLOCK).permute(0, 2, 1, 3).reshape(groups * GROUP, -1)[:n, :k]


class QuantizedLinear(nn.Module):
    """A frozen `nn.Linear` with int8 weights for up to `max_rows` rows, its fp32 weights past them."""

    def __init__(self, linear: nn.Linear, activation_bits: int = 32):
        """`activation_bits`: 32 keeps a step's activations in fp32; 8 or 7 quantizes them per block of 32."""
        super().__init__()
        if activation_bits not in (32, 8, 7):
            raise ValueError(f"activation_bits must be 32, 8 or 7, got {activation_bits}")
        self.activation_bits = activation_bits
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # shared, not copied
        qweight, scale = quantize(linear.weight.data)
        self.register_buffer("qweight", pack(qweight))
        # 7-bit activations travel with an offset of 64 that the kernel takes back with each block's weight sums
        blocks = self.qweight.view(-1, -(-self.in_features // BLOCK), GROUP, BLOCK)
        wsum = (64 * blocks.sum(-1, dtype=torch.int32)).float().contiguous() if activation_bits == 7 else None
        self.register_buffer("wsum", wsum)
        self.register_buffer("scale", scale)
        bias = None if linear.bias is None else linear.bias.data.float().contiguous()
        self.register_buffer("bias", bias)
        self._lib = cpu_kernels.library()
        if self._lib is None:
            raise RuntimeError("the int8 CPU kernel is not available on this machine")

    @property
    def max_rows(self) -> int:
        return KERNEL_MAX_ROWS if self.activation_bits == 32 else W8A8_MAX_ROWS

    def dequantized(self) -> torch.Tensor:
        return unpack(self.qweight, self.out_features, self.in_features).float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        if x.shape[0] > self.max_rows:
            return F.linear(x, self.weight, self.bias).view(*shape[:-1], self.out_features)
        x = x.float().contiguous()
        y = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
        bias = self.bias.data_ptr() if self.bias is not None else None
        self._lib.q8_linear(x.data_ptr(), self.qweight.data_ptr(), self.scale.data_ptr(), bias, y.data_ptr(),
                            x.shape[0], self.out_features, self.in_features, torch.get_num_threads(),
                            self.activation_bits, None if self.wsum is None else self.wsum.data_ptr())  # fmt: skip
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        bits = self.activation_bits
        activations = f", {bits}-bit activations per block of 32" if bits != 32 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel{activations}"
