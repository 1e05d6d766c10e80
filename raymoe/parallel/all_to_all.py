"""Expert-parallel dispatch/combine: variable-size all-to-all of (item, expert) pairs within an EP group.

Same interface as LocalDispatcher. Dense gates (every item paired with every expert) make each rank run its
local experts on the whole EP group's batch; sparse gates send an item only to the ranks owning its experts.
Dropless: every kept pair travels; dropped pairs (expert id -1) never leave the rank and combine to zeros.

Layouts (e = local expert, s = source rank), after torchtitan's token dispatcher:
    sent by a rank     : pairs sorted by global expert = destination-rank-major, local-expert-minor
    received (all2all) : source-major  (s0,e0) (s0,e1) ... (s1,e0) (s1,e1) ...
    fed to the experts : expert-major  (e0,s0) (e0,s1) ... (e1,s0) (e1,s1) ...   (stable, so s keeps its order)

Collectives in backward must run on every rank in the same order, so whether an exchange has a backward may
never depend on this rank's data alone: a rank whose experts got no rows (their output is a fresh tensor), or
whose rows need no gradient while a peer's do, still takes part (its tensors become graph leaves); the need for a
backward of the dispatch is agreed on with the count exchange, the combine always has one in grad mode.

Shape legend: P pairs on this rank, p kept pairs in send order, R rows received, E experts, e local experts, W EP ranks,
X/Y feature dims (any trailing shape).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from raymoe.moe.dispatch import (DispatchMeta, gather_pairs, inverse_permutation, put_rows, scatter_pairs,
                                 sort_pairs, take_rows)
from raymoe.parallel.collectives import in_graph
from raymoe.parallel.comm_meter import METER


def _remote_bytes(rows: torch.Tensor, splits: list[int], group) -> int:
    """Bytes of `rows` that leave this rank (the split addressed to itself stays local)."""
    if not METER.enabled:
        return 0
    row_bytes = rows[0].numel() * rows.element_size() if rows.shape[0] else 0
    return (sum(splits) - splits[dist.get_rank(group)]) * row_bytes


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with autograd: the backward is the reverse exchange of the gradient rows."""

    @staticmethod
    def forward(fn_ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        fn_ctx.out_splits, fn_ctx.in_splits, fn_ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        with METER.measure(_remote_bytes(x, in_splits, group)):
            dist.all_to_all_single(out, x.detach().contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(fn_ctx, grad: torch.Tensor):
        back = grad.new_empty((sum(fn_ctx.in_splits), *grad.shape[1:]))
        with METER.measure(_remote_bytes(grad, fn_ctx.out_splits, fn_ctx.group)):
            dist.all_to_all_single(back, grad.contiguous(), fn_ctx.in_splits, fn_ctx.out_splits, group=fn_ctx.group)
        return back, None, None, None


def all_to_all_autograd(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    """Send in_splits[r] leading rows of `x` (in order) to rank r of `group`; receive out_splits[r] from rank r."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class AllToAllDispatcher:
    """Experts split evenly over an EP group of ep_size ranks; this rank owns local_experts."""

    local_rows = False  # the grouped rows come from every rank of the group (see LocalDispatcher.local_rows)

    def __init__(self, num_experts: int, ep_rank: int, ep_size: int, group=None):
        if num_experts % ep_size:
            raise ValueError(f"num_experts ({num_experts}) is not divisible by the EP degree ({ep_size})")
        self.num_experts, self.ep_rank, self.ep_size, self.group = num_experts, ep_rank, ep_size, group
        self.per_rank = num_experts // ep_size

    @property
    def local_experts(self) -> range:
        return range(self.ep_rank * self.per_rank, (self.ep_rank + 1) * self.per_rank)

    def dispatch(self, x_PX: torch.Tensor, experts_P: torch.Tensor | None, pairs_per_item: int = 1
                 ) -> tuple[torch.Tensor, list[int], DispatchMeta]:
        """Send each kept pair to the rank owning its expert; return rows grouped by local expert.

        Args:
            x_PX: one row per (item, expert) pair, or one row per item shared by its pairs_per_item pairs
                (pair p is item p // pairs_per_item).
            experts_P: global expert id per pair; -1 = dropped. None = dense: every expert takes every item
                (x_PX then holds one row per item).
            pairs_per_item: consecutive pairs per row of x_PX.
        Returns:
            x_RX rows from the whole EP group grouped by local expert, counts per local expert (python ints), meta.
            Dense: the EP group's items in rank order (each sent once, not once per expert), for forward_dense.
        """
        if experts_P is None:
            return self._dispatch_dense(x_PX)
        kept_P, order_p, inverse_p = sort_pairs(experts_P)
        send_E = torch.bincount(experts_P[order_p], minlength=self.num_experts)
        # 1) counts: rank w learns how many rows each source sends to each of its local experts, plus whether
        # any source's rows need gradients (then every rank must run the backward exchange, see module doc)
        wants_grad = torch.is_grad_enabled() and x_PX.requires_grad
        send_We1 = torch.cat([send_E.view(self.ep_size, self.per_rank),
                              send_E.new_full((self.ep_size, 1), int(wants_grad))], dim=1)
        recv_We1 = torch.empty_like(send_We1)
        with METER.measure(send_We1.numel() * send_We1.element_size() * (self.ep_size - 1) // self.ep_size):
            dist.all_to_all_single(recv_We1, send_We1, group=self.group)
        recv_We = recv_We1[:, :self.per_rank]
        dispatch_grad = bool(recv_We1[:, -1].any()) or wants_grad
        send_splits = send_E.view(self.ep_size, self.per_rank).sum(1).tolist()
        recv_splits = recv_We.sum(1).tolist()
        # 2) rows: variable-size exchange, differentiable
        x_pX = gather_pairs(x_PX, order_p, inverse_p, pairs_per_item)
        if dispatch_grad:  # this rank's rows may need no gradient while its peers' do
            x_pX = in_graph(x_pX)
        x_RX = all_to_all_autograd(x_pX, recv_splits, send_splits, self.group)
        # 3) source-major -> local-expert-major (stable sort by local expert keeps sources in rank order)
        local_id_R = torch.arange(self.per_rank, device=x_PX.device).repeat(self.ep_size)
        local_id_R = local_id_R.repeat_interleave(recv_We.flatten())
        regroup_R = torch.argsort(local_id_R, stable=True)
        counts = recv_We.sum(0).tolist()
        inverse_R = inverse_permutation(regroup_R, regroup_R.numel())
        x_RX = take_rows(x_RX, regroup_R, inverse_R)
        meta = DispatchMeta(order_p=order_p, kept_P=kept_P, num_pairs=experts_P.numel(), inverse_p=inverse_p,
                            extra={"send_splits": send_splits, "recv_splits": recv_splits, "regroup_R": regroup_R,
                                   "inverse_R": inverse_R, "x_RX": x_RX if dispatch_grad else None})
        return x_RX, counts, meta

    def _dispatch_dense(self, x_NX: torch.Tensor) -> tuple[torch.Tensor, list[int], DispatchMeta]:
        """Every rank of the EP group gets every rank's items once (an all-gather through all_to_all)."""
        n, w = x_NX.shape[0], self.ep_size
        wants_grad = torch.is_grad_enabled() and x_NX.requires_grad
        send_W2 = torch.tensor([[n, int(wants_grad)]] * w, dtype=torch.long, device=x_NX.device)
        recv_W2 = torch.empty_like(send_W2)
        with METER.measure(send_W2.numel() * send_W2.element_size() * (w - 1) // w):
            dist.all_to_all_single(recv_W2, send_W2, group=self.group)
        sizes = recv_W2[:, 0].tolist()
        dispatch_grad = bool(recv_W2[:, 1].any()) or wants_grad
        x_pX = x_NX.unsqueeze(0).expand(w, *x_NX.shape).reshape(w * n, *x_NX.shape[1:])  # my items to each rank
        if dispatch_grad:  # see the module docstring
            x_pX = in_graph(x_pX)
        x_GX = all_to_all_autograd(x_pX, sizes, [n] * w, self.group)
        meta = DispatchMeta.for_dense(x_NX, self.num_experts * n,
                                      extra={"sizes": sizes, "n": n, "x_RX": x_GX if dispatch_grad else None})
        return x_GX, [x_GX.shape[0]] * self.per_rank, meta

    def _combine_dense(self, y_eGY: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        """(local experts, G items, Y) -> each source rank's items back: (E * n) expert-major rows."""
        sizes, n, e = meta.extra["sizes"], meta.extra["n"], self.per_rank
        y_pY = torch.cat([part.reshape(e * part.shape[1], *part.shape[2:]) for part in y_eGY.split(sizes, dim=1)])
        y_PY = all_to_all_autograd(y_pY, [e * n] * self.ep_size, [e * b for b in sizes], self.group)
        return y_PY  # rank r's block is its experts r*e .. r*e+e-1 over my n items: global expert-major

    def combine(self, y_RY: torch.Tensor, meta: DispatchMeta, weights_NK: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Send expert outputs back; return one row per pair in the original order (zeros for dropped pairs), or
        with weights_NK each item's weighted sum of its pairs' rows (LocalDispatcher.combine).
        Dense: y (local experts, G, Y) from forward_dense -> (E * n) expert-major rows of this rank's items."""
        extra = meta.extra
        if torch.is_grad_enabled():
            x_RX = extra["x_RX"]
            if x_RX is not None and (y_RY.shape[0] == 0 or not y_RY.requires_grad):
                # experts given no rows may return a fresh tensor: keep the dispatch exchange in the graph
                y_RY = y_RY + x_RX.sum() * 0
            y_RY = in_graph(y_RY)  # peers' outputs need the backward exchange
        if meta.dense:
            return self._combine_dense(y_RY, meta)
        y_src_RY = put_rows(y_RY, extra["regroup_R"], y_RY.shape[0], extra["inverse_R"])  # undo step 3
        y_pY = all_to_all_autograd(y_src_RY, extra["send_splits"], extra["recv_splits"], self.group)
        return scatter_pairs(y_pY, meta, weights_NK)
