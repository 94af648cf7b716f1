"""The decoder's feed-forward blocks: the gated MLP, and the sparse mixture of experts (Mixtral, Qwen 2/3 MoE,
OLMoE) that routes each token to its top-k experts, each one such an MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.kernels.layers import gelu_tanh_mul, silu_mul

_ACTIVATION_MUL = {"silu": silu_mul, "gelu_tanh": gelu_tanh_mul}


class MLP(nn.Module):
    """`down(act(gate(x)) * up(x))`, gate and up fused into one matmul; `act` silu or (Gemma) gelu_tanh."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, activation: str = "silu"):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_mul = _ACTIVATION_MUL[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_mul(self.gate_up_proj(x)))


class Router(nn.Module):
    """The experts' scores of each token: a bias-free linear map, kept out of `nn.Linear` so that quantizing the
    model leaves it exact (a changed score changes which experts run, not just by how much)."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class SparseMoE(nn.Module):
    """Each token through its `top_k` experts (softmax over all experts' scores in fp32, then the top k,
    renormalised to sum to 1 where `normalize`), their outputs summed by those weights; plus, where the
    architecture has one (Qwen 2 MoE), a shared expert every token goes through, scaled by a sigmoid gate."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        expert_intermediate_size: int,
        normalize: bool,
        shared_intermediate_size: int = 0,
    ):
        super().__init__()
        self.top_k, self.normalize = top_k, normalize
        self.gate = Router(hidden_size, num_experts)
        self.experts = nn.ModuleList(MLP(hidden_size, expert_intermediate_size) for _ in range(num_experts))
        self.shared_expert = self.shared_expert_gate = None
        if shared_intermediate_size:
            self.shared_expert = MLP(hidden_size, shared_intermediate_size)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.route(x)
        # A CUDA graph cannot hold a token-dependent grouping (it reads the choices back): while one is captured,
        # every expert runs on every row (a decode step's few rows read each expert's weights once either way).
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        out = (self.dense if capturing else self.sparse)(x, weights, chosen)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's chosen experts `[rows, top_k]` and their weights (in x's dtype)."""
        weights, chosen = torch.softmax(self.gate(x).float(), dim=-1).topk(self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), chosen

    def sparse(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Each chosen expert on its rows: experts in increasing order, each on its rows ordered by (choice rank,
        row), as transformers sums them, so that fp32 results equal its own."""
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():
            rank, rows = torch.where(chosen.t() == e)
            out.index_add_(0, rows, self.experts[e](x[rows]) * weights[rows, rank, None])
        return out

    def dense(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Every expert on every row, weighted 0 where not chosen: no shape or branch depends on the choices."""
        scale = torch.zeros(x.shape[0], len(self.experts), dtype=x.dtype, device=x.device)
        scale.scatter_(1, chosen, weights)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out += expert(x) * scale[:, e, None]
        return out
