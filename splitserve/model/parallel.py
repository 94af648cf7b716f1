"""`TensorParallel`: which slice of the model this process holds in a worker of several ranks (Megatron's
sharding), and the two collectives that join the slices.

Rank r of N holds: its 1/N of the query heads and of the KV heads (every rank one KV head, replicated, where N
exceeds their count), so q/k/v are column-parallel and o row-parallel (one all-reduce after it); its 1/N of the
MLP's intermediate size, so gate/up are column-parallel and down row-parallel (one all-reduce), a mixture of
experts' every expert likewise (one all-reduce for the whole block); its 1/N of the vocabulary in the embedding
(ids outside its range look up zeros; an all-reduce) and in the LM head (the logits gathered for sampling). Norms,
the experts' router and rotary tables are whole on every rank. A row-parallel layer's bias is rank 0's alone.

`shard` cuts a checkpoint tensor to the rank's piece, so that each rank loads only what it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import torch.distributed as dist

    from splitserve.model.collectives import Collectives
    from splitserve.model.config import ModelConfig


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    width: int = 1
    collectives: Collectives | None = None  # the ranks' sums and gathers (model/collectives.py)
    control: dist.ProcessGroup | None = None  # rank 0's step plans to the others (gloo: host memory)

    def check(self, cfg: ModelConfig) -> None:
        """Raise a ValueError where `cfg` cannot be split `width` ways."""
        n, what = self.width, f"--tensor-parallel {self.width}"
        if cfg.num_heads % n:
            raise ValueError(f"{what}: the model's {cfg.num_heads} attention heads do not split {n} ways")
        if cfg.num_kv_heads % n and n % cfg.num_kv_heads:
            raise ValueError(f"{what}: the model's {cfg.num_kv_heads} KV heads neither split {n} ways nor divide {n}")
        for name in ("intermediate_size", "expert_intermediate_size", "shared_expert_intermediate_size"):
            if getattr(cfg, name) % n:
                raise ValueError(f"{what}: the model's {name} {getattr(cfg, name)} does not split {n} ways")
        if cfg.qk_norm == "all" and n > 1:
            raise ValueError(f"{what}: {cfg.architecture}'s query/key norm spans every head (not split yet)")

    def local(self, cfg: ModelConfig) -> ModelConfig:
        """`cfg` as this rank's modules see it: its heads, its KV heads, its share of every MLP. The vocabulary
        stays the model's (`vocab_range` is this rank's part)."""
        n = self.width
        return replace(
            cfg,
            num_heads=cfg.num_heads // n,
            num_kv_heads=max(cfg.num_kv_heads // n, 1),
            intermediate_size=cfg.intermediate_size // n,
            expert_intermediate_size=cfg.expert_intermediate_size // n,
            shared_expert_intermediate_size=cfg.shared_expert_intermediate_size // n,
        )

    def vocab_range(self, vocab_size: int) -> tuple[int, int]:
        """The token ids [start, end) of this rank's embedding and LM head rows (the last rank's padded)."""
        per = -(-vocab_size // self.width)
        return self.rank * per, (self.rank + 1) * per

    def kv_heads(self, num_kv_heads: int) -> range:
        """The model's KV heads this rank holds: its 1/N, or the one it shares with N / num_kv_heads - 1 others."""
        if num_kv_heads >= self.width:
            per = num_kv_heads // self.width
            return range(self.rank * per, (self.rank + 1) * per)
        first = self.rank * num_kv_heads // self.width
        return range(first, first + 1)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `x` (a row-parallel layer's partial outputs), in place."""
        if self.collectives is not None:  # (a group of one rank too: the GPU check runs NCCL so)
            self.collectives.all_reduce(x)
        return x

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Every rank's vocabulary slice of `logits` ([rows, vocab / N]) side by side, the padding dropped."""
        if self.collectives is None:
            return logits
        return torch.cat(self.collectives.all_gather(logits), dim=-1)[..., :vocab_size]

    def shard(self, name: str, index: int, tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
        """This rank's piece of checkpoint tensor `tensor`, loading into our parameter `name` (its `index`-th
        fused part: q, k, v of qkv_proj; gate, up of gate_up_proj). `cfg` is the whole model's."""
        if self.width == 1:
            return tensor
        module, param = name.rsplit(".", 1)
        if module.endswith("qkv_proj"):
            if index == 0:
                return _rows(tensor, self.rank, self.width)
            heads = self.kv_heads(cfg.num_kv_heads)
            return tensor[heads.start * cfg.head_dim : heads.stop * cfg.head_dim]
        if module.endswith("gate_up_proj"):
            return _rows(tensor, self.rank, self.width)
        if module.endswith(("o_proj", "down_proj")):
            if param == "bias":  # added once, after the all-reduce's sum
                return tensor if self.rank == 0 else torch.zeros_like(tensor)
            return _rows(tensor.t(), self.rank, self.width).t()
        if module.endswith(("embed_tokens", "lm_head")):
            start, end = self.vocab_range(cfg.vocab_size)
            piece = tensor[start:end]
            if piece.shape[0] < end - start:  # the last rank's rows past the vocabulary: never looked up or sampled
                piece = torch.cat((piece, piece.new_zeros(end - start - piece.shape[0], *piece.shape[1:])))
            return piece
        return tensor


def _rows(tensor: torch.Tensor, rank: int, width: int) -> torch.Tensor:
    per = tensor.shape[0] // width
    return tensor[rank * per : (rank + 1) * per]
