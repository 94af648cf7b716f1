"""`FusedDecoder`: every decoder layer of a decode-only step in one native call (`decode_layers` in
cpu_kernels.c), for quantized models on the CPU.

Layer by layer, a decode step on the CPU costs more in Python and dispatch (a dozen kernel calls, tensor
allocations and module calls per layer: ~0.25 ms per layer, 7-8 ms of a 24 ms step for the embedded model on
2 cores) than in arithmetic. The fused call runs the same kernels in the same order on buffers it owns, so its
output equals the layer-by-layer path's; `--enforce-eager` keeps that path. Steps with prompt chunks, and
batches past the quantized kernel's rows, go layer by layer.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch

from splitserve.kernels import cpu_kernels
from splitserve.kernels.cpu_quant import QuantizedLinear
from splitserve.kernels.metadata import PagedAttentionMetadata

if TYPE_CHECKING:
    from splitserve.model.llama import CausalLM


class QLinear(ctypes.Structure):
    """One quantized linear layer's tensors, as `quant_linear` takes them."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("w", "scale", "offset", "bias")]

    @classmethod
    def of(cls, layer: QuantizedLinear) -> QLinear:
        def ptr(t: torch.Tensor | None) -> int | None:
            return None if t is None else t.data_ptr()

        return cls(ptr(layer.qweight), ptr(layer.scale), ptr(layer.offset), ptr(layer.bias))


class DecodeLayer(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("qkv", QLinear), ("o", QLinear), ("post_norm", ctypes.c_void_p),
                ("gate_up", QLinear), ("down", QLinear)]  # fmt: skip


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
                raise ValueError("the fused decode step needs quantized linear layers")
            qkv, o, gate_up, down = map(QLinear.of, linears)
            norms = layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr()
            self._layers[i] = DecodeLayer(norms[0], qkv, o, norms[1], gate_up, down)
        self.weight_bits = layers[0].self_attn.qkv_proj.weight_bits
        self.activation_bits = layers[0].self_attn.qkv_proj.activation_bits
        self.max_rows = layers[0].self_attn.qkv_proj.max_rows
        self.eps = layers[0].input_layernorm.eps
        self.scale = layers[0].self_attn.scale
        self._lib = cpu_kernels.library()

    def takes(self, h: torch.Tensor, kv_cache: torch.Tensor, meta: PagedAttentionMetadata) -> bool:
        """Whether this step is one the fused call runs: decode rows only, within the quantized kernel's rows."""
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
                                self.scale, torch.get_num_threads(), self.weight_bits,
                                self.activation_bits)  # fmt: skip
        return h, residual
