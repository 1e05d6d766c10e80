"""Dense GELU feed-forward: the ViT's dense blocks and the always-on shared experts of DeepSeekMoE.

DeepSeekMoE (Dai et al. 2024): h = u + sum_{i<=K_s} FFN_i(u) + sum_{routed} g_i FFN_i(u). K_s shared experts of
hidden width d_ff are one FFN of width K_s * d_ff (DeepSeek-V3 `MLP(dim, n_shared_experts * moe_inter_dim)`).

Shape legend: N tokens (any leading dims), D model dim, F hidden dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    """GELU(x W1 + b1) W2 + b2."""

    def __init__(self, dim: int, d_ff: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, d_ff)
        self.fc2 = nn.Linear(d_ff, dim)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x_ND)))


def shared_experts(dim: int, d_ff: int, num_shared: int) -> FeedForward:
    """num_shared always-on experts of width d_ff, fused into one FFN of width num_shared * d_ff."""
    if num_shared < 1:
        raise ValueError(f"num_shared must be >= 1, got {num_shared}")
    return FeedForward(dim, num_shared * d_ff)
