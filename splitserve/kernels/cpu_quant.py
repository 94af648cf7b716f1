"""Quantized linear layers on the CPU: `QuantizedLinear` over the AVX2 kernel `quant_linear` (cpu_kernels.c);
`available()` says whether the kernels built here (no compiler, or a CPU without AVX2/FMA, means no quantized
path, and `--quantization auto` then keeps fp32 weights).

Int8 weights (one scale per output channel) in three modes: `int8` is weight-only (activations stay fp32; the
weights are converted in registers); `w8a8` also quantizes each row's activations to int8 per block of 32
(dynamic, as llama.cpp's Q8_0 does) and sums integer products (AVX2 `maddubs`): about half the instructions per
weight, for approximate activations; `w8a7` rounds them to 7 bits instead, which lets `maddubs` take them as they
are (no sign trick): a quarter fewer instructions again, for coarser activations. `w4a8` stores 4-bit weights with
a scale and a minimum per channel and block of 32 (llama.cpp's Q4_1: the embedded GGUF model's own weights, which
it reproduces exactly) and int8 activations: half the bytes of int8 weights for about the same instructions.

Decode steps (a few rows) are memory-bound: the kernel reads a quarter (an eighth) of the bytes. The modes with
quantized activations (w8a8, w8a7, w4a8) run every row through their kernel, a prompt's many rows as a decode
step's few: a row's output depends on that row alone (the integer sums are exact and each output's float
arithmetic is the same sequence whatever the batch), so a token gets the same bits in a prompt chunk of any size
and in a decode step of any batch (the one numerics that batch-invariant serving and exact migration rest on).
The weight-only `int8` mode keeps the fp32 weights for batches past `KERNEL_MAX_ROWS` (where the fp32 GEMM wins),
so it promises no such thing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.kernels import cpu_kernels

# Up to this many rows the weight-only int8 kernel (fp32 activations) wins; past it the fp32 GEMM does (measured
# on an AVX2 EPYC).
KERNEL_MAX_ROWS = 48


def available() -> bool:
    return cpu_kernels.library() is not None


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns (int8 weight [N, K], fp32 scale [N])."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous(), scale.contiguous()


BLOCK, GROUP = 32, 4  # the kernel's packing: blocks of 32 inputs, groups of 4 output channels


def quantize4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per channel and block of 32 inputs (llama.cpp's Q4_1), w = d * q + m with q in 0..15:
    returns (q uint8 [N, K padded to blocks], d [N, blocks], m [N, blocks]). A last partial block is zero-padded.

    Weights that a 4-bit GGUF file held come back exactly, block by block, as the file's: each block is tried
    against the grids its format would have used, and the first that reproduces every value (as `d * q + m` in
    fp32) is kept: Q4_1's (the block's minimum and range / 15), Q4_0's (w = d * (q - 8): the largest magnitude
    is -8 d), and a grid of the smallest step between the block's values from its minimum (Q4_K's sub-blocks,
    w = d * sc * q - dmin * m, which need not reach 0 or 15). Other weights get the Q4_1 fit (rounded)."""
    n, k = weight.shape
    w = F.pad(weight.float(), (0, -k % BLOCK)).view(n, -1, BLOCK)
    lo, hi = w.amin(-1), w.amax(-1)
    extreme = w.gather(-1, w.abs().argmax(-1, keepdim=True)).squeeze(-1)
    steps = w.sort(-1).values.diff(dim=-1)
    step = torch.where(steps > 0, steps, torch.full_like(steps, math.inf)).amin(-1)
    candidates = [((hi - lo) / 15, lo), (-extreme / 8, extreme), (torch.where(step.isinf(), 0, step), lo)]
    d, m = candidates[0]
    q = _grid(w, d, m)
    chosen = torch.zeros_like(lo, dtype=torch.bool)
    for cd, cm in candidates:
        cq = _grid(w, cd, cm)
        exact = ~chosen & (cq.float() * cd[..., None] + cm[..., None] == w).all(-1)
        d, m = torch.where(exact, cd, d), torch.where(exact, cm, m)
        q = torch.where(exact[..., None], cq, q)
        chosen |= exact
    return q.view(n, -1), d.contiguous(), m.contiguous()


def quantize4_exact(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`quantize4(weight)` where every block of `weight` is on the 4-bit grid it recovers, exactly: a 4-bit GGUF
    matrix's (Q4_0, Q4_1, Q4_K); None for a wider one's (Q5_0, Q6_K, Q8_0, F16) or a trained one's."""
    q, d, m = quantize4(weight)
    n, k = weight.shape
    back = (q.float().view(n, -1, BLOCK) * d[..., None] + m[..., None]).view(n, -1)[:, :k]
    return (q, d, m) if torch.equal(back, weight.float()) else None


def _grid(w: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Each block's values on the grid d * q + m, q rounded into 0..15."""
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    return ((w - m[..., None]) * inv[..., None]).round().clamp(0, 15).to(torch.uint8)


def pack(qweight: torch.Tensor) -> torch.Tensor:
    """Row-major [N, K] to the kernel's layout: [ceil(N/4), ceil(K/32), 4, 32], zero-padded, flat."""
    n, k = qweight.shape
    padded = qweight.new_zeros(-(-n // GROUP) * GROUP, -(-k // BLOCK) * BLOCK)
    padded[:n, :k] = qweight
    groups, blocks = padded.shape[0] // GROUP, padded.shape[1] // BLOCK
    return padded.view(groups, GROUP, blocks, BLOCK).permute(0, 2, 1, 3).contiguous().view(-1)


def unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """`pack`'s inverse: row-major [n, k]."""
    groups, blocks = -(-n // GROUP), -(-k // BLOCK)
    return packed.view(groups, blocks, GROUP, BLOCK).permute(0, 2, 1, 3).reshape(groups * GROUP, -1)[:n, :k]


GROUP4 = 8  # 4-bit weights come in groups of 8 output channels (see linear_w4 in cpu_kernels.c)


def pack4(q: torch.Tensor) -> torch.Tensor:
    """4-bit values (uint8 [N, K], 0..15) to the kernel's layout, zero-padded, flat: per group of 8 channels and
    block of 32 inputs, 4 runs of 32 bytes; byte 4c + t of run r holds channel c's value at input 4r + t in its low
    nibble and at input 4r + 16 + t in its high one."""
    n, k = q.shape
    padded = q.new_zeros(-(-n // GROUP4) * GROUP4, -(-k // BLOCK) * BLOCK)
    padded[:n, :k] = q
    groups, blocks = padded.shape[0] // GROUP4, padded.shape[1] // BLOCK
    # [group, channel, block, half, run, t] -> [group, block, half, run, channel, t]
    v = padded.view(groups, GROUP4, blocks, 2, 4, 4).permute(0, 2, 3, 4, 1, 5)
    return (v[:, :, 0] | (v[:, :, 1] << 4)).contiguous().view(-1)


def unpack4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """`pack4`'s inverse: uint8 [n, k]."""
    groups, blocks = -(-n // GROUP4), -(-k // BLOCK)
    v = packed.view(groups, blocks, 1, 4, GROUP4, 4)
    v = torch.cat([v & 15, v >> 4], dim=2)  # [group, block, half, run, channel, t]
    return v.permute(0, 4, 1, 2, 3, 5).reshape(groups * GROUP4, blocks * BLOCK)[:n, :k]


def _per_group(t: torch.Tensor, size: int) -> torch.Tensor:
    """[N, blocks] to the kernel's [ceil(N/size), blocks, size], zero-padded, flat."""
    n, blocks = t.shape
    padded = F.pad(t, (0, 0, 0, -n % size))
    return padded.view(-1, size, blocks).transpose(1, 2).contiguous().view(-1)


def _from_groups(t: torch.Tensor, n: int, size: int) -> torch.Tensor:
    """`_per_group`'s inverse."""
    groups = -(-n // size)
    return t.view(groups, -1, size).transpose(1, 2).reshape(groups * size, -1)[:n]


class QuantizedLinear(nn.Module):
    """A frozen `nn.Linear` with quantized weights for up to `max_rows` rows, its fp32 weights past them (weight-only
    int8)."""

    def __init__(
        self,
        linear: nn.Linear,
        activation_bits: int = 32,
        weight_bits: int = 8,
        blocks4: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ):
        """`weight_bits`: 8 (int8 per channel) or 4 (Q4_1 per block of 32, with 8-bit activations only).
        `activation_bits`: 32 keeps a step's activations in fp32; 8 or 7 quantizes them per block of 32.
        `blocks4`: the weight's `quantize4` already computed (`quantize4_exact`), for 4 bits."""
        super().__init__()
        if (weight_bits, activation_bits) not in ((8, 32), (8, 8), (8, 7), (4, 8)):
            raise ValueError(f"no kernel for {weight_bits}-bit weights with {activation_bits}-bit activations")
        self.weight_bits, self.activation_bits = weight_bits, activation_bits
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight if activation_bits == 32 else None  # shared, not copied
        if weight_bits == 4:
            q, d, m = blocks4 if blocks4 is not None else quantize4(linear.weight.data)
            qweight, scale, offset = pack4(q), _per_group(d, GROUP4), _per_group(m, GROUP4)
        else:
            q, scale = quantize(linear.weight.data)
            qweight = pack(q)
            # 7-bit activations travel with an offset of 64 that the kernel takes back with each block's weight sums
            blocks = qweight.view(-1, -(-self.in_features // BLOCK), GROUP, BLOCK)
            offset = (64 * blocks.sum(-1, dtype=torch.int32)).float().contiguous() if activation_bits == 7 else None
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        bias = None if linear.bias is None else linear.bias.data.float().contiguous()
        self.register_buffer("bias", bias)
        self._lib = cpu_kernels.library()
        if self._lib is None:
            raise RuntimeError("the quantized CPU kernel is not available on this machine")

    @property
    def max_rows(self) -> float:
        """The most rows the quantized kernel runs; past them the fp32 weights do (weight-only int8 only)."""
        return KERNEL_MAX_ROWS if self.activation_bits == 32 else math.inf

    def dequantized(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        if self.weight_bits == 8:
            return unpack(self.qweight, n, k).float() * self.scale[:, None]
        q = unpack4(self.qweight, n, -(-k // BLOCK) * BLOCK).float().view(n, -1, BLOCK)
        d, m = _from_groups(self.scale, n, GROUP4), _from_groups(self.offset, n, GROUP4)
        return (q * d[..., None] + m[..., None]).view(n, -1)[:, :k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        if x.shape[0] > self.max_rows:
            return F.linear(x, self.weight, self.bias).view(*shape[:-1], self.out_features)
        x = x.float().contiguous()
        y = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)

        def ptr(t: torch.Tensor | None) -> int | None:
            return None if t is None else t.data_ptr()

        self._lib.quant_linear(x.data_ptr(), self.qweight.data_ptr(), self.scale.data_ptr(), ptr(self.offset),
                               ptr(self.bias), y.data_ptr(), x.shape[0], self.out_features, self.in_features,
                               torch.get_num_threads(), self.weight_bits, self.activation_bits)  # fmt: skip
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        bits = self.activation_bits
        weights = "int8 per channel" if self.weight_bits == 8 else "4-bit per block of 32 (scale, minimum)"
        activations = f", {bits}-bit activations per block of 32" if bits != 32 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {weights}{activations}"
