"""Load loss (Shazeer et al. 2017, eq. 11): CV(load)^2 with the noisy top-k gate's smooth load estimate."""

from __future__ import annotations

import torch

from raymoe.moe.routing import GateResult
from raymoe.regularizers.importance import coefficient_of_variation_sq


def load_loss(gate: GateResult) -> torch.Tensor:
    """CV(load_E)^2; load_E is the differentiable expected load (only noisy top-k gates provide it)."""
    if gate.load_E is None:
        raise ValueError("the load loss needs a gate with a smooth load estimate (gate.kind noisy_topk)")
    return coefficient_of_variation_sq(gate.load_E)
