"""The GPU's decode step (`engine/decode_graphs.py`) proven on the CPU: the bucketed, padded step (capture
replaced by a plain call) gives transformers' greedy tokens for batches that cross bucket edges, its padding
rows write only into the null page, its sampled tokens equal the eager sampler's, and the step itself traces
as one graph (no graph break, no host synchronisation) on the reference kernels, and reads nothing back on the
Triton ones."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from splitserve.decode.engine import DecodeEngine
from splitserve.engine.config import EngineConfig
from splitserve.engine.decode_graphs import DecodeGraphs, batch_buckets
from splitserve.engine.kv_cache import page_bytes
from splitserve.engine.params import SamplingParams
from splitserve.engine.request import Chunk, EngineRequest
from splitserve.model.config import ModelConfig
from tests.helpers import hf_greedy, run_staggered


def _engine(folder, graphs: bool, page_size: int = 8, **options) -> DecodeEngine:
    memory = 64 * page_bytes(ModelConfig.from_pretrained(folder), page_size, torch.float32)
    config = EngineConfig(model=str(folder), dtype="fp32", device="cpu", page_size=page_size, kv_cache_memory=memory,
                          quantization="none", **options)  # fmt: skip
    engine = DecodeEngine(config)
    if graphs:
        engine.runner.use_decode_graphs(capture=False)
    return engine


def test_buckets_are_powers_of_two_then_the_batch_limit():
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]


@pytest.mark.parametrize("model", ["tiny_llama_gqa", "tiny_qwen2"])
def test_bucketed_decode_step_gives_transformers_tokens_and_pads_into_the_null_page(model, request):
    folder = request.getfixturevalue(model)
    engine = _engine(folder, graphs=True, max_num_seqs=12, max_num_batched_tokens=64)
    graphs, kv = engine.runner.decode_graphs, engine.runner.kv_cache
    null = engine.runner.null_page
    assert null == engine.allocator.capacity  # outside the pool: no request can hold it
    steps: list[tuple[int, int]] = []  # (rows, bucket)
    run = graphs.run

    def checked_run(chunks, run=run):
        requests = [c.request for c in chunks]
        ps = engine.config.page_size
        live = {(r.pages[r.num_computed_tokens // ps], r.num_computed_tokens % ps) for r in requests}
        before = kv.clone()
        out = run(chunks)
        changed = (before != kv).transpose(1, 3).flatten(2).any(-1)  # [pages, slots]
        written = {tuple(x) for x in changed.nonzero().tolist()}
        assert written - live <= {(null, 0)}, f"padding rows wrote outside the null page: {written - live}"
        assert live <= written, "a live row's K/V was not written"
        steps.append((len(requests), next(b for b in graphs.buckets if b >= len(requests))))
        return out

    graphs.run = checked_run
    rng = random.Random(3)
    prompts = [[rng.randrange(8, 384) for _ in range(n)] for n in (1, 5, 9, 3, 17, 2, 11, 6, 30, 4, 8)]
    max_tokens = [rng.randrange(4, 20) for _ in prompts]
    params = [SamplingParams(max_tokens=n, temperature=0) for n in max_tokens]
    ours, _ = run_staggered(engine, prompts, params, [0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6])
    assert ours == hf_greedy(folder, prompts, max_tokens)
    buckets = {b for _, b in steps}
    assert {1, 2, 4, 8, 12} & buckets == buckets and len(buckets) >= 4, steps  # the batch crossed bucket edges
    assert any(n < b for n, b in steps), "no step was padded"


def test_bucketed_steps_sample_as_the_eager_sampler_does(tiny_llama_gqa):
    """Seeded sampled rows (temperature, top-k, top-p) drawn inside the step, and rows that need the sampler's
    processors (penalties, logit bias, logprobs), give the eager runner's tokens."""
    params = [
        SamplingParams(max_tokens=12, temperature=0.9, seed=1),
        SamplingParams(max_tokens=12, temperature=0.7, top_k=20, top_p=0.8, seed=2),
        SamplingParams(max_tokens=12, temperature=0),
        SamplingParams(max_tokens=12, temperature=1.2, top_p=0.5, seed=3),
    ]
    processed = [
        SamplingParams(max_tokens=10, temperature=0.8, repetition_penalty=1.3, seed=4),
        SamplingParams(max_tokens=10, temperature=0, logit_bias=((9, 5.0),), logprobs=2),
    ]
    prompts = [[random.Random(i).randrange(8, 384) for _ in range(4 + 3 * i)] for i in range(6)]
    results = []
    for graphs in (False, True):
        engine = _engine(tiny_llama_gqa, graphs=graphs)
        for batch in (params, processed):
            results.append(run_staggered(engine, prompts[: len(batch)], batch, [0] * len(batch))[0])
    assert results[:2] == results[2:]


@contextmanager
def _prepared_step(folder, drafts: tuple[tuple[int, ...], ...] = ((), (), ())) -> Iterator[DecodeGraphs]:
    """Static buffers that hold a real step: three requests a few tokens into decoding (aborted afterwards),
    with `drafts` (a verification step: each drafted token a row of its own, pages reserved for them)."""
    engine = _engine(folder, graphs=True, page_size=16, max_num_seqs=4, speculative="ngram",
                     num_speculative_tokens=4)  # fmt: skip
    graphs = engine.runner.decode_graphs
    for i, n in enumerate((3, 9, 14)):
        params = SamplingParams(max_tokens=40, temperature=0.8, speculative=False)
        engine.add_request(EngineRequest(str(i), list(range(10 + i, 10 + i + n)), params))
    for _ in range(4):
        engine.step()
    requests = [engine._requests[str(i)] for i in range(3)]
    for r in requests:  # room for the drafted tokens' K/V
        r.pages += engine.allocator.allocate(1)
    chunks = [Chunk(r, 1, draft) for r, draft in zip(requests, drafts, strict=True)]
    graphs._fill(graphs._host_views[8], chunks, sampled=not any(drafts))
    graphs._ints.copy_(graphs._ints_host)
    graphs._floats.copy_(graphs._floats_host)
    try:
        yield graphs
    finally:
        for r in requests:
            engine.abort(r.request_id)


def test_the_decode_step_traces_as_one_graph_with_no_host_sync(tiny_llama_gqa, monkeypatch):
    monkeypatch.setenv("SPLITSERVE_KERNELS", "reference")  # the CPU's native kernels are opaque calls
    torch._dynamo.reset()
    with _prepared_step(tiny_llama_gqa) as graphs:
        # fullgraph: any graph break (.item(), .tolist(), a branch on a tensor's value, a data-dependent shape)
        # raises instead of splitting the step.
        compiled = torch.compile(graphs.forward, fullgraph=True, backend="eager")
        for sampled in (False, True):
            graphs.forward(8, sampled)
            expected = graphs.tokens.clone(), graphs.logits.clone()
            compiled(8, sampled)
            assert torch.equal(graphs.tokens, expected[0]) and torch.equal(graphs.logits, expected[1])


def test_a_verification_step_traces_as_the_same_graph_with_no_host_sync(tiny_llama_gqa, monkeypatch):
    """A speculative step's verification (three requests with drafts of 2, 0 and 3 tokens: 8 rows, each a
    decode row at its position) runs in the decode step's bucket as it is, traced with no graph break."""
    monkeypatch.setenv("SPLITSERVE_KERNELS", "reference")
    torch._dynamo.reset()
    with _prepared_step(tiny_llama_gqa, drafts=((5, 6), (), (7, 8, 9))) as graphs:
        host = graphs._host_views[8]
        assert list(host.input_ids[:8]) == [host.input_ids[0], 5, 6, host.input_ids[3], host.input_ids[4], 7, 8, 9]
        assert list(host.context_lens[1:3] - host.context_lens[0]) == [1, 2]  # a drafted row sees the rows before
        compiled = torch.compile(graphs.forward, fullgraph=True, backend="eager")
        graphs.forward(8, False)
        expected = graphs.logits.clone()
        compiled(8, False)
        assert torch.equal(graphs.logits, expected)


def test_speculation_through_the_bucketed_step_gives_the_tokens_without_it(tiny_llama_gqa):
    """Greedy and seeded requests that copy their prompt, with `--speculative ngram`, through the bucketed step
    (verification rows included): the tokens of the same requests without speculation, with drafts kept."""
    rng = random.Random(5)
    phrase = [rng.randrange(8, 384) for _ in range(12)]
    prompts = [phrase * 3, phrase[:7] * 4, [rng.randrange(8, 384) for _ in range(9)]]
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=24, temperature=0.8, seed=7, ignore_eos=True),
              SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)]  # fmt: skip
    results, verified = [], []
    for speculative in ("off", "ngram"):
        engine = _engine(tiny_llama_gqa, graphs=True, max_num_seqs=4, speculative=speculative, speculative_max_batch=4)
        graphs = engine.runner.decode_graphs
        if speculative == "ngram":  # a bucket of exactly 1, 2 requests' rows with whole drafts (8 tokens)
            assert {9, 18} <= set(graphs.buckets) and max(graphs.buckets) == 4 + 2 * 8
        run, drafted_rows = graphs.run, []

        def counted(chunks, run=run, drafted_rows=drafted_rows):
            drafted_rows.append(sum(len(c.draft) for c in chunks))
            return run(chunks)

        graphs.run = counted
        results.append(run_staggered(engine, prompts, params, [0, 0, 0])[0])
        verified.append(sum(drafted_rows))
        if speculative == "ngram":
            assert engine.speculator.stats.accepted > 0, "no draft was kept: the test proves nothing"
    assert results[0] == results[1]
    assert verified[0] == 0 and verified[1] > 0, "the drafts were not verified in the bucketed step"


class _NoReadBack(TorchDispatchMode):
    """Fails on every operation that reads a tensor's values back to the host or gives a shape that depends
    on them (what a CUDA graph cannot hold)."""

    SYNCING = ("_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "unique")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if any(name == s or name.startswith(f"_{s}") or name.startswith(f"{s}_") for s in self.SYNCING):
            raise AssertionError(f"host synchronisation in the decode step: {func}")
        return func(*args, **(kwargs or {}))


def test_the_triton_decode_step_reads_nothing_back(tiny_qwen2, monkeypatch):
    """Dynamo cannot trace the Triton interpreter, so on the CPU the Triton path of the same step runs under a
    dispatcher hook that fails on any read-back; its tokens equal the reference kernels'."""
    tokens = {}
    with _prepared_step(tiny_qwen2) as graphs:
        for kernels in ("reference", "triton"):
            monkeypatch.setenv("SPLITSERVE_KERNELS", kernels)
            with _NoReadBack():
                graphs.forward(8, sampled=True)
            tokens[kernels] = graphs.tokens.clone()
    assert torch.equal(tokens["reference"], tokens["triton"])
    with pytest.raises(AssertionError, match="host synchronisation"), _NoReadBack():
        graphs.tokens.sum().item()  # the hook does catch a read-back


def test_the_gpu_check_runs_its_dry_run_without_a_gpu():
    """`scripts/gpu_check.sh --dry-run` (what CI can run of the GPU check): it parses, imports what the real run
    imports, finds its inputs, builds the tiny checkpoints, runs the serving section on a tiny model on the CPU
    (serve colocated and 1P+1D, bench at two rates, KV per transfer, plan --quick) and prints its table."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(Path.home())}
    run = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = ("found benchmarks/kv_transfer.py", "tiny checkpoint tiny_qwen2", "shape 8b", "serve colocated, 64/8 tokens",
            "serve 1P+1D: KV per transfer", "plan --quick", "passed")  # fmt: skip
    for row in rows:
        assert row in run.stdout
