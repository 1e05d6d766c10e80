"""Dispatch/combine: move (item, expert) pairs to the rank that owns the expert and back.

One interface serves a single worker (LocalDispatcher) and an expert-parallel group (AllToAllDispatcher,
in all_to_all.py). Model code calls only `dispatch`, the experts' grouped forward and `combine`.

Shape legend: P (item, expert) pairs on this rank, R rows received by this rank's experts,
e local experts, X/Y feature dims (any trailing shape).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class DispatchMeta:
    """What `combine` needs to undo `dispatch`. Fields beyond `order_P` are dispatcher-specific."""

    order_P: torch.Tensor  # permutation that sorted this rank's kept pairs by destination expert
    kept_P: torch.Tensor  # bool mask: pairs with expert id >= 0 (dropped pairs get zero output)
    num_pairs: int
    extra: dict | None = None


class LocalDispatcher:
    """Single worker: all experts are local; dispatch is a stable sort by expert id."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.ep_rank, self.ep_size = 0, 1

    @property
    def local_experts(self) -> range:
        per_rank = self.num_experts // self.ep_size
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)

    def dispatch(self, x_PX: torch.Tensor, experts_P: torch.Tensor) -> tuple[torch.Tensor, list[int], DispatchMeta]:
        """Group rows by expert.

        Args:
            x_PX: one row per (item, expert) pair.
            experts_P: global expert id per row; -1 = dropped.
        Returns:
            x_RX rows grouped by local expert (expert-major), counts per local expert (python ints), meta.
        """
        kept_P = experts_P >= 0
        kept_idx = kept_P.nonzero().squeeze(1)
        order = kept_idx[torch.argsort(experts_P[kept_idx], stable=True)]
        counts = torch.bincount(experts_P[order], minlength=self.num_experts).tolist()
        return x_PX[order], counts, DispatchMeta(order_P=order, kept_P=kept_P, num_pairs=experts_P.numel())

    def combine(self, y_RY: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        """Return one output row per pair in the original pair order (zeros for dropped pairs)."""
        out = y_RY.new_zeros((meta.num_pairs, *y_RY.shape[1:]))
        return out.index_copy(0, meta.order_P, y_RY)
