"""How much a quantized mode (of the weights, or of the KV cache: `--kv-dtype`) changes a model's predictions:
top-1 agreement and perplexity against the model's own weights in fp32 with an fp32 cache, over a fixed English
text scored in one pass (what `benchmarks/quality.py` prints, and what the tests hold the embedded model to);
and whether the engine's fp32 greedy tokens are transformers' on a real model's weights."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

REFERENCE_TEXT = (
    "The Amazon rainforest covers much of the Amazon basin of South America. This basin encompasses seven "
    "million square kilometres, of which five and a half million are covered by the rainforest. The region "
    "includes territory belonging to nine nations and 3,344 formally acknowledged indigenous territories. "
    "The majority of the forest is contained within Brazil, with 60% of the rainforest, followed by Peru with "
    "13%, Colombia with 10%, and with minor amounts in Bolivia, Ecuador, French Guiana, Guyana, Suriname, and "
    "Venezuela. The rainforest likely formed during the Eocene era, following the extinction event which wiped "
    "out the dinosaurs. It appeared following a global reduction of tropical temperatures when the Atlantic "
    "Ocean had widened sufficiently to provide a warm, moist climate to the Amazon basin."
)


@dataclass(frozen=True)
class Quality:
    mode: str
    tokens: int
    agreement: float  # share of positions whose most likely next token is the fp32 weights' one
    perplexity: float
    reference_perplexity: float  # of the fp32 weights, on the same text
    kv_bytes_per_token: float  # what a token's KV takes in the cache and on the link between workers

    @property
    def perplexity_change(self) -> float:
        return self.perplexity / self.reference_perplexity - 1


@contextlib.contextmanager
def every_row_quantized() -> Iterator[None]:
    """Every row of a pass through the quantized kernels, as decode steps run (a long prefill's rows would take
    the fp32 weights that the weight-only int8 mode keeps), so that one scoring pass measures what decoding
    sees."""
    from splitserve.kernels import cpu_quant

    saved = cpu_quant.KERNEL_MAX_ROWS
    cpu_quant.KERNEL_MAX_ROWS = 10**9
    try:
        yield
    finally:
        cpu_quant.KERNEL_MAX_ROWS = saved


# Weight modes whose kernels do not run on the CPU, measured with the weights rounded as those kernels see them.
ROUNDED_ON_THE_CPU = ("fp8",)


def engine_options(mode: str) -> dict[str, str]:
    """A mode's engine options: a weight quantization (`w8a8`, ...), `kv-fp16` / `kv-bf16` / `kv-int8` (the KV cache
    stored so, under fp32 weights), or one of each joined by `+` (`w8a8+kv-fp16`); `none` is the reference. `fp8`
    (a CUDA mode) is fp32 here, its weights rounded afterwards (`compare`)."""
    options = {"quantization": "none", "kv_dtype": "fp32"}
    for part in mode.split("+"):
        if part not in ROUNDED_ON_THE_CPU:
            options["kv_dtype" if part.startswith("kv-") else "quantization"] = part.removeprefix("kv-")
    return options


def compare(model: str | None, modes: list[str], text: str = REFERENCE_TEXT) -> list[Quality]:
    """Each mode of `model` (None: the embedded default; modes as `engine_options` reads them) against its fp32
    weights with an fp32 KV cache."""
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.core import EngineCore
    from splitserve.engine.kv_cache import page_bytes
    from splitserve.model.checkpoint import resolve_model
    from splitserve.model.tokenizer import load_tokenizer

    ids = load_tokenizer(resolve_model(model))(text).input_ids
    target = torch.tensor(ids[1:])
    kv_bytes = {}

    def scored(mode: str) -> torch.Tensor:
        with every_row_quantized():
            config = EngineConfig(model=model, dtype="fp32", kv_cache_memory="64MiB", **engine_options(mode))
            core = EngineCore(config)
            if "fp8" in mode.split("+"):
                from splitserve.kernels import fp8

                fp8.round_weights(core.runner.model.model.layers)
            kv_bytes[mode] = page_bytes(core.model_config, config.page_size, config.torch_kv_dtype) / config.page_size
            return core.score(ids)[:-1]

    def perplexity(logits: torch.Tensor) -> float:
        return math.exp(torch.nn.functional.cross_entropy(logits, target).item())

    reference = scored("none")
    results = []
    for mode in modes:
        logits = scored(mode)
        agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        results.append(Quality(mode, len(ids), agreement, perplexity(logits), perplexity(reference), kv_bytes[mode]))
    return results


GREEDY_PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,")


def greedy_matches(model: str | None, max_tokens: int = 24) -> list[tuple[str, bool, str]]:
    """For each of `GREEDY_PROMPTS`: (prompt, whether the engine's fp32 greedy tokens, the prompts batched
    together, equal transformers' `generate` on the same weights, the engine's text)."""
    from transformers import AutoModelForCausalLM

    from splitserve.engine.params import SamplingParams
    from splitserve.llm import LLM
    from splitserve.model.checkpoint import resolve_model
    from splitserve.model.tokenizer import load_tokenizer

    folder = resolve_model(model)
    tokenizer = load_tokenizer(folder)
    prompts = [tokenizer(p).input_ids for p in GREEDY_PROMPTS]
    llm = LLM(model, dtype="fp32", quantization="none", kv_cache_memory="64MiB")
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    ours = [out.token_ids for out in llm.generate(prompts, params, use_tqdm=False)]
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    results = []
    for prompt, ids, got in zip(GREEDY_PROMPTS, prompts, ours, strict=True):
        with torch.inference_mode():
            x = torch.tensor([ids])
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                              min_new_tokens=max_tokens, do_sample=False)  # fmt: skip
        results.append((prompt, got == out[0, len(ids) :].tolist(), tokenizer.decode(got)))
    return results
