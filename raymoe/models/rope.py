"""Rotary position embedding (RoFormer, Su et al. 2021; GPT-NeoX's half-split layout).

Channel pairs (i, i + d/2) of each query and key head are rotated by the angle pos * base^(-2i/d), so
q_m . k_n depends on the positions only through m - n (relative positions, nothing to learn).

Shape legend: B batch, H heads, T positions, d head dim, F = d / 2 frequencies.
"""

from __future__ import annotations

import torch
from torch import nn

ROPE_BASE = 10000.0  # RoFormer / GPT-NeoX / LLaMA


class Rotary(nn.Module):
    """cos/sin tables for positions 0..max_len-1 (non-persistent buffers: rebuilt, never checkpointed)."""

    def __init__(self, head_dim: int, max_len: int, base: float = ROPE_BASE):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary positions need an even head dim, got {head_dim}")
        inv_freq_F = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles_TF = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq_F
        self.register_buffer("cos_TF", angles_TF.cos().float(), persistent=False)
        self.register_buffer("sin_TF", angles_TF.sin().float(), persistent=False)

    def forward(self, x_BHTd: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x rotated for positions offset .. offset + T - 1."""
        t = x_BHTd.shape[-2]
        cos_TF = self.cos_TF[offset:offset + t].to(x_BHTd.dtype)
        sin_TF = self.sin_TF[offset:offset + t].to(x_BHTd.dtype)
        x1, x2 = x_BHTd.chunk(2, dim=-1)
        return torch.cat([x1 * cos_TF - x2 * sin_TF, x1 * sin_TF + x2 * cos_TF], dim=-1)
