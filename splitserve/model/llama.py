"""The Llama-family decoder (Llama 2/3, Mistral, Qwen 2 and 3, SmolLM2, Gemma 3, and the mixtures of experts
Mixtral, Qwen 2/3 MoE and OLMoE) over a paged KV cache.

Weights load straight from Hugging Face safetensors; q/k/v and gate/up are fused into one matmul each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from splitserve.errors import ModelLoadError
from splitserve.kernels.attention import PagedAttentionMetadata, QKNorm, attend
from splitserve.kernels.layers import add_rms_norm
from splitserve.model.config import ModelConfig, rope_parameter_sets
from splitserve.model.mlp import MLP, SparseMoE
from splitserve.model.parallel import TensorParallel
from splitserve.model.rope import rope_tables


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the residual stream first (when given); returns (normalised, new residual stream).

        Normalises in fp32 and scales in the model dtype, exactly as transformers does.
        """
        return add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, tp: TensorParallel):
        super().__init__()
        self.tp = tp  # cfg is the rank's: its heads (model/parallel.py); o's partial outputs are summed here
        self.layer = layer  # where its K/V sit among a page's layers, and which page group holds them (kv_layout)
        self.group = 0
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.attention_scale or cfg.head_dim**-0.5
        self.window = cfg.window(layer)  # a sliding window (Gemma 3's local layers), or 0
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        # Query and key norms before the rotary embedding: each head's (Qwen 3), or all heads' together (OLMoE).
        self.qk_norm = cfg.qk_norm
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            q, k = (cfg.head_dim, cfg.head_dim) if cfg.qk_norm == "head" else (self.q_size, self.kv_size)
            self.q_norm, self.k_norm = RMSNorm(q, cfg.rms_norm_eps), RMSNorm(k, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: PagedAttentionMetadata,
    ) -> torch.Tensor:
        qkv, qk_norm = self.qkv_proj(x), None
        if self.qk_norm == "head":
            qk_norm = QKNorm(self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
        elif self.qk_norm == "all":
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            qkv = torch.cat((self.q_norm(q.contiguous())[0], self.k_norm(k.contiguous())[0], v), dim=-1)
        o = attend(qkv, cos, sin, kv_cache, self.layer, meta, self.num_heads, self.scale, self.window, qk_norm)
        return self.tp.all_reduce(self.o_proj(o.view(x.shape[0], self.q_size)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if layer in cfg.moe_layers:
            self.mlp = SparseMoE(cfg.hidden_size, cfg.num_experts, cfg.experts_per_token, cfg.expert_intermediate_size,
                                 cfg.norm_topk_prob, cfg.shared_expert_intermediate_size)  # fmt: skip
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, cfg.activation)

    def forward(self, h, residual, cos, sin, kv_cache, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """`h` is the previous layer's output, not yet added to the `residual` stream (None at layer 0)."""
        x, residual = self.input_layernorm(h, residual)
        h = self.self_attn(x, cos, sin, kv_cache, meta)
        x, residual = self.post_attention_layernorm(h, residual)
        return self.feed_forward(x), residual

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP (or the experts), its ranks' partial outputs summed."""
        return self.tp.all_reduce(self.mlp(x))


class SandwichDecoderLayer(DecoderLayer):
    """Gemma 3's layer: norms after attention and after the MLP too, before each joins the residual stream."""

    def __init__(self, cfg: ModelConfig, layer: int, tp: TensorParallel):
        super().__init__(cfg, layer, tp)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, residual, cos, sin, kv_cache, meta) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = self.input_layernorm(h, residual)
        attended = self.post_attention_layernorm(self.self_attn(x, cos, sin, kv_cache, meta))[0]
        x, residual = self.pre_feedforward_layernorm(attended, residual)
        return self.post_feedforward_layernorm(self.feed_forward(x))[0], residual


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        start, end = tp.vocab_range(cfg.vocab_size)
        self.embed_tokens = nn.Embedding(end - start, cfg.hidden_size)
        layer = SandwichDecoderLayer if cfg.sandwich_norms else DecoderLayer
        self.layers = nn.ModuleList(layer(cfg, i, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# Checkpoint names spelled another way by some architectures (Mixtral's experts), as our modules call them.
_ALIASES = {".block_sparse_moe.": ".mlp.", ".w1.": ".gate_proj.", ".w3.": ".up_proj.", ".w2.": ".down_proj."}
# Checkpoint modules that load into a slice of one of our fused weights: name -> (our name, shard index).
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def _our_name(name: str) -> tuple[str, int]:
    """The parameter (and the shard of it) that checkpoint tensor `name` loads into."""
    for theirs, ours in _ALIASES.items():
        name = name.replace(theirs, ours)
    module, leaf, param = name.rsplit(".", 2) if name.count(".") >= 2 else ("", "", name)
    if leaf in _FUSED:
        fused, shard = _FUSED[leaf]
        return f"{module}.{fused}.{param}", shard
    return name, 0


class CausalLM(nn.Module):
    """Decoder + LM head. `forward` runs one step's flat batch; `logits` maps chosen rows to vocab scores. In a
    worker of several ranks (`tp`), this rank's slice of them (model/parallel.py)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel | None = None):
        super().__init__()
        self.tp = tp or TensorParallel()
        self.tp.check(cfg)
        self.whole_cfg, self.cfg = cfg, self.tp.local(cfg)  # the model's, and what this rank's modules hold
        self.model = Backbone(self.cfg, self.tp)
        start, end = self.tp.vocab_range(cfg.vocab_size)
        self.lm_head = nn.Linear(cfg.hidden_size, end - start, bias=False)
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None
        self.local_rope: tuple[torch.Tensor, torch.Tensor] | None = None  # Gemma 3's sliding layers' own tables
        self.embed_scale = 1.0  # Gemma 3's, rounded to the model's dtype as transformers rounds it
        self.fused_decode = None  # a FusedDecoder once quantize(fused=True) built one

    @classmethod
    def load(
        cls,
        cfg: ModelConfig,
        weights: Iterable[tuple[str, torch.Tensor]],
        dtype: torch.dtype,
        device: torch.device,
        tp: TensorParallel | None = None,
    ) -> CausalLM:
        with torch.device("meta"):
            model = cls(cfg, tp)
        model = model.to_empty(device=device).to(dtype)
        model.load_weights(weights)
        if None in rope_parameter_sets(cfg.hf_config):  # one rotary embedding for every layer
            model.cos, model.sin = rope_tables(cfg, dtype, device)
        else:  # Gemma 3: the global layers' and the sliding ones'
            model.cos, model.sin = rope_tables(cfg, dtype, device, "full_attention")
            model.local_rope = rope_tables(cfg, dtype, device, "sliding_attention")
        model.embed_scale = torch.tensor(cfg.embed_scale, dtype=dtype).item()
        return model.eval().requires_grad_(False)

    def place_kv(self, slots: Sequence[tuple[int, int]]) -> None:
        """Each layer's place in the KV pages (`engine.kv_layout`): its page group, its index among the page's
        layers."""
        for layer, (group, slot) in zip(self.model.layers, slots, strict=True):
            layer.self_attn.group, layer.self_attn.layer = group, slot

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (Hugging Face names) into our parameters; every piece must arrive."""
        params = dict(self.named_parameters())
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
            del params["lm_head.weight"]
        missing = {(name, i) for name in params for i in range(len(self._shard_sizes(name)))}
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq") or (self.cfg.tie_word_embeddings and name == "lm_head.weight"):
                continue
            target, shard = _our_name(name)
            if target not in params:
                raise ModelLoadError(f"checkpoint tensor {name!r} has no place in {self.cfg.architecture}")
            dest = params[target].data.split(self._shard_sizes(target), dim=0)[shard]
            tensor = self.tp.shard(target, shard, tensor, self.whole_cfg)
            if dest.shape != tensor.shape:
                raise ModelLoadError(f"{name}: checkpoint shape {tuple(tensor.shape)} != expected {tuple(dest.shape)}")
            if self.cfg.norm_offset and target.endswith("norm.weight"):
                tensor = tensor.float() + 1  # stored as an offset from 1: Gemma's norms scale by (1 + w)
            dest.copy_(tensor)
            missing.discard((target, shard))
        if missing:
            names = sorted({name for name, _ in missing})
            raise ModelLoadError(f"checkpoint lacks tensors for: {', '.join(names[:5])}")

    def _shard_sizes(self, name: str) -> list[int]:
        """Row sizes of the checkpoint tensors stacked into parameter `name` (one entry if not fused)."""
        cfg = self.cfg
        if ".qkv_proj." in name:
            kv = cfg.num_kv_heads * cfg.head_dim
            return [cfg.num_heads * cfg.head_dim, kv, kv]
        if ".gate_up_proj." in name:
            return [self.get_parameter(name).shape[0] // 2] * 2
        return [self.get_parameter(name).shape[0]]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: PagedAttentionMetadata | list[PagedAttentionMetadata],
    ) -> torch.Tensor:
        """Hidden states `[num_tokens, hidden]` after the final norm; K/V of every token lands in its slot. `meta`:
        a list of one per page group when the KV layout has several (`place_kv`)."""
        cos, sin = self.cos[positions], self.sin[positions]
        h, residual = self._embed(input_ids), None
        if self.embed_scale != 1.0:
            h = h * self.embed_scale
        grouped = isinstance(meta, list)
        if not grouped and self.fused_decode is not None and self.fused_decode.takes(h, kv_cache, meta):
            h, residual = self.fused_decode(h, cos, sin, kv_cache, meta)
        else:
            local = cos, sin
            if self.local_rope is not None:
                local = self.local_rope[0][positions], self.local_rope[1][positions]
            for layer in self.model.layers:
                attn = layer.self_attn
                rope = local if attn.window else (cos, sin)
                h, residual = layer(h, residual, *rope, kv_cache, meta[attn.group] if grouped else meta)
        return self.model.norm(h, residual)[0]

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.width == 1:
            return self.model.embed_tokens(input_ids)
        start, end = self.tp.vocab_range(self.cfg.vocab_size)  # a rank's rows: the others' ids look up zeros
        inside = (input_ids >= start) & (input_ids < end)
        h = self.model.embed_tokens(torch.where(inside, input_ids - start, 0)) * inside.unsqueeze(-1)
        return self.tp.all_reduce(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.tp.gather_vocab(self.lm_head(hidden), self.cfg.vocab_size).float()
        if self.cfg.final_logit_softcap:
            logits = torch.tanh(logits / self.cfg.final_logit_softcap) * self.cfg.final_logit_softcap
        return logits

    def quantize_fp8(self) -> None:
        """The decoder layers' linear layers to fp8 weights for CUDA (kernels/fp8.py); the LM head keeps the
        model's dtype (as vLLM's fp8 does), and so do experts stored as one tensor each."""
        from splitserve.kernels.fp8 import Fp8Linear

        for layer in self.model.layers:
            _replace_linears(layer, Fp8Linear)

    def quantize(
        self, weight_bits: int = 8, activation_bits: int = 32, fused: bool = True, keep_wider: bool = False
    ) -> None:
        """Every linear layer to quantized weights for the CPU (kernels/cpu_quant.py): int8, or 4-bit (`weight_bits`
        4) for the decoder layers with int8 for the LM head (as llama.cpp keeps Q8_0 there). `keep_wider`: with 4
        bits, a matrix that is not 4-bit data already (a Q4_K_M file's Q6_K and Q5_0 ones) gets int8 weights
        instead of losing bits. The embedding table stays as it is (a step reads only its tokens' rows).
        `activation_bits`: 8 or 7 quantizes a step's activations too. `fused`: decode steps and prompt chunks run
        all layers in one native call (kernels/cpu_fused.py)."""
        from splitserve.kernels.cpu_fused import DecoderShape, FusedDecoder, LayerWeights
        from splitserve.kernels.cpu_quant import QuantizedLinear, quantize4_exact

        def quantized(child: nn.Linear, bits: int) -> nn.Module:
            blocks = quantize4_exact(child.weight.data) if bits == 4 and keep_wider else None
            wide = bits == 4 and keep_wider and blocks is None
            return QuantizedLinear(child, activation_bits, 8 if wide else bits, blocks)

        for layer in self.model.layers:
            _replace_linears(layer, lambda child: quantized(child, weight_bits))
        _replace_linears(self, lambda child: quantized(child, 8))  # what is left: the LM head
        if fused and self.cfg.fused_decode_supported and self.tp.width == 1:  # one call for all layers: no all-reduce
            cfg, layers = self.cfg, self.model.layers
            weights = [LayerWeights(layer.input_layernorm.weight, layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                    layer.post_attention_layernorm.weight, layer.mlp.gate_up_proj, layer.mlp.down_proj)
                       for layer in layers]  # fmt: skip
            shape = DecoderShape(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                                 cfg.rms_norm_eps, layers[0].self_attn.scale)  # fmt: skip
            self.fused_decode = FusedDecoder(weights, shape)


def _replace_linears(module: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> None:
    """Every `nn.Linear` under `module` replaced by `make(linear)`."""
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.Linear):
            parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            setattr(parent, name.rpartition(".")[2], make(child))
