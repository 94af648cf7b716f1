"""`FusedDecoder`: every decoder layer of a decode-only step in one native call (`decode_layers` in
cpu_kernels.c), for int8 models on the CPU.

Layer by layer, a decode step on the CPU costs more in Python and dispatch (a dozen kernel calls, tensor
allocations and module calls per layer: ~0.25 ms per layer, 7-8 ms of a 24 ms step for the embedded model on
2 cores) than in arithmetic. The fused call runs the same kernels in the same order on buffers it owns, so its
output equals the layer-by-layer path's; `--enforce-eager` keeps that path. Steps with prompt chunks, and
batches past the int8 kernel's rows, go layer by layer.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch

from splitserve.kernels import cpu_kernels
from splitserve.kernels.cpu_int8 import QuantizedLinear
from splitserve.kernels.metadata import PagedAttentionMetadata

if TYPE_CHECKING:
    from splitserve.model.llama import CausalLM

_FIELDS = ("input_norm", "qkv_w", "qkv_scale", "qkv_bias", "qkv_wsum", "o_w", "o_scale", "o_bias", "o_wsum",
           "post_norm", "gate_up_w", "gate_up_scale", "gate_up_bias", "gate_up_wsum", "down_w", "down_scale",
           "down_bias", "down_wsum")  # fmt: skip


class DecodeLayer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in _FIELDS]


def _linear(layer: QuantizedLinear) -> tuple[int, int, int | None, int | None]:
    def ptr(t: torch.Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    return ptr(layer.qweight), ptr(layer.scale), ptr(layer.bias), ptr(layer.wsum)


class FusedDecoder:
    """Holds pointers into the model's weights: build it after the weights are final, and keep the model."""

    def __init__(self, model: CausalLM):
        cfg = model.cfg
        self.cfg = cfg
        layers = model.model.layers
        self._layers = (DecodeLayer * len(layers))()
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if not all(isinstance(x, QuantizedLinear) for x in linears):
                raise ValueError("the fused decode step needs int8 linear layers")
            qkv, o, gate_up, down = map(_linear, linears)
            norms = layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr()
            self._layers[i] = DecodeLayer(norms[0], *qkv, *o, norms[1], *gate_up, *down)
        self.activation_bits = layers[0].self_attn.qkv_proj.activation_bits
        self.max_rows = layers[0].self_attn.qkv_proj.max_rows
        self.eps = layers[0].input_layernorm.eps
        self.scale = layers[0].self_attn.scale
        self._lib = cpu_kernels.library()

    def takes(self, h: torch.Tensor, kv_cache: torch.Tensor, meta: PagedAttentionMetadata) -> bool:
        """Whether this step is one the fused call runs: decode rows only, within the int8 kernel's rows."""
        n = h.shape[0]
        return (
            not meta.prefills
            and meta.num_decode == n
            and 0 < n <= self.max_rows
            and kv_cache.dtype == torch.float32
            and kv_cache.is_contiguous()
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
        cfg = self.cfg
        n = h.shape[0]
        h = h.contiguous()
        residual = torch.empty_like(h)
        cos, sin = cos.contiguous(), sin.contiguous()
        table = meta.decode_page_table
        if table.stride(1) != 1:
            table = table.contiguous()
        self._lib.decode_layers(ctypes.addressof(self._layers), cfg.num_layers, h.data_ptr(), residual.data_ptr(),
                                cos.data_ptr(), sin.data_ptr(), kv_cache.data_ptr(), meta.slot_pages.data_ptr(),
                                meta.slot_offsets.data_ptr(), table.data_ptr(), table.stride(0),
                                meta.decode_context_lens.data_ptr(), n, cfg.hidden_size, cfg.num_heads,
                                cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size, kv_cache.shape[3], self.eps,
                                self.scale, torch.get_num_threads(), self.activation_bits)  # fmt: skip
        return h, residual
