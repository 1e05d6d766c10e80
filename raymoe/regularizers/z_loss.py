"""Router z-loss (Zoph et al. 2022, ST-MoE eq. 5): mean over items of logsumexp(logits)^2."""

from __future__ import annotations

import torch

from raymoe.moe.routing import GateResult


def router_z_loss(gate: GateResult) -> torch.Tensor:
    return torch.logsumexp(gate.logits_NE.float(), dim=-1).pow(2).mean()
