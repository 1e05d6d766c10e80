"""The typed result every gate and router returns, for sample-level and token-level MoE alike.

Shape legend: N items routed (samples or tokens), E experts, K experts chosen per item.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class GateResult:
    """What a gate decided for N items.

    probs_NE: the full gate distribution (softmax over all experts); used by the metrics and importance.
    weights_NK: combine weight of each chosen expert (dense gates: K = E, weights_NK = probs_NE).
    experts_NK: chosen global expert ids, long; -1 marks a slot dropped by capacity (its weight is 0).
    logits_NE: pre-softmax router logits (router z-loss).
    load_E: differentiable expected load (noisy top-k, Shazeer 2017 eq. 9-10), else None.
    """

    probs_NE: torch.Tensor
    weights_NK: torch.Tensor
    experts_NK: torch.Tensor
    logits_NE: torch.Tensor
    load_E: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.probs_NE.shape[-1]

    @property
    def top1_N(self) -> torch.Tensor:
        """The expert each item is assigned to for the specialization metrics (argmax of the gate)."""
        return self.probs_NE.argmax(dim=-1)


def standard_normal(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """N(0, 1) noise shaped like `like` (a noisy gate's logits), from `generator` when one is given (it must live on
    like's device); without one it draws from torch's default generator exactly as torch.randn_like does."""
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)

