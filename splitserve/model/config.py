"""`ModelConfig`: the few numbers of a Hugging Face config that the runtime needs, checked once at load."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import GenerationConfig

from splitserve.errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "OlmoeForCausalLM",
    "Gemma3ForCausalLM",
)
_QK_NORMS = {
    "Qwen3ForCausalLM": "head",
    "Qwen3MoeForCausalLM": "head",
    "Gemma3ForCausalLM": "head",
    "OlmoeForCausalLM": "all",
}
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}  # transformers' name -> ours
# Rope types whose frequencies do not depend on the sequence length at run time.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _raw_config(folder: str | Path) -> dict:
    try:
        return json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {folder}/config.json: {e}") from e


def vocab_size(folder: str | Path) -> int:
    """The model's vocabulary size from its `config.json` alone (what the router needs of the config)."""
    config = _raw_config(folder)
    try:
        return int(config.get("vocab_size") or config["text_config"]["vocab_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"cannot read the vocabulary size from {folder}/config.json: {e}") from e


def architecture(folder: str | Path) -> str:
    """The model's architecture from its `config.json` alone, if splitserve runs it; else a `ModelLoadError`
    naming it and the supported ones (what `serve` checks before it starts anything)."""
    config = _raw_config(folder)
    return _supported(config.get("architectures") or [], config.get("model_type"))


def _supported(archs: list[str], model_type: str | None) -> str:
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        named = ", ".join(archs) if archs else f"model_type {model_type!r}"
        raise ModelLoadError(f"unsupported architecture {named}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    # Query and key RMS norms before the rotary embedding: "" none, "head" each head's (Qwen 3), "all" all
    # heads' together (OLMoE).
    qk_norm: str
    eos_token_ids: tuple[int, ...]
    hf_config: PretrainedConfig
    # Mixture of experts (0 experts: none): the layers whose MLP is one (the others are dense, of
    # `intermediate_size`), each token's number of experts, an expert's size, whether the chosen experts'
    # weights are renormalised to sum to 1, and the shared expert's size (0: none).
    num_experts: int = 0
    moe_layers: tuple[int, ...] = ()
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0
    # Each layer's sliding window (0: it sees the whole context; Gemma 3, Mistral, ...), and Gemma 3's: the
    # attention's scale (0: head_dim's), the embeddings' scale, norm weights stored as an offset from 1 ("1 + w"),
    # a norm after attention and around the MLP as well ("sandwich"), the MLP's activation ("silu" or
    # "gelu_tanh"), and a soft cap on the final logits (0: none).
    layer_windows: tuple[int, ...] = ()
    attention_scale: float = 0.0
    embed_scale: float = 1.0
    norm_offset: bool = False
    sandwich_norms: bool = False
    activation: str = "silu"
    final_logit_softcap: float = 0.0

    @property
    def fused_decode_supported(self) -> bool:
        """Whether the CPU's native all-layers decode step (kernels/cpu_fused.py) runs this model: Llama-shaped
        layers only."""
        return not (self.qk_norm or self.num_experts or self.sandwich_norms or any(self.layer_windows)
                    or self.activation != "silu" or self.embed_scale != 1.0)  # fmt: skip

    def window(self, layer: int) -> int:
        return self.layer_windows[layer] if self.layer_windows else 0

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ModelConfig:
        from transformers import AutoConfig  # here only: it imports torch, which the router never loads

        try:
            hf = AutoConfig.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot read the model config in {folder}: {e}") from e
        arch = _supported(getattr(hf, "architectures", None) or [], hf.model_type)
        act = getattr(hf, "hidden_activation", None) or hf.hidden_act
        if act not in _ACTIVATIONS:
            raise ModelLoadError(f"unsupported activation {act!r}; supported: {', '.join(_ACTIVATIONS)}")
        for rope in rope_parameter_sets(hf).values():
            if rope.get("rope_type", "default") not in SUPPORTED_ROPE_TYPES:
                supported = ", ".join(SUPPORTED_ROPE_TYPES)
                raise ModelLoadError(f"unsupported rope type {rope.get('rope_type')!r}; supported: {supported}")
        for unsupported in ("clip_qkv", "attn_logit_softcapping"):
            if getattr(hf, unsupported, None) is not None:
                raise ModelLoadError(f"{unsupported} is not supported")
        if getattr(hf, "use_bidirectional_attention", False):
            raise ModelLoadError("bidirectional attention (an embedding model) is not supported")
        gemma = arch == "Gemma3ForCausalLM"
        windows = _layer_windows(arch, hf)
        max_positions = hf.max_position_embeddings
        num_heads = hf.num_attention_heads
        is_qwen2 = arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")
        attention_bias = bool(getattr(hf, "attention_bias", False))
        num_experts = getattr(hf, "num_local_experts", None) or getattr(hf, "num_experts", None) or 0
        sparse_step = getattr(hf, "decoder_sparse_step", None) or 1
        dense_layers = set(getattr(hf, "mlp_only_layers", None) or [])
        moe_layers = tuple(i for i in range(hf.num_hidden_layers) if num_experts and i not in dense_layers
                           and (i + 1) % sparse_step == 0)  # fmt: skip
        return cls(
            architecture=arch,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // num_heads,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=is_qwen2 or attention_bias,  # Qwen2 always has q/k/v bias, never o bias
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=_QK_NORMS.get(arch, ""),
            eos_token_ids=_eos_token_ids(folder, hf),
            hf_config=hf,
            num_experts=num_experts,
            moe_layers=moe_layers,
            experts_per_token=getattr(hf, "num_experts_per_tok", 0) if num_experts else 0,
            expert_intermediate_size=getattr(hf, "moe_intermediate_size", None) or hf.intermediate_size,
            # Mixtral always renormalises (its config has no such field)
            norm_topk_prob=arch == "MixtralForCausalLM" or bool(getattr(hf, "norm_topk_prob", False)),
            shared_expert_intermediate_size=getattr(hf, "shared_expert_intermediate_size", None) or 0,
            layer_windows=windows,
            attention_scale=hf.query_pre_attn_scalar**-0.5 if gemma else 0.0,
            embed_scale=hf.hidden_size**0.5 if gemma else 1.0,
            norm_offset=gemma,
            sandwich_norms=gemma,
            activation=_ACTIVATIONS[act],
            final_logit_softcap=float(getattr(hf, "final_logit_softcapping", None) or 0.0),
        )


def _layer_windows(arch: str, hf: PretrainedConfig) -> tuple[int, ...]:
    """Each layer's sliding window (0: it sees the whole context), or () when no layer has one: the layers that
    `layer_types` calls sliding (Gemma 3; Qwen 2/3 with `use_sliding_window`), or every layer of a Mistral or
    Mixtral whose config sets `sliding_window`."""
    window = getattr(hf, "sliding_window", None) or 0
    types = getattr(hf, "layer_types", None)
    if types and "sliding_attention" in types:
        return tuple(window if t == "sliding_attention" else 0 for t in types)
    if arch in ("MistralForCausalLM", "MixtralForCausalLM") and window:
        return (window,) * hf.num_hidden_layers
    return ()


def rope_parameter_sets(hf: PretrainedConfig) -> dict[str | None, dict]:
    """The rotary embedding's parameters by layer type: one set (key None) for most models; Gemma 3 has one for
    its sliding layers and one for the others."""
    params = hf.rope_parameters
    if "rope_type" in params or "rope_theta" in params:
        return {None: params}
    return dict(params)


def _eos_token_ids(folder: str | Path, hf: PretrainedConfig) -> tuple[int, ...]:
    """EOS ids from generation_config.json when present (chat models list several), else config.json."""
    eos = None
    if (Path(folder) / "generation_config.json").exists():
        eos = GenerationConfig.from_pretrained(folder).eos_token_id
    if eos is None:
        eos = hf.eos_token_id
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)
