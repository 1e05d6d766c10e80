"""Dispatch/combine: move (item, expert) pairs to the rank that owns the expert and back.

One interface serves a single worker (LocalDispatcher) and an expert-parallel group (AllToAllDispatcher,
in all_to_all.py). Model code calls only `dispatch`, the experts' grouped forward and `combine`, and may read
`local_rows`: whether the grouped rows are this call's own pairs (single worker), so per-pair terms can be
applied to them before `combine`. Token-choice layers pass one row per item with `pairs_per_item` = k (pair p
belongs to item p // k) and the combine weights to `combine`, which returns each item's weighted sum: the k
copies of an item and its k output rows are never materialised in pair order (gather_pairs, scatter_pairs).

Shape legend: N items, K pairs per item, P (item, expert) pairs on this rank, p the kept pairs
(DispatchMeta.order_p), R rows received by this rank's experts, e local experts, X/Y feature dims (any trailing
shape).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


class _TakePairRows(torch.autograd.Function):
    """Rows x[item_p] where an item may repeat (its k pairs); backward sums each item's rows: one gather-sum
    (embedding_bag) over the item's k rows when every pair is kept, else an index_add."""

    @staticmethod
    def forward(fn_ctx, x: torch.Tensor, item_p: torch.Tensor, inverse_p: torch.Tensor | None, k: int):
        fn_ctx.save_for_backward(item_p, inverse_p)
        fn_ctx.num_items, fn_ctx.k = x.shape[0], k
        return x.index_select(0, item_p)

    @staticmethod
    def backward(fn_ctx, grad: torch.Tensor):
        item_p, inverse_p = fn_ctx.saved_tensors
        if inverse_p is None:
            dx = grad.new_zeros((fn_ctx.num_items, *grad.shape[1:])).index_add_(0, item_p, grad)
        else:  # item i's rows are inverse_p[i * k : (i + 1) * k]
            dx = F.embedding_bag(inverse_p.view(-1, fn_ctx.k), grad.flatten(1), mode="sum").view(
                fn_ctx.num_items, *grad.shape[1:])
        return dx, None, None, None


class _WeightedSumPairs(torch.autograd.Function):
    """y[i] = sum_j w[i, j] * rows[inverse_p[i * k + j]] for 2-D rows in `order_p` order, every pair kept: the
    put-back and the weighted sum in one pass (embedding_bag); backward gathers dy once for the rows and the
    weights' gradients."""

    @staticmethod
    def forward(fn_ctx, y_pY: torch.Tensor, w_NK: torch.Tensor, order_p: torch.Tensor, inverse_p: torch.Tensor):
        fn_ctx.save_for_backward(y_pY, w_NK, order_p)
        return F.embedding_bag(inverse_p.view_as(w_NK), y_pY, mode="sum", per_sample_weights=w_NK)

    @staticmethod
    def backward(fn_ctx, dy_NY: torch.Tensor):
        y_pY, w_NK, order_p = fn_ctx.saved_tensors
        dy_pY = dy_NY.index_select(0, order_p // w_NK.shape[1])  # each row gets its item's gradient
        dw_NK = None
        if fn_ctx.needs_input_grad[1]:  # d y[i] / d w[i, j] = row (i, j)
            dw_p = torch.linalg.vecdot(dy_pY, y_pY)
            dw_NK = torch.empty_like(dw_p).index_copy_(0, order_p, dw_p).view_as(w_NK)
        return dy_pY.mul_(w_NK.reshape(-1).index_select(0, order_p).unsqueeze(1)), dw_NK, None, None


def gather_pairs(x_NX: torch.Tensor, order_p: torch.Tensor, inverse_p: torch.Tensor | None,
                 pairs_per_item: int) -> torch.Tensor:
    """The rows of the kept pairs in `order_p` order, pair p being item p // pairs_per_item; differentiable."""
    if pairs_per_item == 1:
        return take_rows(x_NX, order_p, inverse_p)
    item_p = order_p // pairs_per_item
    if torch.is_grad_enabled() and x_NX.requires_grad:
        return _TakePairRows.apply(x_NX, item_p, inverse_p, pairs_per_item)
    return x_NX.index_select(0, item_p)


def scatter_pairs(y_pY: torch.Tensor, meta: "DispatchMeta", weights_NK: torch.Tensor | None = None) -> torch.Tensor:
    """Undo gather_pairs' order: one row per pair in pair order (zeros for dropped pairs), or with weights_NK
    (2-D rows) each item's weighted sum over its pairs; differentiable."""
    if weights_NK is None:
        return put_rows(y_pY, meta.order_p, meta.num_pairs, meta.inverse_p)
    w_NK = weights_NK.to(y_pY.dtype)
    if meta.inverse_p is not None:
        return _WeightedSumPairs.apply(y_pY, w_NK, meta.order_p, meta.inverse_p)
    n, k = w_NK.shape
    y_PY = put_rows(y_pY, meta.order_p, meta.num_pairs)  # dropped pairs are zero rows
    if k == 1:
        return y_PY * w_NK
    # one (1 x k) @ (k x Y) product per item: no N x k x Y temporary, forward or backward
    return torch.bmm(w_NK.unsqueeze(1), y_PY.view(n, k, -1)).squeeze(1)


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

    def dispatch(self, x_PX: torch.Tensor, experts_P: torch.Tensor | None, pairs_per_item: int = 1
                 ) -> tuple[torch.Tensor, list[int], DispatchMeta]:
        """Group rows by expert.

        Args:
            x_PX: one row per (item, expert) pair, or one row per item shared by its pairs_per_item pairs
                (pair p is item p // pairs_per_item); with experts_P None, one row per item.
            experts_P: global expert id per pair; -1 = dropped. None = dense: every expert takes every item.
            pairs_per_item: consecutive pairs per row of x_PX.
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
        return gather_pairs(x_PX, order, inverse, pairs_per_item), counts, meta

    def combine(self, y_RY: torch.Tensor, meta: DispatchMeta, weights_NK: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Return one output row per pair in the original pair order (zeros for dropped pairs), or with
        weights_NK (item-major pairs, 2-D rows) each item's weighted sum of its pairs' rows; dense: y (E, n, Y)
        from forward_dense as E * n expert-major rows."""
        if meta.dense:
            return y_RY.reshape(meta.num_pairs, *y_RY.shape[2:])
        return scatter_pairs(y_RY, meta, weights_NK)
