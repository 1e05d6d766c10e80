"""Running a stack of transformer blocks whose FFNs may be token MoE layers (shared by the ViT and the GPT)."""

from __future__ import annotations

import torch
from torch import nn


def run_blocks(blocks: nn.ModuleList, x_BTD: torch.Tensor) -> tuple[torch.Tensor, list, list]:
    """x through every block; each block returns (x, None) or (x, (GateResult, stats)) for a MoE FFN.

    Returns:
        (x_BTD, one GateResult per MoE layer, one stats dict per MoE layer), in block order.
    Shape legend: B sequences, T tokens, D model dim.
    """
    gates, stats = [], []
    for block in blocks:
        x_BTD, moe = block(x_BTD)
        if moe is not None:
            gates.append(moe[0])
            stats.append(moe[1])
    return x_BTD, gates, stats
