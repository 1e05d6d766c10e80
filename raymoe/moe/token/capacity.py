"""Expert capacity and token dropping for token-choice routers (Switch / GShard).

capacity = ceil(capacity_factor * T * k / E) (T tokens in this forward, k choices per token, E experts).

Drop order (one fixed rule, GShard-style "first choices first"): each expert fills its slots with all
first choices before any second choice, and within one choice rank by token position (earlier tokens first).
Formally the (token n, choice j) pairs are ranked per expert by (j, n); the pairs ranked >= capacity are dropped.
A dropped pair gets expert id -1 and weight 0; the token then only passes through the block's residual (plus
shared experts / the HyperExpert, which ignore capacity).

Shape legend: N tokens, K choices per token, E experts, P = N * K pairs.
"""

from __future__ import annotations

import math

import torch


def token_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """Slots per expert: ceil(cf * T * k / E)."""
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def within_capacity(experts_NK: torch.Tensor, capacity: int, num_experts: int) -> torch.Tensor:
    """Which (token, choice) pairs fit in their expert's capacity under the documented order.

    Args:
        experts_NK: chosen expert ids (-1 = already dropped, stays dropped).
        capacity: slots per expert.
        num_experts: E.
    Returns:
        kept_NK, bool.
    """
    n, k = experts_NK.shape
    if capacity >= n * k:
        return experts_NK >= 0
    flat_P = experts_NK.t().reshape(-1)  # choice-major: all first choices (by position), then all second ...
    valid_P = flat_P >= 0
    keyed_P = torch.where(valid_P, flat_P, num_experts)  # -1 sorts last, into a bin of its own
    order_P = torch.argsort(keyed_P, stable=True)  # stable: keeps the (choice, position) order per expert
    counts = torch.bincount(keyed_P, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted_P = torch.arange(n * k, device=experts_NK.device) - starts[keyed_P[order_P]]
    rank_P = torch.empty_like(rank_sorted_P).scatter_(0, order_P, rank_sorted_P)
    kept_P = valid_P & (rank_P < capacity)
    return kept_P.view(k, n).t()
