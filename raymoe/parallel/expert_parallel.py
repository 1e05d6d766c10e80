"""Apply expert parallelism to a single-device model from the outside, and synchronise its gradients.

The model is written for one process: ExpertStack submodules hold all experts and `dispatcher` attributes hold a
LocalDispatcher. `apply_expert_parallel` shards each stack over the EP group and swaps in an AllToAllDispatcher;
everything else stays replicated (data parallel). `sync_gradients` then sums gradients over the right ranks.

Loss convention that makes the summed gradient equal the single-process gradient: on each rank
    loss_local = sum of this rank's per-sample losses / GLOBAL batch size + regularizer(global batch) / world_size
(the regularizer sees the gathered global batch, see collectives.gather_model_output).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from raymoe.errors import ConfigError
from raymoe.moe.dispatch import LocalDispatcher
from raymoe.moe.expert_stack import ExpertStack, expert_parameter_names
from raymoe.parallel.all_to_all import AllToAllDispatcher
from raymoe.parallel.batchnorm import globalize_batchnorm
from raymoe.parallel.comm_meter import METER
from raymoe.parallel.context import DistContext

_BUCKET_BYTES = 64 * 2**20  # one all-reduce per 64 MiB of gradients
_GROUPS: dict[tuple, tuple] = {}  # (world group id, world, ep) -> (ep_group, replica_group) of this rank


def ensure_groups(ctx: DistContext) -> DistContext:
    """Create the EP and replica process groups once (collective: every rank must call it) and store them in ctx."""
    if not ctx.distributed or ctx.ep_group is not None or ctx.replica_group is not None:
        return ctx
    world, ep = ctx.world_size, ctx.ep_size
    if world % ep:
        raise ConfigError("scaling.expert_parallel", ep, f"must divide the number of workers ({world})")
    key = (id(dist.group.WORLD), world, ep)
    if key not in _GROUPS:
        ep_group = replica_group = None  # None = the default (world) group
        if 1 < ep < world:
            for k in range(world // ep):  # new_group is collective: create every group, keep ours
                g = dist.new_group(list(range(k * ep, (k + 1) * ep)))
                ep_group = g if k == ctx.replica_index else ep_group
        if 1 < ep < world:
            for j in range(ep):
                g = dist.new_group(list(range(j, world, ep)))
                replica_group = g if j == ctx.ep_rank else replica_group
        _GROUPS[key] = (ep_group, replica_group)
    ctx.ep_group, ctx.replica_group = _GROUPS[key]
    return ctx


def _expert_stacks(model: nn.Module) -> list[tuple[str, ExpertStack]]:
    """Outermost ExpertStack submodules with their qualified names."""
    found: list[tuple[str, ExpertStack]] = []
    for name, module in model.named_modules():
        if isinstance(module, ExpertStack) and not any(name.startswith(f"{n}.") for n, _ in found):
            found.append((name, module))
    return found


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_expert_parallel(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Shard the experts over the EP group, keep the rest data parallel (call before building the optimizer).

    Also, when world_size > 1: BatchNorm outside the experts becomes GlobalBatchNorm (global-batch statistics,
    exact vs one process), and replicated state is broadcast from rank 0 (expert shards from replica 0) so
    every copy starts identical.

    Args:
        model: the single-device model (ExpertStack submodules, LocalDispatcher `dispatcher` attributes).
        ctx: where this rank sits; ctx.ep_size is the EP degree.
    Returns:
        The same model object, modified in place.
    Raises:
        ConfigError: the EP degree does not divide an expert count, or the model has no experts to shard.
    """
    stacks = _expert_stacks(model)
    ep = ctx.ep_size
    if ep > 1 and not stacks:
        raise ConfigError("scaling.expert_parallel", ep, "this model has no experts to shard; use 1")
    for name, stack in stacks:
        if stack.num_local != stack.num_experts:
            raise ValueError(f"{name or 'model'} is already sharded ({stack.num_local} of {stack.num_experts} experts)")
        if stack.num_experts % ep:
            raise ConfigError("scaling.expert_parallel", ep,
                              f"must divide the number of experts ({stack.num_experts} in {name or 'the model'}) so "
                              f"each rank owns num_experts / expert_parallel experts")
    if not ctx.distributed:
        if ep > 1:
            raise ConfigError("scaling.expert_parallel", ep, "needs at least that many workers (got 1 process)")
        return model
    ensure_groups(ctx)
    if ep > 1:
        for name, stack in stacks:
            _set_submodule(model, name, stack.shard(ctx.ep_rank, ep))
        for module in model.modules():
            local = getattr(module, "dispatcher", None)
            if isinstance(local, LocalDispatcher):
                module.dispatcher = AllToAllDispatcher(local.num_experts, ctx.ep_rank, ep, ctx.ep_group)
    globalize_batchnorm(model, skip=(ExpertStack,))
    broadcast_state(model, ctx)
    return model


def broadcast_state(model: nn.Module, ctx: DistContext) -> None:
    """Copy replicated parameters/buffers from rank 0 and expert shards from their replica-0 rank."""
    if not ctx.distributed:
        return
    expert_ids = _expert_tensor_ids(model)
    replicated = [t for t in _state_tensors(model) if id(t) not in expert_ids]
    experts = [t for t in _state_tensors(model) if id(t) in expert_ids]
    for bucket in _buckets(replicated):
        _broadcast_flat(bucket, src=0, group=None)
    if ctx.num_replicas > 1:
        group = ctx.replica_group if ctx.ep_size > 1 else None
        for bucket in _buckets(experts):
            _broadcast_flat(bucket, src=ctx.ep_rank, group=group)


def sync_gradients(model: nn.Module, ctx: DistContext) -> None:
    """Sum gradients over the ranks that hold the same parameter (call after backward, before the step).

    Non-expert parameters: SUM over the world. Expert parameters: SUM over their replica group only (never
    across the EP group: other EP ranks hold different experts). Summing, not averaging, matches the loss
    convention in this module's docstring. Parameters without a gradient count as zero on that rank.
    """
    if not ctx.distributed:
        return
    expert_names = expert_parameter_names(model)
    dense, expert = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (expert if name in expert_names else dense).append(p)
    for bucket in _buckets(dense):
        _all_reduce_grads(bucket, group=None)
    if ctx.num_replicas > 1:
        group = ctx.replica_group if ctx.ep_size > 1 else None
        for bucket in _buckets(expert):
            _all_reduce_grads(bucket, group=group)


def _expert_tensor_ids(model: nn.Module) -> set[int]:
    ids = set()
    for _, stack in _expert_stacks(model):
        ids.update(id(t) for t in stack.parameters())
        ids.update(id(t) for t in stack.buffers())
    return ids


def _state_tensors(model: nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Group tensors of one dtype/device into buckets of at most _BUCKET_BYTES (collective-friendly order)."""
    by_kind: dict[tuple, list[list[torch.Tensor]]] = {}
    filled: dict[tuple, int] = {}
    for t in tensors:
        kind, nbytes = (t.dtype, t.device), t.numel() * t.element_size()
        lists = by_kind.setdefault(kind, [[]])
        if lists[-1] and filled.get(kind, 0) + nbytes > _BUCKET_BYTES:
            lists.append([])
            filled[kind] = 0
        lists[-1].append(t)
        filled[kind] = filled.get(kind, 0) + nbytes
    return [b for lists in by_kind.values() for b in lists if b]


def _all_reduce_grads(params: list[torch.Tensor], group) -> None:
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    ranks = dist.get_world_size(group)
    with METER.measure(2 * (ranks - 1) * flat.numel() * flat.element_size() // ranks):  # ring all-reduce
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for p in params:
        n = p.numel()
        chunk = flat[offset: offset + n].view_as(p)
        if p.grad is None:
            p.grad = chunk.clone()
        else:
            p.grad.copy_(chunk)
        offset += n


@torch.no_grad()
def _broadcast_flat(tensors: list[torch.Tensor], src: int, group) -> None:
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.broadcast(flat, src=src, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()
