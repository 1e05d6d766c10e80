"""Switch Transformer load balancing (Fedus et al. 2021, eq. 4) without its alpha: E * sum_e f_e P_e.

f_e: fraction of items whose first choice (experts_NK[:, 0]) is expert e, not differentiable;
P_e: mean gate probability of expert e, differentiable. Equals 1 when routing is perfectly uniform.
"""

from __future__ import annotations

import torch

from raymoe.moe.routing import GateResult


def switch_balance_loss(gate: GateResult) -> torch.Tensor:
    n, e = gate.probs_NE.shape
    first_N = gate.experts_NK[:, 0]
    first_N = torch.where(first_N >= 0, first_N, gate.top1_N)  # an item dropped by capacity still chose an expert
    f_E = torch.bincount(first_N, minlength=e).to(gate.probs_NE.dtype) / max(n, 1)
    p_E = gate.probs_NE.mean(0)
    return e * (f_E * p_E).sum()
