"""`EngineConfig`: the knobs of one engine (model, dtype, device, KV cache budget, batch limits)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.engine.kv_cache import parse_memory_size

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # HF folder or .gguf file; None: the embedded SmolLM2-135M-Instruct
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16; auto is bf16 (on this CPU 3-5x faster than fp32)
    device: str | None = None  # cpu | cuda; None: cuda when present
    page_size: int = 16  # tokens per KV page
    kv_cache_memory: str | int = "1GiB"  # bytes for the KV cache; the page count follows from it
    max_num_seqs: int = 64  # requests in the running batch at once
    max_num_batched_tokens: int = 1024  # tokens per forward pass; longer prompts are prefilled in chunks
    max_model_len: int | None = None  # prompt + output limit; None: the model's (capped by the KV cache)

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("page_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        parse_memory_size(self.kv_cache_memory)  # fail at start-up, not after loading the weights
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def kv_cache_bytes(self) -> int:
        return parse_memory_size(self.kv_cache_memory)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES["bf16" if self.dtype == "auto" else self.dtype]
