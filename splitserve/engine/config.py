"""`EngineConfig`: the knobs of one engine (model, dtype, device, KV cache budget, batch limits)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from splitserve.engine.kv_cache import parse_memory_size

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The CPU's quantized modes: (weight bits, activation bits); 32-bit activations: fp32, weight-only.
CPU_QUANTIZATIONS = {"int8": (8, 32), "w8a8": (8, 8), "w8a7": (8, 7), "w4a8": (4, 8)}
QUANTIZATIONS = ("auto", "none", *CPU_QUANTIZATIONS)


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # HF folder or .gguf file; None: the embedded SmolLM2-135M-Instruct
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16; auto: bf16 on CUDA and on CPUs with bf16 matrix instructions
    device: str | None = None  # cpu | cuda; None: cuda when present
    page_size: int = 16  # tokens per KV page
    kv_cache_memory: str | int = "1GiB"  # bytes for the KV cache; the page count follows from it
    max_num_seqs: int = 64  # requests in the running batch at once
    max_num_batched_tokens: int = 1024  # tokens per forward pass; longer prompts are prefilled in chunks
    max_model_len: int | None = None  # prompt + output limit; None: the model's (capped by the KV cache)
    # auto | none | int8 (weight-only, CPU) | w8a8 (int8 weights and activations, CPU) | w8a7 (7-bit
    # activations) | w4a8 (4-bit weights, int8 activations); auto: where the dtype is fp32 by auto, w4a8 for
    # a GGUF model with Q4_1 layers (the embedded default), w8a8 for others
    quantization: str = "auto"
    prefix_caching: bool = True  # reuse the KV pages of a prompt's prefix computed before
    enforce_eager: bool = False  # run every step layer by layer (no fused or captured decode steps)
    cache_ttl_s: float = 300.0  # how long a conversation's pages are kept after its turn (prompt_cache_key)

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("page_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        parse_memory_size(self.kv_cache_memory)  # fail at start-up, not after loading the weights
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        cpu_only = self.quantization in CPU_QUANTIZATIONS
        if cpu_only and (self.torch_device.type != "cpu" or self.resolved_dtype != "fp32"):
            raise ValueError(f"--quantization {self.quantization} is for the CPU, with fp32 (--dtype fp32 or auto)")
        if self.cache_ttl_s < 0:
            raise ValueError(f"cache_ttl_s must be >= 0, got {self.cache_ttl_s}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def kv_cache_bytes(self) -> int:
        return parse_memory_size(self.kv_cache_memory)

    @property
    def resolved_dtype(self) -> str:
        """The dtype `auto` stands for on this machine (see `fast_dtype`), or the one asked for."""
        return fast_dtype(self.torch_device) if self.dtype == "auto" else self.dtype

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.resolved_dtype]

    @property
    def resolved_quantization(self) -> str:
        """`auto`, where `--dtype auto` chose fp32 on the CPU (bf16 there would be slow) and the kernels build: w4a8
        for a GGUF model whose layers are Q4_1 (the embedded default: its own weights, the fastest mode), w8a8
        for others. Weights stay as they are otherwise; an explicit `--dtype` keeps its weights exact."""
        if self.quantization != "auto":
            return self.quantization
        from splitserve.kernels import cpu_quant
        from splitserve.model.checkpoint import has_q4_1_weights

        fast_cpu = self.dtype == "auto" and self.resolved_dtype == "fp32" and self.torch_device.type == "cpu"
        if not (fast_cpu and cpu_quant.available()):
            return "none"
        return "w4a8" if has_q4_1_weights(self.model) else "w8a8"

    def describe_dtype(self) -> str:
        """e.g. `fp32 (auto), int8 weights (auto)`, for start-up messages."""
        text = self.resolved_dtype + (" (auto)" if self.dtype == "auto" else "")
        if self.resolved_quantization != "none":
            text += f", {self.resolved_quantization} weights" + (" (auto)" if self.quantization == "auto" else "")
        return text


def fast_dtype(device: torch.device) -> str:
    """bf16 where it is fast: on CUDA, and on CPUs with native bf16 matrix instructions (AVX512-BF16 or AMX on
    x86, the BF16 extension on Arm). Elsewhere bf16 is emulated, hundreds of times slower than fp32 (0.3 against
    100 GFLOP/s on an AVX2 machine), so fp32."""
    if device.type == "cuda":
        return "bf16"
    return "bf16" if cpu_has_bf16() else "fp32"


@functools.cache
def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no way to tell cheaply; fp32 is never the slow choice
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16", "bf16"))
