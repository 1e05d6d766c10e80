"""Dispatch/combine: move (item, expert) pairs to the rank that owns the expert and back.

One interface serves a single worker (LocalDispatcher) and an expert-parallel group (AllToAllDispatcher,
in all_to_all.py). Model code calls only `dispatch`, the experts' grouped forward and `combine`, and may read
`local_rows`: whether the grouped rows are this call's own pairs (single worker), so per-pair terms can be
applied to them before `combine`.

Shape legend: P (item, expert) pairs on this rank, p the kept pairs (DispatchMeta.order_p), R rows received by
this rank's experts,
e local experts, X/Y feature dims (any trailing shape).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class _TakeRows(torch.autograd.Function):
    """x[idx] for UNIQUE row indices: backward scatters with index_copy (parallel) instead of the serial
    accumulating index_put of x[idx]'s backward, and with a gather when idx is a full permutation (no zero fill)."""

    @staticmethod
    def forward(fn_ctx, x: torch.Tensor, idx: torch.Tensor, inverse: torch.Tensor | None) -> torch.Tensor:
        fn_ctx.save_for_backward(idx, inverse)
        fn_ctx.num_rows = x.shape[0]
        return x.index_select(0, idx)

    @staticmethod
    def backward(fn_ctx, grad: torch.Tensor):
        idx, inverse = fn_ctx.saved_tensors
        return _put_rows(grad, idx, inverse, fn_ctx.num_rows), None, None


def _put_rows(y: torch.Tensor, idx: torch.Tensor, inverse: torch.Tensor | None, num_rows: int) -> torch.Tensor:
    """out[idx] = y, other rows 0 (no autograd); `inverse` given when idx is a full permutation."""
    if inverse is not None:
        return y.index_select(0, inverse)
    return y.new_zeros((num_rows, *y.shape[1:])).index_copy_(0, idx, y)


class _PutRows(torch.autograd.Function):
    """The adjoint of _TakeRows: rows of y placed at idx of a num_rows tensor; backward is a gather."""

    @staticmethod
    def forward(fn_ctx, y: torch.Tensor, idx: torch.Tensor, inverse: torch.Tensor | None, num_rows: int):
        fn_ctx.save_for_backward(idx)
        return _put_rows(y, idx, inverse, num_rows)

    @staticmethod
    def backward(fn_ctx, grad: torch.Tensor):
        (idx,) = fn_ctx.saved_tensors
        return grad.index_select(0, idx), None, None, None


def inverse_permutation(idx: torch.Tensor, num_rows: int) -> torch.Tensor | None:
    """argsort of idx when idx (unique indices) covers all num_rows rows, else None."""
    if idx.numel() != num_rows:
        return None
    return torch.empty_like(idx).index_copy_(0, idx, torch.arange(num_rows, device=idx.device))


def take_rows(x: torch.Tensor, idx: torch.Tensor, inverse: torch.Tensor | None = None) -> torch.Tensor:
    """x[idx] for unique indices idx, differentiable; pass inverse_permutation(idx) when idx is a permutation."""
    return _TakeRows.apply(x, idx, inverse) if torch.is_grad_enabled() and x.requires_grad else x.index_select(0, idx)


def put_rows(y: torch.Tensor, idx: torch.Tensor, num_rows: int, inverse: torch.Tensor | None = None) -> torch.Tensor:
    """A num_rows tensor with row idx[i] = y[i] and zeros elsewhere (unique idx), differentiable."""
    if torch.is_grad_enabled() and y.requires_grad:
        return _PutRows.apply(y, idx, inverse, num_rows)
    return _put_rows(y, idx, inverse, num_rows)


@dataclass(slots=True)
class DispatchMeta:
    """What `combine` needs to undo `dispatch`. Fields beyond `order_p` are dispatcher-specific."""

    order_p: torch.Tensor  # permutation that sorted this rank's kept pairs by destination expert
    kept_P: torch.Tensor  # bool mask: pairs with expert id >= 0 (dropped pairs get zero output)
    num_pairs: int
    extra: dict | None = None
    inverse_p: torch.Tensor | None = None  # inverse of order_p when no pair was dropped
    dense: bool = False  # every expert saw every item (dispatch without expert ids)

    @classmethod
    def for_dense(cls, x: torch.Tensor, num_pairs: int, extra: dict | None = None) -> "DispatchMeta":
        """The meta of a dense dispatch: no pair order, every (expert, item) pair kept."""
        return cls(order_p=x.new_empty(0, dtype=torch.long), kept_P=x.new_ones(0, dtype=torch.bool),
                   num_pairs=num_pairs, extra=extra, dense=True)


def sort_pairs(experts_P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(kept_P, order, inverse): the kept pairs (expert id >= 0) in a stable sort by expert id, and the inverse
    of that order when no pair was dropped."""
    kept_P = experts_P >= 0
    kept_idx = kept_P.nonzero().squeeze(1)
    order = kept_idx[torch.argsort(experts_P[kept_idx], stable=True)]
    return kept_P, order, inverse_permutation(order, experts_P.numel())


class LocalDispatcher:
    """Single worker: all experts are local; dispatch is a stable sort by expert id."""

    # the grouped rows are this call's own kept pairs in the order meta.order_p, so a caller may apply per-pair
    # terms to them before combine (an all-to-all dispatcher's rows come from every rank)
    local_rows = True

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.ep_rank, self.ep_size = 0, 1

    @property
    def local_experts(self) -> range:
        per_rank = self.num_experts // self.ep_size
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)

    def dispatch(self, x_PX: torch.Tensor, experts_P: torch.Tensor | None
                 ) -> tuple[torch.Tensor, list[int], DispatchMeta]:
        """Group rows by expert.

        Args:
            x_PX: one row per (item, expert) pair; with experts_P None, one row per item.
            experts_P: global expert id per row; -1 = dropped. None = dense: every expert takes every item.
        Returns:
            x_RX rows grouped by local expert (expert-major), counts per local expert (python ints), meta.
            Dense: the G rows every local expert takes (experts.forward_dense), counts [G] * local experts.
        """
        if experts_P is None:
            n = x_PX.shape[0]
            return x_PX, [n] * self.num_experts, DispatchMeta.for_dense(x_PX, self.num_experts * n)
        kept_P, order, inverse = sort_pairs(experts_P)
        counts = torch.bincount(experts_P[order], minlength=self.num_experts).tolist()
        meta = DispatchMeta(order_p=order, kept_P=kept_P, num_pairs=experts_P.numel(), inverse_p=inverse)
        return take_rows(x_PX, order, inverse), counts, meta

    def combine(self, y_RY: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        """Return one output row per pair in the original pair order (zeros for dropped pairs); dense: y (E, n, Y)
        from forward_dense as E * n expert-major rows."""
        if meta.dense:
            return y_RY.reshape(meta.num_pairs, *y_RY.shape[2:])
        return put_rows(y_RY, meta.order_p, meta.num_pairs, meta.inverse_p)
