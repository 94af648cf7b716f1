"""`FusedDecoder`: every decoder layer of a step in one native call (`decode_layers` in
cpu_kernels.c), for quantized models on the CPU: decode steps and prompt chunks alike, every row attending
through its own page table (`PagedAttentionMetadata.row_tables`), so a token gets the same bits either way.

Layer by layer, a decode step on the CPU costs more in Python and dispatch (a dozen kernel calls, tensor
allocations and module calls per layer: ~0.25 ms per layer, 7-8 ms of a 24 ms step for the embedded model on
2 cores) than in arithmetic. The fused call runs the same kernels in the same order on buffers it owns, so its
output equals the layer-by-layer path's; `--enforce-eager` keeps that path. Steps past the quantized kernel's
rows (int8 weights keep fp32 ones for large batches) go layer by layer.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from splitserve.kernels import cpu_kernels, kv_format
from splitserve.kernels.cpu_kernels import DecodeLayer, QLinear
from splitserve.kernels.cpu_quant import QuantizedLinear
from splitserve.kernels.metadata import PagedAttentionMetadata


@dataclass(frozen=True)
class DecoderShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    eps: float  # the RMSNorms'
    scale: float  # attention's


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer's weights, as the fused step reads them."""

    input_norm: torch.Tensor
    qkv: QuantizedLinear
    o: QuantizedLinear
    post_norm: torch.Tensor
    gate_up: QuantizedLinear
    down: QuantizedLinear


def _qlinear(layer: QuantizedLinear) -> QLinear:
    def ptr(t: torch.Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    return QLinear(ptr(layer.qweight), ptr(layer.scale), ptr(layer.offset), ptr(layer.bias), layer.weight_bits)


class FusedDecoder:
    """Holds pointers into the layers' weights: build it after the weights are final, and keep them alive."""

    def __init__(self, layers: list[LayerWeights], shape: DecoderShape):
        self.shape = shape
        self._layers = (DecodeLayer * len(layers))()
        for i, w in enumerate(layers):
            qkv, o, gate_up, down = map(_qlinear, (w.qkv, w.o, w.gate_up, w.down))
            self._layers[i] = DecodeLayer(w.input_norm.data_ptr(), qkv, o, w.post_norm.data_ptr(), gate_up, down)
        self._keep = layers
        first = layers[0].qkv
        self.activation_bits, self.max_rows = first.activation_bits, first.max_rows
        self._lib = cpu_kernels.library()

    def takes(self, h: torch.Tensor, kv_cache: torch.Tensor, meta: PagedAttentionMetadata) -> bool:
        """Whether this step is one the fused call runs: any step (decode rows and prompt chunks alike) within the
        quantized kernel's rows, over a cache the native attention reads."""
        return (
            0 < h.shape[0] <= self.max_rows
            and meta.ring_writes is None
            and kv_cache.dtype in cpu_kernels.KV_KINDS
            and kv_format.laid_out(kv_cache)
        )

    def __call__(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: PagedAttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run every layer over the embeddings `h` ([n, hidden]); returns (last layer's output, residual)."""
        shape = self.shape
        n, hidden = h.shape
        h = h.contiguous()
        residual = torch.empty_like(h)
        cos, sin = cos.contiguous(), sin.contiguous()
        table, lens = meta.row_tables
        self._lib.decode_layers(ctypes.addressof(self._layers), len(self._layers), h.data_ptr(), residual.data_ptr(),
                                cos.data_ptr(), sin.data_ptr(), kv_cache.data_ptr(), meta.slot_pages.data_ptr(),
                                meta.slot_offsets.data_ptr(), table.data_ptr(), table.stride(0),
                                lens.data_ptr(), n, hidden, shape.num_heads, shape.num_kv_heads, shape.head_dim,
                                shape.intermediate_size, kv_cache.shape[3], shape.eps, shape.scale,
                                torch.get_num_threads(), self.activation_bits,
                                cpu_kernels.KV_KINDS[kv_cache.dtype])  # fmt: skip
        return h, residual
