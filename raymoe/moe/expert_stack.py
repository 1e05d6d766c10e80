"""Base class for a stack of experts whose parameters all carry a leading expert dimension.

Sample-level paper experts and token-level FFN experts both derive from it, so expert parallelism,
gradient sync and sharded checkpoints treat them alike: every parameter and buffer of an ExpertStack
has shape (num_local, ...), and local index i is global expert `first_expert + i`.

Shape legend: R rows grouped by local expert (expert-major), G rows every local expert sees (dense),
e local experts, X input features, Y output features.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ExpertStack(nn.Module):
    """Experts [first_expert, first_expert + num_local) of num_experts, with stacked parameters."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.num_local = num_experts
        self.first_expert = 0

    @property
    def local_ids(self) -> range:
        return range(self.first_expert, self.first_expert + self.num_local)

    def forward_grouped(self, x_RX: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Run local expert i on the i-th contiguous group of rows; len(counts) == num_local."""
        raise NotImplementedError

    def forward_dense(self, x_GX: torch.Tensor) -> torch.Tensor:
        """Every local expert on the same G rows -> (e, G, Y) (dense gates: dispatch without expert ids)."""
        raise NotImplementedError

    def shard(self, ep_rank: int, ep_size: int) -> "ExpertStack":
        """A copy that keeps only this rank's experts (parameter values are sliced, not re-initialised)."""
        if self.num_local != self.num_experts:
            raise ValueError("shard() expects the full stack of experts")
        if self.num_experts % ep_size:
            raise ValueError(f"num_experts ({self.num_experts}) is not divisible by the EP degree ({ep_size})")
        per_rank = self.num_experts // ep_size
        lo = ep_rank * per_rank
        out = copy.deepcopy(self)
        for module in out.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(param.detach()[lo:lo + per_rank].clone(),
                                                   requires_grad=param.requires_grad))
            for name, buf in list(module.named_buffers(recurse=False)):
                if buf is not None and buf.dim() > 0 and buf.shape[0] == self.num_experts:
                    module.register_buffer(name, buf[lo:lo + per_rank].clone())
        out.num_local, out.first_expert = per_rank, lo
        return out


def expert_parameter_names(model: nn.Module) -> set[str]:
    """Names of all parameters that live inside an ExpertStack (never averaged across the EP group)."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, ExpertStack):
            names.update(f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters())
    return names
