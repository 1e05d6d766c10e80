"""Aux-loss-free load balancing (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3 `Gate`).

A per-expert bias is added to the router scores for the top-k *selection* only; the combine weights stay the
unbiased scores, so balancing sends no gradient anywhere. Token counts are accumulated in training forwards;
after each optimizer step the training loop calls `post_step(ctx)` on every module that has it, which sums the
counts over all data-parallel ranks and moves the bias: b_e += u * sign(mean_e' load_e' - load_e).

Shape legend: N items routed (tokens, or samples at the sample level), E experts, K experts per item.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # the training loop passes its context in; moe code does not depend on raymoe.parallel
    from raymoe.parallel.context import DistContext


class BiasBalancer(nn.Module):
    """Holds bias_E (persistent buffer, part of checkpoints) and counts_E (items routed since the last step)."""

    def __init__(self, num_experts: int, rate: float):
        super().__init__()
        self.num_experts, self.rate = num_experts, rate
        self.register_buffer("bias_E", torch.zeros(num_experts))
        self.register_buffer("counts_E", torch.zeros(num_experts, dtype=torch.long), persistent=False)

    def selection_scores(self, scores_NE: torch.Tensor) -> torch.Tensor:
        """Scores used to pick the top-k (never for the combine weights)."""
        return scores_NE.detach() + self.bias_E

    @torch.no_grad()
    def record(self, experts_NK: torch.Tensor) -> None:
        """Count the router's choices (before capacity dropping) in training only; eval leaves counts alone."""
        if self.training:
            ids = experts_NK[experts_NK >= 0]
            self.counts_E += torch.bincount(ids, minlength=self.num_experts)

    @torch.no_grad()
    def post_step(self, ctx: DistContext) -> None:
        """After an optimizer step: all-reduce the counts over ranks, update the bias, zero the counts."""
        counts_E = ctx.all_reduce_sum(self.counts_E.clone()).to(self.bias_E.dtype)
        if counts_E.sum() > 0:
            self.bias_E += self.rate * torch.sign(counts_E.mean() - counts_E)
        self.counts_E.zero_()
