"""Importance loss (Shazeer et al. 2017; docs/paper-notes.md §3.2): CV(sum_n g(x_n))^2 with the unbiased std."""

from __future__ import annotations

import torch

from raymoe.moe.routing import GateResult


def coefficient_of_variation_sq(x_E: torch.Tensor) -> torch.Tensor:
    """(std/mean)^2 with torch.std's unbiased estimator, as the reference `loss_importance`; 0 for one expert."""
    if x_E.numel() < 2:
        return x_E.new_zeros(())
    return (x_E.std() / x_E.mean()) ** 2


def combine_weights_NE(gate: GateResult) -> torch.Tensor:
    """Each item's combine weight per expert (0 where not chosen). Dense gates: exactly probs_NE."""
    if gate.weights_NK is gate.probs_NE:
        return gate.probs_NE
    kept_NK = gate.experts_NK >= 0
    out_NE = gate.probs_NE.new_zeros(gate.probs_NE.shape)
    return out_NE.scatter_add(1, gate.experts_NK.clamp_min(0), torch.where(kept_NK, gate.weights_NK, 0.0))


def importance_loss(gate: GateResult) -> torch.Tensor:
    """CV(Imp)^2 with Imp_e = sum_n G_e(x_n), G the gate values the experts are combined with.

    For the paper's dense gates G = g (docs/paper-notes.md §3.2); for sparse gates G is the top-k weights, zero elsewhere,
    as in Shazeer et al. (their Importance sums the sparse gate values).
    """
    return coefficient_of_variation_sq(combine_weights_NE(gate).sum(0))
