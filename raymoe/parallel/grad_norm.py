"""Clipping by the GLOBAL gradient norm when experts are split across ranks.

After sync_gradients every rank holds the full gradient of the replicated parameters but only its own experts'
gradients, so ||g||^2 = ||g_replicated||^2 + sum over the EP group of ||g_local experts||^2; one all-reduce over
the EP group gives every rank the same norm and so the same clipping factor.
"""

from __future__ import annotations

import torch
from torch import nn

from raymoe.parallel.context import DistContext


def clip_grad_norm(model: nn.Module, max_norm: float, ctx: DistContext) -> torch.Tensor:
    """Scale every gradient by min(1, max_norm / ||g||) with ||g|| over ALL experts of all ranks; returns ||g||."""
    from raymoe.moe.expert_stack import expert_parameter_names

    expert_names = expert_parameter_names(model) if ctx.ep_size > 1 else set()
    dense, expert = [], []
    for name, p in model.named_parameters():
        if p.grad is not None:
            (expert if name in expert_names else dense).append(p.grad)
    device = ctx.device
    sq = torch.zeros(2, dtype=torch.float64, device=device)  # [replicated, local experts]
    if dense:
        sq[0] = torch.stack([g.detach().double().pow(2).sum() for g in dense]).sum()
    if expert:
        sq[1] = torch.stack([g.detach().double().pow(2).sum() for g in expert]).sum()
    if ctx.ep_size > 1:  # every EP rank joins, even one whose experts got no gradient
        import torch.distributed as dist

        experts_sq = sq[1:].clone()
        dist.all_reduce(experts_sq, op=dist.ReduceOp.SUM, group=ctx.ep_group)
        sq[1] = experts_sq[0]
    total = sq.sum().sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    if scale < 1.0:
        for g in dense + expert:
            g.mul_(scale.to(g.dtype))
    return total.float()
