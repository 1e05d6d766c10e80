"""Collectives the training loop uses to see the GLOBAL batch: gathers with autograd, and gathering a ModelOutput.

Loss convention (see expert_parallel.sync_gradients): every rank computes the batch-level regularizer on the
same gathered global batch and adds regularizer / world_size to its loss. The backward of a gather therefore
sums, over all ranks, the gradient each rank's copy sent to a slice, and hands that sum to the slice's owner;
summing parameter gradients over ranks then reproduces the single-process gradient exactly.

Shape legend: N items on this rank (first dim), G items over all ranks, E experts, K chosen experts per item.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from raymoe.models.output import ModelOutput
from raymoe.moe.routing import GateResult
from raymoe.parallel.comm_meter import METER
from raymoe.parallel.context import DistContext


def _ring_bytes(t: torch.Tensor) -> int:
    """Bytes one rank sends in a ring all-reduce of t: 2 (W-1)/W of its size."""
    if not METER.enabled:
        return 0
    world = dist.get_world_size()
    return 2 * (world - 1) * t.numel() * t.element_size() // world


def _first_dims(t: torch.Tensor, ctx: DistContext) -> list[int]:
    """Every rank's first-dimension size (one tiny all_gather)."""
    mine = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, mine)
    return [int(s.item()) for s in sizes]


def _gather(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0; pads to the largest rank so uneven sizes work on gloo."""
    if t.dtype == torch.bool:  # gloo has no bool all_gather
        return _gather(t.to(torch.uint8), sizes).bool()
    longest = max(sizes)
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    with METER.measure(padded.numel() * padded.element_size() * (len(sizes) - 1)):
        dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


def in_graph(t: torch.Tensor) -> torch.Tensor:
    """In grad mode, make `t` part of the autograd graph (a leaf if needed) so this rank runs the backward
    collective even when its own tensor needs no gradient: peers block in it otherwise."""
    if torch.is_grad_enabled() and t.is_floating_point() and not t.requires_grad:
        return t.detach().requires_grad_()
    return t


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(fn_ctx, t: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        fn_ctx.sizes, fn_ctx.rank = sizes, rank
        return _gather(t.detach(), sizes)

    @staticmethod
    def backward(fn_ctx, grad_G: torch.Tensor):
        # Every rank used the whole gathered tensor: sum their gradients, keep this rank's slice.
        grad_G = grad_G.contiguous().clone()
        with METER.measure(_ring_bytes(grad_G)):
            dist.all_reduce(grad_G, op=dist.ReduceOp.SUM)
        lo = sum(fn_ctx.sizes[: fn_ctx.rank])
        return grad_G[lo: lo + fn_ctx.sizes[fn_ctx.rank]], None, None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(fn_ctx, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone().contiguous()
        with METER.measure(_ring_bytes(out)):
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(fn_ctx, grad: torch.Tensor):
        # d(sum_r t_r)/d t_mine = 1 on every rank's copy of the sum, so sum the upstream gradients.
        grad = grad.contiguous().clone()
        with METER.measure(_ring_bytes(grad)):
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_gather_autograd(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate `t` over ranks along dim 0 (rank order); gradients flow back to each rank's slice.

    Args:
        t: this rank's tensor; first dims may differ between ranks, the rest must match.
        ctx: the job's DistContext.
    Returns:
        The (G, ...) concatenation; `t` itself on a single process.
    """
    if not ctx.distributed:
        return t
    return _AllGather.apply(in_graph(t), _first_dims(t, ctx), ctx.rank)


def all_gather_nograd(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Like all_gather_autograd but detached (labels, ids, metrics)."""
    if not ctx.distributed:
        return t
    return _gather(t.detach(), _first_dims(t, ctx))


def all_reduce_sum_autograd(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum over ranks with autograd (for per-rank sums such as the smooth load load_E)."""
    if not ctx.distributed:
        return t
    return _AllReduceSum.apply(in_graph(t))


def gather_gate_result(gate: GateResult, ctx: DistContext) -> GateResult:
    """One GateResult for the global batch (items concatenated in rank order)."""
    load = None if gate.load_E is None else all_reduce_sum_autograd(gate.load_E, ctx)
    return GateResult(
        probs_NE=all_gather_autograd(gate.probs_NE, ctx),
        weights_NK=all_gather_autograd(gate.weights_NK, ctx),
        experts_NK=all_gather_nograd(gate.experts_NK, ctx),
        logits_NE=all_gather_autograd(gate.logits_NE, ctx),
        load_E=load,
    )


def gather_model_output(out: ModelOutput, ctx: DistContext) -> ModelOutput:
    """The ModelOutput one process would have produced on the global batch, for batch-level regularizers.

    Gate fields and log-probabilities are gathered with autograd; load_E and per-layer scalar stats are
    combined over ranks (load summed, scalar stats averaged: equal-sized rank batches make that the global
    value). aux_loss stays per rank: the model computes it from local items only.
    """
    if not ctx.distributed:
        return out
    stats = [{k: (_mean_scalar(v, ctx) if v.dim() == 0 else v) for k, v in layer.items()} for layer in out.layer_stats]
    return dataclasses.replace(
        out,
        log_probs_BC=all_gather_autograd(out.log_probs_BC, ctx),
        gates=[gather_gate_result(g, ctx) for g in out.gates],
        selected_pred_B=None if out.selected_pred_B is None else all_gather_nograd(out.selected_pred_B, ctx),
        layer_stats=stats,
    )


def _mean_scalar(v: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    total = v.detach().float().clone().reshape(1)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return (total / ctx.world_size).reshape(())
