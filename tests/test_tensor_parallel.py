"""Tensor parallelism inside a worker (model/parallel.py, engine/tensor_parallel.py), on the CPU with gloo: the
tokens of transformers at 2 and 4 ranks, each rank's share of the weights, clear refusals, and a dead rank taking
its worker down instead of hanging it."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
import torch
import torch.distributed as dist

from splitserve.cli import main as cli_main
from splitserve.decode.engine import DecodeEngine
from splitserve.engine.config import EngineConfig
from splitserve.engine.params import SamplingParams
from splitserve.engine.request import EngineRequest
from splitserve.launcher import ServeProcess
from splitserve.model.collectives import GroupCollectives, SharedMemoryCollectives, create_slots
from tests.helpers import hf_greedy
from tests.test_cluster_faults import _kill_the_busier_decode_worker_midstream
from tests.test_exactness import _check_against_hf
from tests.test_prefix_cache import _run
from tests.test_serving import ENGINE


def _close(engine: DecodeEngine) -> None:
    followers = engine.runner._followers.processes if engine.runner._followers is not None else []
    engine.runner.close()
    assert all(p.poll() is not None for p in followers), "a follower rank outlived its engine"


@pytest.mark.parametrize(
    ("model", "width"),
    [
        ("tiny_llama_gqa", 2),
        ("tiny_qwen3", 2),
        ("tiny_mixtral", 2),
        ("tiny_gemma3", 2),
        ("tiny_llama_untied", 2),
        ("tiny_llama_gqa", 4),
    ],
)
def test_greedy_matches_transformers_across_ranks(model, width, request):
    """Megatron's split (column-parallel q/k/v and gate/up, row-parallel o and down, vocabulary-parallel
    embedding and LM head, a mixture's every expert split) gives transformers' greedy tokens (fp32) under
    continuous batching and chunked prefill. At 4 ranks the Llama's 2 KV heads are each held by 2 ranks; the
    untied Llama's LM head is split apart from its embedding; Gemma 3 has sliding-window layers."""
    engine = _check_against_hf(request.getfixturevalue(model), dict(page_size=8, max_num_batched_tokens=64,
                                                                    tensor_parallel=width))  # fmt: skip
    _close(engine)


def test_each_rank_holds_its_share_of_the_weights_and_of_the_kv(tiny_llama_gqa):
    """Rank 0 of 2 holds half of every decoder matrix and of the vocabulary (norms whole), and a KV cache of its
    KV heads: as many pages as one rank alone holds in the same memory, at half the bytes each... so twice the
    pages."""
    options = dict(model=str(tiny_llama_gqa), dtype="fp32", device="cpu", kv_cache_memory="1MiB")
    one, two = DecodeEngine(EngineConfig(**options)), DecodeEngine(EngineConfig(**options, tensor_parallel=2))
    try:
        whole, half = dict(one.runner.model.named_parameters()), dict(two.runner.model.named_parameters())
        assert whole.keys() == half.keys()
        for name, p in whole.items():
            expected = p.numel() if p.dim() == 1 else p.numel() // 2
            assert half[name].numel() == expected, name
        assert two.runner.kv_cache.shape[4] == one.runner.kv_cache.shape[4] // 2  # KV heads
        assert two.allocator.capacity == 2 * one.allocator.capacity
    finally:
        _close(two)


def test_a_model_that_does_not_split_is_refused_before_any_rank_starts(tiny_qwen2, tiny_olmoe):
    before = {p.pid for p in psutil.Process().children()}
    with pytest.raises(ValueError, match="4 attention heads do not split 3 ways"):
        DecodeEngine(EngineConfig(model=str(tiny_qwen2), dtype="fp32", device="cpu", tensor_parallel=3))
    with pytest.raises(ValueError, match="query/key norm spans every head"):
        DecodeEngine(EngineConfig(model=str(tiny_olmoe), dtype="fp32", device="cpu", tensor_parallel=2))
    assert {p.pid for p in psutil.Process().children()} <= before


def test_serve_refuses_ranks_in_separate_pools(capsys):
    """KV between prefill and decode pools of several ranks is not there yet: `serve` says so at once."""
    assert cli_main(["serve", "--tensor-parallel", "2"]) != 0
    assert "--tensor-parallel above 1 runs colocated workers for now" in capsys.readouterr().err


def test_a_dead_follower_fails_the_next_step_at_once(tiny_llama_gqa):
    """A rank SIGKILLed: rank 0's next pass raises (its connection closed) instead of waiting on it, so a worker
    exits and its supervisor restarts it."""
    engine = DecodeEngine(EngineConfig(model=str(tiny_llama_gqa), dtype="fp32", device="cpu", tensor_parallel=2))
    (follower,) = [psutil.Process(p.pid) for p in engine.runner._followers.processes]
    try:
        engine.add_request(EngineRequest("a", [5, 6, 7], SamplingParams(max_tokens=3, temperature=0)))
        engine.step()
        follower.send_signal(signal.SIGKILL)
        follower.wait(timeout=10)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"Connection closed by peer|rank died"):
            while engine.has_unfinished():
                engine.step()
        assert time.monotonic() - start < 5
    finally:
        engine.abort("a")
        _close(engine)


def test_followers_die_with_rank_0(tiny_llama_gqa):
    """Rank 0 SIGKILLed (no chance to say stop): its followers exit too (`die_with_parent`), none is left
    waiting for a pass that never comes."""
    script = textwrap.dedent(f"""
        import sys
        from splitserve.decode.engine import DecodeEngine
        from splitserve.engine.config import EngineConfig
        engine = DecodeEngine(EngineConfig(model={str(tiny_llama_gqa)!r}, dtype="fp32", device="cpu",
                                           tensor_parallel=2))
        print(*[p.pid for p in engine.runner._followers.processes], flush=True)
        sys.stdin.read()
    """)
    rank0 = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        followers = [psutil.Process(int(pid)) for pid in rank0.stdout.readline().split()]
        assert len(followers) == 1
        os.kill(rank0.pid, signal.SIGKILL)
        rank0.wait(timeout=10)
        _, alive = psutil.wait_procs(followers, timeout=10)
        assert not alive
    finally:
        rank0.kill()


def test_quantized_cpu_weights_split_too(tiny_llama_gqa):
    """The CPU's quantized modes quantize each rank's slice (the fused all-layers step is single-rank, so ranks
    run layer by layer). A row-parallel layer's slice gets its own scales, so 2 ranks' w8a8 is a quantization of
    its own, not 1 rank's bits: its logits are as close to the exact model's as 1 rank's are."""
    tokens = [11, 23, 42, 57, 99, 130, 7, 250, 31, 64, 12, 9]
    exact = DecodeEngine(EngineConfig(model=str(tiny_llama_gqa), dtype="fp32", device="cpu")).score(tokens)
    errors, widths = [], []
    for width in (1, 2):
        engine = DecodeEngine(EngineConfig(model=str(tiny_llama_gqa), quantization="w8a8", device="cpu",
                                           tensor_parallel=width))  # fmt: skip
        try:
            errors.append((engine.score(tokens) - exact).abs().max().item())
            widths.append(engine.runner.model.model.layers[0].self_attn.qkv_proj.out_features)
        finally:
            _close(engine)
    assert widths[1] == widths[0] // 2
    scale = exact.abs().max().item()
    assert 0 < errors[1] < max(2 * errors[0], 0.01 * scale), (errors, scale)


@pytest.mark.slow
def test_served_ranks_give_transformers_tokens_and_survive_a_dead_rank(tiny_chat_llama):
    """`serve` with two colocated workers of 2 ranks each: greedy streams give transformers' tokens; rank 1 of the
    busier worker SIGKILLed mid-stream takes its worker down (rank 0's pass raises), the supervisor restarts it,
    and its streams migrate and complete with the tokens of an undisturbed run."""
    args = ["--prefill", "0", "--decode", "0", "--both", "2", "--tensor-parallel", "2", *ENGINE]
    server = ServeProcess(tiny_chat_llama, args, num_workers=2)
    try:
        model = server.http.get("/v1/models").json()["data"][0]["id"]
        rng = random.Random(40)
        prompts = [[rng.randrange(100, 49152) for _ in range(rng.randrange(5, 30))] for _ in range(4)]
        bodies = [{"model": model, "prompt": p, "max_tokens": 120, "ignore_eos": True, "stream": True,
                   "temperature": 0} for p in prompts]  # fmt: skip
        results = _kill_the_busier_decode_worker_midstream(server, bodies, at=8, role="both", rank=1)
        assert [r["tokens"] for r in results] == hf_greedy(tiny_chat_llama, prompts, [120] * 4)
        deadline = time.monotonic() + 120
        while server.health()["worker_restarts"].get("both", 0) < 1 or len(server.workers("both")) < 2:
            assert time.monotonic() < deadline, server.health()
            time.sleep(0.5)
        server.wait_idle(timeout=30)
    finally:
        server.stop()


def test_shared_memory_collectives_sum_in_rank_order_and_fall_back_past_a_slot(tmp_path):
    """Two ranks (threads here) through one mapped file: each gets the same sum, bit for bit (both add in rank
    order), the gather returns both tensors in rank order, and a tensor larger than a slot goes through the
    fallback group (gloo) with the same results; many steps in a row reuse the two sets of slots safely."""
    path, slot_bytes = tmp_path / "slots", 64 * 4
    create_slots(path, 2, slot_bytes)
    store = dist.HashStore()
    tensors = {rank: [torch.randn(n, generator=torch.Generator().manual_seed(rank * 100 + n)) for n in (16, 64, 200)]
               for rank in (0, 1)}  # fmt: skip
    results: dict[int, list] = {}

    def rank_main(rank: int) -> None:
        shm = SharedMemoryCollectives(path, rank, 2, slot_bytes)
        shm.fallback = GroupCollectives(dist.ProcessGroupGloo(store, rank, 2), 2)
        out = []
        for _ in range(50):
            for x in tensors[rank]:
                summed = x.clone()
                shm.all_reduce(summed)
                out.append((summed, shm.all_gather(x)))
        results[rank] = out

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(results) == {0, 1}
    for i, ((sum0, gathered0), (sum1, gathered1)) in enumerate(zip(results[0], results[1], strict=True)):
        a, b = tensors[0][i % 3], tensors[1][i % 3]
        assert torch.equal(sum0, sum1) and torch.equal(sum0, a + b), i
        assert all(torch.equal(g, want) for g, want in zip([*gathered0, *gathered1], [a, b, a, b], strict=True)), i


def test_ranks_share_the_prefix_cache_and_store_int8_kv_each(tiny_llama_gqa):
    """Rank 0's allocator decides for all: a later prompt's cached prefix pages hold every rank's heads, so the
    hits give transformers' tokens at 2 ranks (fp32 KV); with --kv-dtype int8 each rank quantizes its own heads
    (a scale per page and head, as one rank does), so 2 ranks give 1 rank's int8 tokens. The offload tier, which
    copies rank 0's pages only, is refused."""
    rng = random.Random(5)
    system = [rng.randrange(8, 384) for _ in range(37)]
    prompts = [system + [rng.randrange(8, 384) for _ in range(n)] for n in (1, 3, 6, 11)]
    requests = {f"r{i}": (p, 7) for i, p in enumerate(prompts)}
    outputs = {}
    for kv_dtype, width in (("fp32", 2), ("int8", 1), ("int8", 2)):
        engine = DecodeEngine(EngineConfig(model=str(tiny_llama_gqa), dtype="fp32", kv_dtype=kv_dtype, page_size=4,
                                           max_num_batched_tokens=64, tensor_parallel=width))  # fmt: skip
        try:
            first = _run(engine, dict(list(requests.items())[:1]))
            outputs[kv_dtype, width] = [*first.values(), *_run(engine, dict(list(requests.items())[1:])).values()]
            assert engine.allocator.stats.hits == 3 * 36
        finally:
            _close(engine)
    assert outputs["fp32", 2] == hf_greedy(tiny_llama_gqa, prompts, [7] * 4)
    assert outputs["int8", 2] == outputs["int8", 1]
    with pytest.raises(ValueError, match="offload tier copies rank 0's pages only"):
        EngineConfig(model=str(tiny_llama_gqa), tensor_parallel=2, kv_offload_memory="64MiB")
