"""The GPU check (run by `scripts/gpu_check.sh`): on one CUDA GPU, in about 8 minutes and with no network,

1. the kernel tests natively (`tests/test_kernels.py`, TRITON_INTERPRET=0);
2. the engine's greedy tokens against transformers' on two tiny shapes (fp32; captured and eager steps), and
   through the tensor-parallel path (`tp`: 2 ranks over NCCL with 2+ GPUs, else a NCCL group of one);
3. Triton decode attention against SDPA on the same K/V (`benchmarks/attention_kernels.py`'s cases: 32/8 heads, head_dim
   128, bf16, batch 1-128, context 512-8k): GB/s as a share of HBM peak, and the ratio to SDPA;
4. one decode step per token of Llama shapes with random bf16 weights (135M, 1B, 8B), eager and captured, at
   batch 1 and 64 (8B also 256), next to the floor of reading the weights once at the device's copy
   bandwidth measured in the same run;
5. KV transfer GB/s between two processes on the GPU (UCX, pages on the device, as `benchmarks/kv_transfer.py
   --device cuda`);
6. `--quantization fp8` (compute capability 8.9+): the 8B shape's captured decode step at batch 1 and 256 with
   the decoder's weights in fp8, against the bf16 step the decode section timed in the same run;
7. the whole serving path (`serve`): the 8B shape colocated, then 1P+1D on the one GPU (two worker processes,
   `--gpu-memory-fraction 0.45` each), `splitserve bench` at two request rates with 1k-token prompts and
   128-token answers (TTFT and TPOT p50 / p90, goodput at the SLO it prints), KV bytes and seconds per
   transfer from `/metrics`, and `splitserve plan --quick` on the same checkpoint; `--dry-run` runs this section
   on the CPU with a tiny checkpoint;
8. prefill of 1k, 4k and 8k-token prompts at 8B (TTFT, tokens/s, share of the bf16 peak), an 8k prompt in 2k
   chunks against one pass, and the Triton prefill attention against SDPA on 4k tokens;
9. speculative decoding at 1B and 8B, batch 1: the captured verification step of 8 drafted tokens (9 rows, a
   graph of its own) against the plain step, as ms per token at an acceptance that is injected (random weights
   keep no draft: each step verifies a forced draft, and the share kept is assumed, and said).

It prints one table (and writes it to `--out`), and exits 1 when a check fails (a test, a token mismatch, a
capture that fell back to eager). Speed targets are reported as met or missed, not as failures.
`--dry-run` needs no GPU: it checks that everything the run needs imports and is where it should be, builds
the tiny checkpoints and the large shapes' configurations, and prints the plan.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

SHAPES = {  # Llama layouts: SmolLM2-135M, Llama-3.2-1B, Llama-3-8B
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}  # fmt: skip
# Greedy tokens against transformers' (tests/checkpoints.py; head dims of 16 and 32, as the Triton kernels take):
# q/k/v bias, Llama-3 rope scaling with untied embeddings, and a mixture of experts with per-head q/k norms (its
# captured step runs every expert densely).
EXACT_MODELS = ("tiny_qwen2", "tiny_llama_untied", "tiny_qwen3_moe")
TARGET_MS = {"135m": 0.5, "1b": 1.0, "8b": 4.3}  # per token at batch 1, captured
TARGET_8B_256 = 14_000  # output tok/s at 256 concurrent
TARGET_KV_GBPS = 200
TARGET_ATTENTION = (0.5, 1.0)  # share of HBM peak at batch 1 and 8k context; worst ratio to SDPA
TARGET_FP8 = (2.6, 1.3)  # 8B with fp8 weights: ms per token at batch 1; throughput at 256 over bf16's
TARGET_PREFILL = (105.0, 0.6, 0.9, 0.1)  # 8B 4k prompt: TTFT ms, share of bf16 peak; attention vs SDPA; chunking
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 tensor-core peaks (SXM)
# The serving section: prompts and answers, request rates, requests per rate, and the SLO goodput is judged at
SERVE_LENGTHS, SERVE_RATES, SERVE_REQUESTS, SERVE_SLO = (1024, 128), (2.0, 8.0), 48, "ttft=0.5,tpot=0.05"
PROMPT_TOKENS, TIMED_STEPS = 128, 32
# Seconds each section may take before it is stopped and reported as failed, so that one hang (a transfer that
# never completes, say) cannot take the whole lease: the device time is short (about 8 minutes for the lot).
SECTION_LIMIT_S = {"kernels": 200, "exact": 120, "tp": 60, "attention": 90, "kv": 90, "prefill": 120, "spec": 150,
                   "decode": 300, "fp8": 150, "serve": 420}  # fmt: skip
SPEC_TOKENS, SPEC_ACCEPTANCE = 8, (0.5, 0.8)  # drafted tokens a step; shares of them kept, injected
# The decode section's captured bf16 steps (shape, batch) -> ms, for the fp8 section's ratios in the same run.
BF16_STEP_MS: dict[tuple[str, int], float] = {}


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []
        self.failed = False

    def add(self, check: str, value: str, target: str = "", status: str = "ok") -> None:
        self.rows.append((check, value, target, status))
        self.failed |= status == "FAIL"
        print(f"  {check}: {value} {target} [{status}]", flush=True)

    def render(self) -> str:
        widths = [max(len(r[i]) for r in [("check", "value", "target", "status"), *self.rows]) for i in range(4)]
        lines = [("check", "value", "target", "status"), tuple("-" * w for w in widths), *self.rows]
        return "\n".join(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in lines)


def kernel_tests(table: Table) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    tests = ["tests/test_kernels.py", "tests/test_fp8.py"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                         cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=SECTION_LIMIT_S["kernels"] - 10)  # fmt: skip
    tail = (run.stdout.strip().splitlines() or ["no output"])[-1]
    table.add("kernel tests (native)", tail, "all pass", "ok" if run.returncode == 0 else "FAIL")
    if run.returncode:
        print(run.stdout[-4000:], run.stderr[-2000:], sep="\n")


def exactness(table: Table, workdir: Path) -> None:
    from splitserve.decode.engine import DecodeEngine
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.params import SamplingParams
    from tests import checkpoints
    from tests.helpers import hf_greedy, run_staggered

    for name in EXACT_MODELS:
        folder = getattr(checkpoints, name)(workdir / name)
        rng = random.Random(0)
        prompts = [[rng.randrange(8, 384) for _ in range(n)] for n in (1, 3, 7, 12, 17, 25, 33, 48, 64)]
        max_tokens = [rng.randrange(6, 24) for _ in prompts]
        expected = hf_greedy(folder, prompts, max_tokens)
        for eager in (False, True):
            engine = DecodeEngine(EngineConfig(model=str(folder), dtype="fp32", device="cuda", page_size=16,
                                         max_num_seqs=16, enforce_eager=eager))  # fmt: skip
            captured = engine.runner.decode_graphs is not None
            params = [SamplingParams(max_tokens=n, temperature=0) for n in max_tokens]
            ours, _ = run_staggered(engine, prompts, params, [0, 0, 1, 3, 4, 6, 9, 12, 15])
            same = sum(a == b for a, b in zip(ours, expected, strict=True))
            ok = same == len(prompts) and captured != eager
            mode = "eager" if eager else "captured" if captured else "capture FAILED"
            table.add(f"greedy = transformers, {name}, {mode}", f"{same}/{len(prompts)} prompts", "all", _ok(ok))
            del engine


def tensor_parallel(table: Table, workdir: Path, device: str = "cuda") -> None:
    """The tensor-parallel path (issue 40) on the device: with 2+ GPUs, 2 ranks over NCCL; with one, the one rank's
    collectives through a NCCL group of one (a rank needs a device of its own). Greedy tokens against
    transformers'. The dry run takes the same path on the CPU with gloo."""
    import torch.distributed as dist

    from splitserve.decode.engine import DecodeEngine
    from splitserve.engine import tensor_parallel as ranks
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.params import SamplingParams
    from tests import checkpoints
    from tests.helpers import hf_greedy, run_staggered

    folder = checkpoints.tiny_llama_gqa(workdir / "tp_llama")
    rng = random.Random(0)
    prompts = [[rng.randrange(8, 384) for _ in range(n)] for n in (1, 3, 7, 12, 17, 25, 33, 48, 64)]
    max_tokens = [rng.randrange(6, 24) for _ in prompts]
    width = 2 if device == "cuda" and torch.cuda.device_count() >= 2 else 1
    engine = DecodeEngine(EngineConfig(model=str(folder), dtype="fp32", device=device, page_size=16,
                                       tensor_parallel=width, enforce_eager=True))  # fmt: skip
    try:
        if width == 1:  # the model's all-reduces and the LM head's gather through a real group of one
            store = dist.TCPStore("127.0.0.1", 0, 1, True)
            collectives = ranks.connect(store, 0, 1, torch.device(device)).collectives
            object.__setattr__(engine.runner.tp, "collectives", collectives)
        params = [SamplingParams(max_tokens=n, temperature=0) for n in max_tokens]
        ours, _ = run_staggered(engine, prompts, params, [0, 0, 1, 3, 4, 6, 9, 12, 15])
        same = sum(a == b for a, b in zip(ours, hf_greedy(folder, prompts, max_tokens), strict=True))
        backend = "NCCL" if device == "cuda" else "gloo"
        table.add(f"greedy = transformers, {width} rank(s) over {backend}", f"{same}/{len(prompts)} prompts", "all",
                  _ok(same == len(prompts)))  # fmt: skip
    finally:
        engine.runner.close()


def copy_bandwidth() -> float:
    """Bytes read + written per second by a device-to-device copy of 1 GiB (the best of 10)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * src.numel() / min(times)


def random_checkpoint(shape: str, folder: Path) -> Path:
    cfg = LlamaConfig(max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
                      initializer_range=0.02, **SHAPES[shape])  # fmt: skip
    if not folder.exists():
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
        model.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)
        del model
        torch.cuda.empty_cache()
    return folder


def decode_step_ms(engine, batch: int, rows: int | None = None) -> tuple[float, float | None]:
    """ms per decode step of `batch` requests 128 tokens into their prompts (the best of two timings), and ms
    of its graph (of `rows` rows: `batch`, or more with drafted tokens) replayed alone (None when eager)."""
    from splitserve.engine.params import SamplingParams
    from splitserve.engine.request import EngineRequest

    params = SamplingParams(max_tokens=4 * TIMED_STEPS + 8, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(EngineRequest(f"r{i}", [(7 * i + j) % 1000 + 10 for j in range(PROMPT_TOKENS)], params))
    while any(r.num_computed_tokens < PROMPT_TOKENS for r in engine._requests.values()):
        engine.step()
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        for _ in range(TIMED_STEPS):
            engine.step()
        best = min(best, (time.perf_counter() - start) / TIMED_STEPS * 1000)
    replay = graph_replay_ms(engine, rows or batch)
    for i in range(batch):
        engine.abort(f"r{i}")
    return best, replay


def graph_replay_ms(engine, batch: int) -> float | None:
    """ms of the step's captured graph replayed back to back on the last step's inputs (rewriting the same K/V
    slots): the GPU's share of a step; the rest of a step is the host's (scheduling, inputs, the read-back)."""
    graphs = engine.runner.decode_graphs
    if graphs is None:
        return None
    graph = graphs._graphs[next(b for b in graphs.buckets if b >= batch), False]
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(TIMED_STEPS):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / TIMED_STEPS * 1000


def decode_speed(table: Table, workdir: Path) -> None:
    from splitserve.decode.engine import DecodeEngine
    from splitserve.engine.config import EngineConfig

    bandwidth = copy_bandwidth()
    table.add("device copy bandwidth (read + write)", f"{bandwidth / 1e12:.2f} TB/s")
    for shape in SHAPES:
        batches = [1, 64, 256] if shape == "8b" else [1, 64]
        folder = random_checkpoint(shape, workdir / shape)
        engine = DecodeEngine(EngineConfig(model=str(folder), device="cuda", max_num_seqs=max(batches),
                                     max_num_batched_tokens=8192, kv_cache_memory="24GiB"))  # fmt: skip
        weights = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
        floor = weights / bandwidth * 1000
        graphs = engine.runner.decode_graphs
        table.add(f"{shape}: weights {weights / 1e9:.2f} GB", f"floor {floor:.3f} ms per step", "",
                  "ok" if graphs is not None else "FAIL (capture fell back to eager)")  # fmt: skip
        for batch in batches:
            for mode in ("eager", "captured"):
                engine.runner.decode_graphs = graphs if mode == "captured" else None
                ms, replay = decode_step_ms(engine, batch)
                tok_s = batch / ms * 1000
                target, status = "", "ok"
                if mode == "captured" and batch == 1:
                    target, status = f"<= {TARGET_MS[shape]} ms", "met" if ms <= TARGET_MS[shape] else "missed"
                if mode == "captured" and shape == "8b" and batch == 256:
                    target, status = f">= {TARGET_8B_256} tok/s", "met" if tok_s >= TARGET_8B_256 else "missed"
                if mode == "captured":
                    BF16_STEP_MS[shape, batch] = ms
                figures = f"{ms:.2f} ms/step ({ms / floor:.1f}x floor), {tok_s:,.0f} tok/s"
                if replay is not None:
                    figures += f"; graph alone {replay:.2f} ms"
                table.add(f"{shape} decode, batch {batch}, {mode}", figures, target, status)
        engine.runner.decode_graphs = graphs
        del engine, graphs
        torch.cuda.empty_cache()


def prefill_speed(table: Table, workdir: Path) -> None:
    """TTFT of one prompt of 1k, 4k and 8k tokens at 8B in one pass (the best of two), its tokens/s and share of
    the device's bf16 peak; the 8k prompt in 2k-token chunks; the Triton prefill attention against SDPA."""
    from splitserve.decode.engine import DecodeEngine
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.params import SamplingParams
    from splitserve.engine.request import EngineRequest

    folder = random_checkpoint("8b", workdir / "8b")
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), 0.0)
    cfg = LlamaConfig(**SHAPES["8b"])
    h, kv_share = cfg.hidden_size, cfg.num_key_value_heads / cfg.num_attention_heads
    layers = cfg.num_hidden_layers * (2 * h * h * (1 + kv_share) + 3 * h * cfg.intermediate_size)  # matmul weights
    head_dim = cfg.hidden_size // cfg.num_attention_heads

    def flops(n: int) -> float:  # the layers' matmuls and causal attention (the LM head runs on one row)
        return 2 * n * layers + 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * n * (n + 1) / 2

    def ttft_ms(engine, n: int) -> float:
        best = float("inf")
        for attempt in range(2):
            prompt = [(7 * i + attempt) % 30000 + 10 for i in range(n)]
            engine.add_request(EngineRequest(f"p{n}-{attempt}", prompt, SamplingParams(max_tokens=1, temperature=0)))
            torch.cuda.synchronize()
            start = time.perf_counter()
            while engine.has_unfinished():
                engine.step()
            best = min(best, (time.perf_counter() - start) * 1000)
        return best

    whole = DecodeEngine(EngineConfig(model=str(folder), device="cuda", max_num_batched_tokens=8192,
                                      kv_cache_memory="8GiB", enforce_eager=True))  # fmt: skip
    one_pass = {}
    for n in (1024, 4096, 8192):
        ms = one_pass[n] = ttft_ms(whole, n)
        share = flops(n) / (ms / 1000) / (peak * 1e12) if peak else 0.0
        target, status = "", "ok"
        if n == 4096:
            target = f"<= {TARGET_PREFILL[0]:.0f} ms, >= {TARGET_PREFILL[1]:.0%} of peak"
            status = "met" if ms <= TARGET_PREFILL[0] and share >= TARGET_PREFILL[1] else "missed"
        table.add(f"8b prefill, {n} tokens", f"{ms:.1f} ms, {n / ms * 1000:,.0f} tok/s, {share:.0%} of {peak:.0f} "
                  "TFLOP/s", target, status)  # fmt: skip
    del whole
    torch.cuda.empty_cache()
    chunked = DecodeEngine(EngineConfig(model=str(folder), device="cuda", max_num_batched_tokens=2048,
                                        kv_cache_memory="8GiB", enforce_eager=True))  # fmt: skip
    ms = ttft_ms(chunked, 8192)
    slower = ms / one_pass[8192] - 1
    table.add("8b prefill, 8192 tokens in 2048-token chunks", f"{ms:.1f} ms ({slower:+.0%} against one pass)",
              f"<= +{TARGET_PREFILL[3]:.0%}", "met" if slower <= TARGET_PREFILL[3] else "missed")  # fmt: skip
    del chunked
    torch.cuda.empty_cache()
    shape = dict(heads=32, kv_heads=8, dim=128, page_size=16, dtype=torch.bfloat16, device=torch.device("cuda"))
    ours, sdpa = _benchmark("attention_kernels").prefill_case([4096], **shape)
    table.add("prefill attention, 4096 tokens", f"{ours:.0f} TFLOP/s, SDPA {sdpa:.0f} ({ours / sdpa:.2f}x)",
              f">= {TARGET_PREFILL[2]}x SDPA", "met" if ours / sdpa >= TARGET_PREFILL[2] else "missed")  # fmt: skip


def serving(table: Table, workdir: Path, dry_run: bool = False) -> None:
    """`serve` colocated and 1P+1D on one device, `splitserve bench` at two rates, KV per transfer from
    /metrics, and `plan --quick`: at 8B on the GPU, or (`dry_run`) a tiny model on the CPU."""
    from splitserve.bench.metrics import prometheus_total
    from splitserve.launcher import ServeProcess

    tokenizer = _tokenizer_folder()
    if tokenizer is None:
        table.add("serve", "not run: no tokenizer (.tokenizer/ or the embedded model's package)", "", "FAIL")
        return
    from tests import checkpoints

    if dry_run:
        folder = checkpoints.tiny_chat_llama(workdir / "tiny-served", tokenizer)
        (prompt, answer), rates, requests = (64, 8), (2.0, 8.0), 6
        engine = ["--device", "cpu", "--dtype", "fp32", "--kv-cache-memory", "64MiB"]
        setups = {"colocated": ["--prefill", "0", "--decode", "0", "--both", "1"], "1P+1D": []}
    else:
        folder = checkpoints.with_tokenizer(random_checkpoint("8b", workdir / "8b"), tokenizer)
        (prompt, answer), rates, requests = SERVE_LENGTHS, SERVE_RATES, SERVE_REQUESTS
        engine = ["--max-num-seqs", "64"]
        setups = {"colocated": ["--prefill", "0", "--decode", "0", "--both", "1", "--gpu-memory-fraction", "0.9"],
                  "1P+1D": ["--gpu-memory-fraction", "0.45"]}  # fmt: skip
    for setup, args in setups.items():
        workers = 1 if setup == "colocated" else 2
        server = ServeProcess(folder, [*args, *engine, "--fixed-roles"], workers, timeout=300)
        try:
            out = workdir / f"bench-{setup}.json"
            cmd = [sys.executable, "-m", "splitserve", "bench", "--url", server.url, "--tokenizer", str(folder),
                   "--num-requests", str(requests), "--input-len", f"fixed:{prompt}", "--output-len", f"fixed:{answer}",
                   "--rate", ",".join(f"{r:g}" for r in rates), "--slo", SERVE_SLO, "--output", str(out),
                   "--no-progress"]  # fmt: skip
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if run.returncode:
                table.add(f"serve {setup}: bench", run.stderr.strip()[-200:], "", "FAIL")
                continue
            result = json.loads(out.read_text())
            for r in result["runs"]:
                s = r["summary"]
                figures = (f"TTFT p50/p90 {1e3 * s['p50_ttft']:.0f}/{1e3 * s['p90_ttft']:.0f} ms, TPOT p50/p90 "
                           f"{1e3 * s['p50_tpot']:.1f}/{1e3 * s['p90_tpot']:.1f} ms, {s['output_throughput']:,.0f} "
                           f"tok/s, goodput {s['goodput']:.2f} req/s at {SERVE_SLO}")  # fmt: skip
                ok = s["completed"] == s["requests"]
                table.add(f"serve {setup}, {prompt}/{answer} tokens at {r['rate']:g} req/s", figures, "", _ok(ok))
            if setup == "1P+1D":
                metrics = server.http.get("/metrics").text
                moved = prometheus_total(metrics, "splitserve_kv_bytes_received_total")
                seconds = prometheus_total(metrics, "splitserve_kv_seconds_receiving_total")
                done = sum(r["summary"]["completed"] for r in result["runs"])
                per = f"{moved / done / 1e3:,.0f} KB in {1e3 * seconds / done:.1f} ms"
                rate = f"{moved / max(seconds, 1e-9) / 1e9:.2f} GB/s"
                table.add("serve 1P+1D: KV per transfer", f"{per} ({rate})", "", _ok(moved > 0))
        finally:
            server.stop()
    device = ["--device", "cpu", "--dtype", "fp32"] if dry_run else []
    cmd = [sys.executable, "-m", "splitserve", "plan", "--quick", "--model", str(folder), "--slo", SERVE_SLO,
           "--rate", f"{max(rates):g}",
           "--input-len", f"fixed:{prompt}", "--output-len", f"fixed:{answer}", *device]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    last = (run.stdout.strip().splitlines() or [run.stderr.strip()[-200:]])[-1]
    table.add("plan --quick", last[:160], "", _ok(run.returncode == 0))


def _tokenizer_folder() -> Path | None:
    """SmolLM2's tokenizer: brought along in `.tokenizer/` (../shared/gpu-kit), or the embedded model's."""
    if (ROOT / ".tokenizer" / "tokenizer.json").exists():
        return ROOT / ".tokenizer"
    try:
        from splitserve.model.checkpoint import resolve_model

        return resolve_model(None)
    except Exception:  # the embedded model's package is not installed here
        return None


def speculation_speed(table: Table, workdir: Path) -> None:
    """Batch 1 at the 1B and 8B shapes with `--speculative ngram`: ms per step with no draft, and with a forced
    draft of `SPEC_TOKENS` (the request's last tokens, verified in the captured graph of exactly their rows), and
    the ms per token that gives if a share of the drafted tokens were kept (injected: random weights keep none)."""
    from splitserve.decode.engine import DecodeEngine
    from splitserve.engine.config import EngineConfig

    k = SPEC_TOKENS
    for shape in ("1b", "8b"):
        folder = random_checkpoint(shape, workdir / shape)
        engine = DecodeEngine(EngineConfig(model=str(folder), device="cuda", speculative="ngram", max_num_seqs=4,
                                           num_speculative_tokens=k, kv_cache_memory="8GiB"))  # fmt: skip
        captured = engine.runner.decode_graphs is not None and k + 1 in engine.runner.decode_graphs.buckets
        engine.speculator.drafts = lambda decoding: {}
        plain, _ = decode_step_ms(engine, 1)
        engine.speculator.drafts = lambda decoding: {r.request_id: r.token_ids[-k:] for r in decoding}
        verify, replay = decode_step_ms(engine, 1, rows=k + 1)
        replayed = f"; graph alone {replay:.2f} ms" if replay is not None else ""
        table.add(f"{shape} verification step, {k} drafted (9 rows)",
                  f"{verify:.2f} ms against {plain:.2f} for one token ({verify / plain:.2f}x){replayed}", "",
                  _ok(captured))  # fmt: skip
        for share in SPEC_ACCEPTANCE:
            per_token = verify / (1 + share * k)
            table.add(f"{shape} speculative, batch 1, {share:.0%} of drafts kept (injected)",
                      f"{per_token:.2f} ms/token against {plain:.2f} without ({plain / per_token:.2f}x)")  # fmt: skip
        del engine
        torch.cuda.empty_cache()


def fp8_decode(table: Table, workdir: Path) -> None:
    """The 8B shape with `--quantization fp8`: captured decode steps at batch 1 and 256 (random weights)."""
    from splitserve.decode.engine import DecodeEngine
    from splitserve.engine.config import EngineConfig
    from splitserve.kernels import fp8

    why = fp8.unsupported(torch.device("cuda"))
    if why is not None:
        table.add("fp8", f"not run: {why}", "", "skipped")
        return
    folder = random_checkpoint("8b", workdir / "8b")
    engine = DecodeEngine(EngineConfig(model=str(folder), device="cuda", quantization="fp8", max_num_seqs=256,
                                       max_num_batched_tokens=8192, kv_cache_memory="24GiB"))  # fmt: skip
    weights = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    table.add("8b fp8: weights", f"{weights / 1e9:.2f} GB", "", _ok(engine.runner.decode_graphs is not None))
    for batch in (1, 256):
        ms, _ = decode_step_ms(engine, batch)
        bf16 = BF16_STEP_MS.get(("8b", batch))
        versus = f", {bf16 / ms:.2f}x bf16's throughput ({bf16:.2f} ms)" if bf16 else " (no bf16 step this run)"
        figures = f"{ms:.2f} ms/step, {batch / ms * 1000:,.0f} tok/s{versus}"
        if batch == 1:
            target, met = f"<= {TARGET_FP8[0]} ms", ms <= TARGET_FP8[0]
        else:
            target, met = f">= {TARGET_FP8[1]}x bf16", bf16 is not None and bf16 / ms >= TARGET_FP8[1]
        table.add(f"8b fp8 decode, batch {batch}, captured", figures, target, "met" if met else "missed")
    del engine
    torch.cuda.empty_cache()


def _benchmark(name: str):
    """benchmarks/NAME.py as a module (by its path: the folder stays off sys.path)."""
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", ROOT / f"benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def attention(table: Table) -> None:
    bench = _benchmark("attention_kernels")
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in bench.PEAK_GBPS.items() if k in name), 0.0)
    shape = dict(heads=32, kv_heads=8, dim=128, page_size=16, dtype=torch.bfloat16, device=torch.device("cuda"))
    ratios = {}
    for batch in (1, 8, 32, 128):
        for context in (512, 2048, 8192):
            ours, sdpa = bench.decode_case(batch, context, **shape)
            ratios[batch, context] = ours / sdpa
            table.add(f"decode attention, batch {batch}, context {context}",
                      f"{ours:,.0f} GB/s ({ours / peak:.0%} of {peak:.0f}), {ours / sdpa:.2f}x SDPA")  # fmt: skip
    share = bench.decode_case(1, 8192, **shape)[0] / peak
    table.add("decode attention at batch 1, 8k context", f"{share:.0%} of HBM peak", f">= {TARGET_ATTENTION[0]:.0%}",
              "met" if share >= TARGET_ATTENTION[0] else "missed")  # fmt: skip
    worst = min(ratios, key=ratios.get)
    table.add("decode attention, worst ratio to SDPA", f"{ratios[worst]:.2f}x at batch {worst[0]}, context {worst[1]}",
              f">= {TARGET_ATTENTION[1]}x", "met" if ratios[worst] >= TARGET_ATTENTION[1] else "missed")  # fmt: skip


def kv_transfer(table: Table) -> None:
    """KV between two processes on the device: UCX's tagged messages (its cuda_ipc transport), and the receiver
    copying the sender's pages itself through CUDA IPC handles exchanged once (what the agents do on one host)."""
    from splitserve.kv_transfer.testing import Peer

    bench = _benchmark("kv_transfer")
    rng = random.Random(0)
    best = 0.0
    for how, pulls, cases in (("UCX tagged", False, ((64, False), (512, False), (2048, False), (2048, True))),
                              ("CUDA IPC", True, ((64, False), (2048, False), (2048, True)))):  # fmt: skip
        sender = Peer("sender", bench.KEY, 2100, "auto", fill_seed=1, device="cuda", pulls=pulls)
        # A round's 4 reservations of up to 2,048 pages are disjoint (a page is filled by one transfer at a time).
        receiver = Peer("receiver", bench.KEY, 4 * 2048 + 64, "auto", fill_seed=None, device="cuda", pulls=pulls)
        try:
            bench.transfer_seconds(sender, receiver, 1, 3, rng)
            for n, consecutive in cases:
                bench.transfer_seconds(sender, receiver, n, 2, rng, consecutive)  # untimed: the steady state
                seconds = statistics.median(bench.transfer_seconds(sender, receiver, n, 4, rng, consecutive))
                gbps = n * bench.PAGE_BYTES / seconds / 1e9
                # Consecutive pages travel in place: the difference is the gather and scatter copies' cost.
                where = "consecutive" if consecutive else "scattered"
                table.add(f"KV GPU -> GPU, {how}, {n} {where} pages of 256 KiB",
                          f"{gbps:.1f} GB/s ({seconds * 1e3:.2f} ms)")  # fmt: skip
                best = max(best, gbps)
        finally:
            sender.stop()
            receiver.stop()
    table.add("KV GPU -> GPU, best", f"{best:.1f} GB/s", f">= {TARGET_KV_GBPS} GB/s",
              "met" if best >= TARGET_KV_GBPS else "missed")  # fmt: skip


def dry_run(table: Table, workdir: Path) -> None:
    """What can be checked without a GPU: imports, files, checkpoints and configurations."""
    from splitserve.engine.decode_graphs import DecodeGraphs  # noqa: F401
    from splitserve.kernels import triton_attention  # noqa: F401
    from splitserve.model.config import ModelConfig
    from tests import checkpoints

    for path in ("tests/test_kernels.py", "tests/helpers.py", "benchmarks/kv_transfer.py",
                 "benchmarks/attention_kernels.py"):  # fmt: skip
        table.add(f"found {path}", "yes" if (ROOT / path).exists() else "MISSING", "", _ok((ROOT / path).exists()))
    table.add("benchmarks/kv_transfer.py imports", f"pages of {_benchmark('kv_transfer').PAGE_BYTES >> 10} KiB")
    peaks = _benchmark("attention_kernels").PEAK_GBPS
    table.add("benchmarks/attention_kernels.py imports", f"{len(peaks)} known GPUs' HBM peaks")
    for name in EXACT_MODELS:
        folder = getattr(checkpoints, name)(workdir / name)
        table.add(f"tiny checkpoint {name}", f"head_dim {ModelConfig.from_pretrained(folder).head_dim}")
    for shape, fields in SHAPES.items():
        cfg = LlamaConfig(max_position_embeddings=8192, **fields)
        with torch.device("meta"):
            params = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
        table.add(f"shape {shape}", f"{params / 1e9:.2f}B parameters, {2 * params / 1e9:.2f} GB in bf16")
    tensor_parallel(table, workdir, device="cpu")
    # The fp8 section's path, as far as the CPU runs it: the tensor-core product against the rounded weights.
    from splitserve.kernels import fp8

    x, w = torch.randn(32, 64), torch.randn(48, 64)
    qweight, scale = fp8.quantize(w)
    error = fp8.scaled_mm(x, qweight, scale) - fp8.dequantize(*fp8.quantize(x)) @ fp8.dequantize(qweight, scale).T
    table.add("fp8 scaled_mm on the CPU", f"max error {error.abs().max():.1e}", "", _ok(error.abs().max() < 1e-3))
    # The spec section's engines capture a graph of exactly a verification's rows.
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.runner import ModelRunner

    folder = workdir / EXACT_MODELS[0]
    config = EngineConfig(model=str(folder), device="cpu", dtype="fp32", speculative="ngram",
                          num_speculative_tokens=SPEC_TOKENS, max_num_seqs=4, kv_cache_memory="4MiB")  # fmt: skip
    runner = ModelRunner(ModelConfig.from_pretrained(folder), folder, config, None)
    runner.use_decode_graphs(capture=False)
    buckets = runner.decode_graphs.buckets
    table.add("verification buckets (8 drafted, batch <= 4)", str(buckets), "", _ok(SPEC_TOKENS + 1 in buckets))
    serving(table, workdir, dry_run=True)
    table.add("CUDA", str(torch.cuda.is_available()), "", "dry run")


class SectionOverran(Exception):
    pass


def _section_overran(signum: int, frame: object) -> None:
    raise SectionOverran("stopped at its time limit (SECTION_LIMIT_S)")


def _ok(ok: bool) -> str:
    return "ok" if ok else "FAIL"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="check inputs and imports only (no GPU needed)")
    p.add_argument("--out", type=Path, default=None, help="also write the table to OUT/gpu_check.txt")
    p.add_argument("--workdir", type=Path, default=None, help="where checkpoints go (default: /dev/shm or tmp)")
    p.add_argument("--skip", default="", help="sections to skip, comma-separated: " + ",".join(SECTION_LIMIT_S))
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    base = args.workdir or (Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir()))
    workdir = Path(tempfile.mkdtemp(prefix="splitserve-gpu-check-", dir=base))
    try:
        return _run(args, skip, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(args: argparse.Namespace, skip: set[str], workdir: Path) -> int:
    table = Table()
    started = time.monotonic()
    if args.dry_run:
        dry_run(table, workdir)
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --dry-run to check the script without one)", file=sys.stderr)
        return 2
    else:
        table.add("device", torch.cuda.get_device_name(), f"torch {torch.__version__}")
        # The longest section last: if the lease runs out, only its last rows are lost.
        sections = {"kernels": kernel_tests, "exact": lambda t: exactness(t, workdir),
                    "tp": lambda t: tensor_parallel(t, workdir), "attention": attention,
                    "kv": kv_transfer, "prefill": lambda t: prefill_speed(t, workdir),
                    "spec": lambda t: speculation_speed(t, workdir),
                    "decode": lambda t: decode_speed(t, workdir),
                    "fp8": lambda t: fp8_decode(t, workdir), "serve": lambda t: serving(t, workdir)}  # fmt: skip
        signal.signal(signal.SIGALRM, _section_overran)
        for name, section in sections.items():
            if name in skip:
                continue
            print(f"gpu_check: {name} ({time.monotonic() - started:.0f} s)", flush=True)
            signal.alarm(SECTION_LIMIT_S[name])
            try:
                section(table)
            except Exception as e:  # one broken section must not hide the others' figures
                table.add(f"section {name}", f"{type(e).__name__}: {e}"[:200], "", "FAIL")
            finally:
                signal.alarm(0)
    text = table.render() + f"\n\n{time.monotonic() - started:.0f} s, {'FAILED' if table.failed else 'passed'}\n"
    print("\n" + text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.txt").write_text(text)
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
