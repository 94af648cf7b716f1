"""Mixtures of experts (Mixtral, Qwen 2/3 MoE, OLMoE) beyond the greedy checks of test_exactness.py (and the
int8 one of test_quantization.py): the capturable dense path equals the sparse one and traces as one graph."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from splitserve.llm import LLM
from splitserve.model.config import ModelConfig
from splitserve.model.mlp import SparseMoE

MOE_MODELS = ["tiny_mixtral", "tiny_qwen2_moe", "tiny_qwen3_moe", "tiny_olmoe"]


def _moe_block(folder) -> tuple[SparseMoE, ModelConfig]:
    llm = LLM(str(folder), dtype="fp32", page_size=8)
    cfg = llm.engine.model_config
    assert cfg.num_experts == 4 and cfg.moe_layers
    return llm.engine.runner.model.model.layers[cfg.moe_layers[0]].mlp, cfg


@pytest.mark.parametrize("model", MOE_MODELS)
def test_the_dense_path_a_cuda_graph_captures_equals_the_sparse_one(model, request):
    moe, cfg = _moe_block(request.getfixturevalue(model))
    x = torch.randn(13, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    weights, chosen = moe.route(x)
    assert len({tuple(r) for r in chosen.sort(dim=1).values.tolist()}) > 1  # tokens choose different experts
    torch.testing.assert_close(moe.dense(x, weights, chosen), moe.sparse(x, weights, chosen), atol=1e-5, rtol=1e-5)


def test_the_dense_path_traces_with_no_graph_break_or_host_sync(tiny_qwen2_moe, monkeypatch):
    """What a CUDA graph needs of it: dynamo traces routing + dense experts + the shared expert in one graph
    (a `.tolist()` or a data-dependent shape would break it), and the traced call gives the same output."""
    moe, cfg = _moe_block(tiny_qwen2_moe)
    monkeypatch.setenv("SPLITSERVE_KERNELS", "reference")  # the CPU's native kernels are opaque calls

    def step(x: torch.Tensor) -> torch.Tensor:
        weights, chosen = moe.route(x)
        return moe.dense(x, weights, chosen) + torch.sigmoid(moe.shared_expert_gate(x)) * moe.shared_expert(x)

    x = torch.randn(4, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    traced = torch.compile(step, fullgraph=True, backend="eager")
    torch.testing.assert_close(traced(x), moe(x), atol=1e-5, rtol=1e-5)
    breaks = (torch._dynamo.exc.Unsupported, GuardOnDataDependentSymNode)
    with pytest.raises(breaks):  # the check is real: the sparse path (its .tolist()) cannot be one graph
        torch._dynamo.reset()
        torch.compile(lambda x: moe.sparse(x, *moe.route(x)), fullgraph=True, backend="eager")(x)
    torch._dynamo.reset()
