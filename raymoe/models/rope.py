"""Rotary position embedding (RoFormer, Su et al. 2021; GPT-NeoX's half-split layout).

Channel pairs (i, i + d/2) of each query and key head are rotated by the angle pos * base^(-2i/d), so
q_m . k_n depends on the positions only through m - n (relative positions, nothing to learn).

Shape legend: B sequences, h heads, T positions, d head width, f = d / 2 frequencies.
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
        inv_freq_f = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles_Tf = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq_f
        self.register_buffer("cos_Tf", angles_Tf.cos().float(), persistent=False)
        self.register_buffer("sin_Tf", angles_Tf.sin().float(), persistent=False)

    def forward(self, x_BhTd: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x rotated for positions offset .. offset + T - 1."""
        t = x_BhTd.shape[-2]
        cos_Tf = self.cos_Tf[offset:offset + t].to(x_BhTd.dtype)
        sin_Tf = self.sin_Tf[offset:offset + t].to(x_BhTd.dtype)
        x1, x2 = x_BhTd.chunk(2, dim=-1)
        return torch.cat([x1 * cos_Tf - x2 * sin_Tf, x1 * sin_Tf + x2 * cos_Tf], dim=-1)
