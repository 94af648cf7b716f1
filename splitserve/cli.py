"""The `splitserve` command line: one entry point, a subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from splitserve.engine.config import DTYPES, EngineConfig
from splitserve.errors import SplitserveError


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    p.add_argument(
        "--model",
        default=None,
        help="a Hugging Face model folder (config.json + *.safetensors + tokenizer) or a .gguf file; "
        "default: the embedded SmolLM2-135M-Instruct",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default=d.dtype,
        help="weights and KV cache dtype; auto = bf16 (fastest on CPU); fp32 for exact comparisons",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present, else cpu")
    p.add_argument(
        "--kv-cache-memory",
        default=d.kv_cache_memory,
        help=f"memory for the paged KV cache, e.g. 512MiB or 2GiB; sets the page count (default {d.kv_cache_memory})",
    )
    p.add_argument("--page-size", type=int, default=d.page_size, help=f"tokens per KV page (default {d.page_size})")
    p.add_argument(
        "--max-num-seqs", type=int, default=d.max_num_seqs, help=f"largest running batch (default {d.max_num_seqs})"
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=d.max_num_batched_tokens,
        help=f"tokens per forward pass; longer prompts are prefilled in chunks (default {d.max_num_batched_tokens})",
    )
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + output limit (default: the model's)")


def _engine_config(args: argparse.Namespace) -> dict:
    return {
        "dtype": args.dtype,
        "device": args.device,
        "kv_cache_memory": args.kv_cache_memory,
        "page_size": args.page_size,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_model_len": args.max_model_len,
    }


def _generate(args: argparse.Namespace) -> int:
    from splitserve.engine.sampling import SamplingParams
    from splitserve.llm import LLM

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )
    started = time.monotonic()
    llm = LLM(args.model, **_engine_config(args))
    loaded = time.monotonic()
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    for text in llm.stream(prompt, params):  # print the completion as it is generated
        print(text, end="", flush=True)
    print()
    logging.getLogger("splitserve").info(
        "loaded in %.1fs; generated in %.2fs", loaded - started, time.monotonic() - loaded
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description="Disaggregated prefill/decode LLM serving.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log timings and progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        help="generate a completion for one prompt in this process and print it",
        description="Generate a completion for one prompt with the continuous-batching engine and print its text.",
    )
    gen.add_argument("--prompt", required=True, help="the prompt text (with --chat: the user's message)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default 0)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1)")
    gen.add_argument("--top-k", type=int, default=-1, help="sample among the k most likely tokens; -1 = all")
    gen.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    _add_engine_args(gen)
    gen.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (SplitserveError, ValueError) as e:
        print(f"splitserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
