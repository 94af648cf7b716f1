"""`EngineConfig`: the knobs of one engine (model, dtype, device, KV cache budget, batch limits), each also a
command-line option (`splitserve.options`). Importing this module does not import torch (the CLI's parser
imports it)."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from splitserve.options import option

if TYPE_CHECKING:
    import torch

DTYPES = ("fp32", "bf16", "fp16")
METHODS = ("off", "ngram", "suffix", "draft")  # --speculative (engine/speculative.py)
KV_DTYPES = (*DTYPES, "int8")  # int8: symmetric, a scale per page and head (kernels/kv_format.py)
# The CPU's quantized modes: (weight bits, activation bits); 32-bit activations: fp32, weight-only.
CPU_QUANTIZATIONS = {"int8": (8, 32), "w8a8": (8, 8), "w8a7": (8, 7), "w4a8": (4, 8)}
QUANTIZATIONS = ("auto", "none", *CPU_QUANTIZATIONS, "fp8")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = option(
        None,
        "a Hugging Face model folder (config.json + *.safetensors + tokenizer) or a .gguf file; default: the "
        "embedded SmolLM2-135M-Instruct",
        type=str,
    )
    dtype: str = option(
        "auto",
        "weights and KV cache dtype; auto = bf16 on CUDA; on the CPU fp32 activations with quantized weights where "
        "the native kernels build (see --quantization), else bf16 where the CPU has native bf16 instructions "
        "(AVX512-BF16/AMX, Arm BF16), else fp32; fp32 alone (with --quantization none) for exact comparisons with "
        "transformers (default {default})",
        choices=("auto", *DTYPES),
    )
    kv_dtype: str = option(
        "auto",
        "KV cache dtype, as stored and as moved between workers (the pools must agree): auto = --dtype; fp16 or "
        "bf16 under fp32 weights halve the bytes a token's KV takes in --kv-cache-memory and on the link, int8 "
        "(a scale per page and head) takes a quarter and a little; attention reads the pages as they are "
        "stored (default {default})",
        choices=("auto", *KV_DTYPES),
    )
    device: str | None = option(None, "default: cuda when present, else cpu", choices=("cpu", "cuda"), type=str)
    tensor_parallel: int = option(
        1,
        "processes (ranks) this engine's model is split across, Megatron-style: each holds 1/N of the heads, the "
        "MLPs and the vocabulary, and a KV cache of its heads (--kv-cache-memory is each rank's); gloo on the CPU, "
        "NCCL on CUDA (one device per rank); for a colocated worker or LLM() for now: KV between prefill and "
        "decode pools of several ranks is not done yet (default {default})",
    )
    page_size: int = option(16, "tokens per KV page (default {default})")
    kv_cache_memory: str | int = option(
        "1GiB", "memory for the paged KV cache, e.g. 512MiB or 2GiB; sets the page count (default {default})"
    )
    gpu_memory_fraction: float | None = option(
        None,
        "on CUDA: the share of the device's memory this worker may take (weights, KV cache, activations), for "
        "several workers on one GPU (1P+1D: e.g. 0.45 each); the KV cache then gets what the share leaves after "
        "the weights and a reserve for activations, instead of --kv-cache-memory (default: no limit)",
        type=float,
    )
    max_num_seqs: int = option(64, "largest running batch (default {default})")
    max_num_batched_tokens: int = option(
        1024, "tokens per forward pass; longer prompts are prefilled in chunks (default {default})"
    )
    max_model_len: int | None = option(None, "prompt + output limit (default: the model's)", type=int)
    quantization: str = option(
        "auto",
        "CPU modes, with --dtype fp32 or auto: int8 = int8 weights for decode steps (prefills keep the fp32 "
        "weights); w8a8 = int8 weights per channel with int8 activations per block of 32, for every step; w8a7 = "
        "7-bit activations (faster at 16+ rows, coarser); w4a8 = 4-bit weights with a scale and a minimum per block "
        "of 32 (llama.cpp's Q4_1) and int8 activations, for every step: a 4-bit GGUF file's own weights (Q4_0, "
        "Q4_1, Q4_K), the fastest; auto = with --dtype auto on the CPU where the kernels build, w4a8 for a 4-bit "
        "GGUF model and w8a8 for every other checkpoint (README: 'Modes'), else none; none = weights as loaded "
        "(exactness tests); fp8 = on CUDA devices of compute capability 8.9+ (Ada, Hopper), the decoder's weights "
        "in float8_e4m3 with a scale per output channel (default {default})",
        choices=QUANTIZATIONS,
    )
    prefix_caching: bool = option(
        True,
        "compute every prompt in full; by default the KV pages of a prefix computed before (a system prompt, a "
        "conversation's earlier turns) are reused",
    )
    enforce_eager: bool = option(
        False,
        "run every step layer by layer in Python: no fused native decode step on the CPU, no CUDA graphs on a GPU "
        "(for comparison and debugging; the tokens are the same)",
    )
    cache_ttl_s: float = option(
        300.0,
        "seconds a conversation's KV is kept after each turn for its next one (requests with prompt_cache_key or "
        "user); it gives way earlier when pages run short (default {default:g}; 0 keeps nothing)",
        flag="--cache-ttl",
    )
    kv_offload_memory: str | int = option(
        "0",
        "host memory for a second KV tier: cached pages (conversations kept between turns, shared prefixes) that "
        "the cache overwrites for new work are copied here, and back when a prompt continues them, instead of "
        "being computed again; e.g. 4GiB (default {default}: off)",
    )
    kv_offload_dir: str | None = option(
        None, "a folder for a third KV tier: pages the offload memory has no room for go to files here", type=str
    )
    kv_offload_size: str | int = option("8GiB", "disk space the --kv-offload-dir tier may use (default {default})")
    speculative: str = option(
        "off",
        "speculative decoding on the decode side: ngram = each request proposes the tokens that followed the "
        "latest earlier occurrence of its last few tokens in its prompt and output (code edits, quotes, RAG "
        "answers, repeated tool calls), and a step verifies them at once; suffix = also in what this worker "
        "generated earlier for the same prompt_cache_key; draft = a small model with the same vocabulary "
        "(--draft-model) proposes them; the tokens are those of a run without speculation "
        "(README 'Speculative decoding') (default {default})",
        choices=METHODS,
    )
    draft_model: str | None = option(
        None, "the draft model of --speculative draft: a folder or GGUF file with the target's vocabulary", type=str
    )
    num_speculative_tokens: int = option(
        8, "tokens a request proposes per step at most (default {default}: benchmarks/speculative.py)"
    )
    ngram_max: int = option(4, "longest n-gram matched to find a proposal (default {default})")
    ngram_min: int = option(2, "shortest n-gram matched (default {default})")
    speculative_max_batch: int = option(
        2,
        "steps with more decoding requests than this do not speculate; past 2, only requests whose recent drafts "
        "were mostly kept do (default {default}: on 2 CPU cores, chat at 4 streams lost 11% with speculation; "
        "benchmarks/speculative.py --batch-sweep)",
    )

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("page_size", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for size in (self.kv_cache_memory, self.kv_offload_memory, self.kv_offload_size):
            parse_memory_size(size)  # fail at start-up, not after loading the weights
        if self.kv_dtype != "auto" and self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be auto or one of {', '.join(KV_DTYPES)}, got {self.kv_dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        cpu_only = self.quantization in CPU_QUANTIZATIONS
        if cpu_only and (self.torch_device.type != "cpu" or self.resolved_dtype != "fp32"):
            raise ValueError(f"--quantization {self.quantization} is for the CPU, with fp32 (--dtype fp32 or auto)")
        if self.quantization == "fp8":
            from splitserve.kernels import fp8

            why = fp8.unsupported(self.torch_device)
            if why is not None:
                raise ValueError(f"--quantization fp8: {why}")
        if self.gpu_memory_fraction is not None:
            if not 0 < self.gpu_memory_fraction <= 1:
                raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}")
            if self.torch_device.type != "cuda":
                raise ValueError(f"--gpu-memory-fraction is for CUDA devices, not {self.torch_device}")
            if self.speculative == "draft":
                raise ValueError("--gpu-memory-fraction with --speculative draft: give --kv-cache-memory instead")
        if self.cache_ttl_s < 0:
            raise ValueError(f"cache_ttl_s must be >= 0, got {self.cache_ttl_s}")
        if self.speculative not in METHODS:
            raise ValueError(f"speculative must be one of {', '.join(METHODS)}, got {self.speculative!r}")
        if (self.speculative == "draft") != (self.draft_model is not None):
            raise ValueError("--speculative draft and --draft-model go together")
        if self.tensor_parallel > 1 and (parse_memory_size(self.kv_offload_memory) or self.kv_offload_dir):
            raise ValueError(
                "--kv-offload-memory/--kv-offload-dir with --tensor-parallel: the offload tier copies "
                "rank 0's pages only (not yet per rank)"
            )
        if self.tensor_parallel > 1 and self.speculative == "draft":
            raise ValueError("--speculative draft with --tensor-parallel: the draft model runs on one rank (not yet)")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min} and {self.ngram_max}")
        for name in ("num_speculative_tokens", "speculative_max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")

    @property
    def torch_device(self) -> torch.device:
        import torch

        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def kv_cache_bytes(self) -> int:
        return parse_memory_size(self.kv_cache_memory)

    @property
    def resolved_dtype(self) -> str:
        """The dtype `auto` stands for on this machine (see `fast_dtype`), or the one asked for."""
        if self.dtype != "auto":
            return self.dtype
        return fast_dtype(self.torch_device, quantized=self.quantization != "none")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.resolved_dtype)

    @property
    def resolved_kv_dtype(self) -> str:
        return self.resolved_dtype if self.kv_dtype == "auto" else self.kv_dtype

    @property
    def torch_kv_dtype(self) -> torch.dtype:
        return torch_dtype(self.resolved_kv_dtype)

    @property
    def resolved_quantization(self) -> str:
        """`auto`, with `--dtype auto` on the CPU where the native kernels build: w4a8 for a GGUF model whose
        layers are 4-bit (Q4_0, Q4_1, Q4_K: its own weights), w8a8 for every other checkpoint (`auto_mode`). An
        explicit `--dtype` keeps its weights exact."""
        if self.quantization != "auto":
            return self.quantization
        from splitserve.kernels import cpu_quant

        if self.dtype != "auto" or self.torch_device.type != "cpu" or not cpu_quant.available():
            return "none"
        return auto_mode(self.model)[0]

    def describe_dtype(self) -> str:
        """e.g. `fp32, w4a8 weights (auto: a GGUF file of Q4_1 layers, 4-bit as stored; native kernels with
        AVX512-VNNI)`, for start-up messages: what runs, and why."""
        text = self.resolved_dtype + (" (auto)" if self.dtype == "auto" and self.quantization == "none" else "")
        quantization = self.resolved_quantization
        if quantization != "none":
            text += f", {quantization} weights"
            if self.quantization == "auto":
                from splitserve.kernels import cpu_kernels

                text += f" (auto: {auto_mode(self.model)[1]}; native kernels with {cpu_kernels.instructions()})"
        elif self.dtype == "auto" and self.torch_device.type == "cpu" and self.quantization == "auto":
            text += " (no native kernels here: " + ("native bf16" if self.resolved_dtype == "bf16" else "fp32") + ")"
        if self.resolved_kv_dtype != self.resolved_dtype:
            text += f", {self.resolved_kv_dtype} KV cache"
        return text


# What `--quantization auto` runs each GGUF tensor type's model in, on the CPU (README: 'Modes'; a test per row):
# 4-bit files keep their 4-bit weights (the kernel's Q4_1 blocks hold Q4_0's and Q4_K's exactly, `cpu_quant.
# quantize4`); every wider type becomes int8 weights per channel (as safetensors checkpoints of any dtype do).
GGUF_MODES = {"Q4_0": "w4a8", "Q4_1": "w4a8", "Q4_K": "w4a8", "Q5_0": "w8a8", "Q5_1": "w8a8", "Q5_K": "w8a8",
              "Q6_K": "w8a8", "Q8_0": "w8a8", "F16": "w8a8", "BF16": "w8a8", "F32": "w8a8"}  # fmt: skip


def auto_mode(model: str | None) -> tuple[str, str]:
    """The quantized mode `auto` picks for `model` on the CPU, and why: w4a8 for a GGUF file with 4-bit decoder
    layers (a Q4_K_M file's few wider matrices, Q6_K or Q5_0, keep 8 bits: `CausalLM.quantize(keep_wider=...)`),
    w8a8 for anything else."""
    from splitserve.model.checkpoint import gguf_layer_types

    types = gguf_layer_types(model)
    if types is None:
        return "w8a8", "a safetensors checkpoint runs int8 weights"
    kinds = "/".join(types)
    if all(GGUF_MODES.get(t) == "w4a8" for t in types):
        return "w4a8", f"a GGUF file of {kinds} layers runs 4-bit weights"
    if any(GGUF_MODES.get(t) == "w4a8" for t in types):
        return "w4a8", f"a GGUF file of {kinds} layers runs 4-bit weights, int8 for its wider matrices"
    return "w8a8", f"a GGUF file of {kinds} layers runs int8 weights"


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of one of `KV_DTYPES`."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}[name]


def parse_memory_size(text: str | int) -> int:
    """'2GiB', '512MiB', '1.5GB' or a plain byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (examples: 2GiB, 512MiB, 1.5GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def fast_dtype(device: torch.device, quantized: bool = True) -> str:
    """What `--dtype auto` runs: bf16 on CUDA. On the CPU fp32 where the native quantized kernels build and
    quantization is not off (`quantized`): their activations are fp32, their weights 4 or 8 bits, the fastest
    path on every CPU measured. Else bf16 on CPUs with native bf16 matrix instructions (AVX512-BF16 or AMX on x86,
    the BF16 extension on Arm), fp32 elsewhere (emulated bf16 is hundreds of times slower than fp32)."""
    if device.type == "cuda":
        return "bf16"
    if quantized:
        from splitserve.kernels import cpu_quant

        if cpu_quant.available():
            return "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


@functools.cache
def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no way to tell cheaply; fp32 is never the slow choice
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16", "bf16"))
