"""One training epoch and one evaluation pass: the hot loop, shared by `train_fn` and `raymoe bench train`.

Loss scaling for data parallelism: every rank holds a slice of each GLOBAL batch and gradients are SUM
all-reduced, so the local loss is sum(NLL on this rank) / global batch size (summing over ranks gives the
global mean), and terms computed identically on every rank (the regularizer on the gathered gate outputs)
are divided by the world size.
Shape legend: B samples on this rank, C classes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.config.schema import RegularizerConfig
from raymoe.parallel.context import DistContext


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; training stops and the MLflow run is marked FAILED."""


@dataclass
class EpochResult:
    """Training-set numbers of one epoch, identical on every rank.

    error: 1 - accuracy of the forward pass of each step (before its optimizer step), sample-weighted over
    the epoch; costs nothing extra. The reference averages per-batch accuracies measured after each step with
    an extra no-grad pass (error_after_step).
    """

    loss: float  # mean NLL per training sample (no regularizer)
    error: float
    samples: int
    steps: int
    seconds: float
    data_seconds: float  # time spent waiting for batches (the data pipeline's share of step time)
    # unweighted regularizer terms, mean over steps (with no regularizer weighted and several ranks: rank-local)
    parts: dict[str, float] = field(default_factory=dict)


def regularizer_active(reg: RegularizerConfig) -> bool:
    ss = reg.sample_similarity
    return any(w > 0 for w in (reg.importance, reg.load, reg.load_balance, reg.z_loss, ss.beta_s, ss.beta_d))


def post_step_hooks(model: nn.Module) -> list[nn.Module]:
    """Modules with a `post_step(ctx)` (e.g. aux-loss-free bias balancing), called after each optimizer step."""
    return [m for m in model.modules() if callable(getattr(m, "post_step", None))]


def set_eval_mode(model: nn.Module, bn_eval: bool) -> None:
    """model.eval(); with bn_eval False BatchNorm keeps batch statistics at test, as the reference code did
    (it never called eval(); paper reference §7.7). Gate noise and jitter stay off either way."""
    model.eval()
    if not bn_eval:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train()


def step_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, reg_cfg: RegularizerConfig, ctx: DistContext,
              global_n: int, use_reg: bool | None = None):
    """The loss of one training step on this rank's slice of a global batch of `global_n` samples.

    Returns:
        (loss, model output, NLL sum over this rank's samples, RegTerms); loss = NLL sum / global_n
        + regularizers / world size + the model's own aux loss / world size (module docstring).
    """
    from raymoe.regularizers.combine import regularize

    use_reg = regularizer_active(reg_cfg) if use_reg is None else use_reg
    out = model(x)
    nll_sum = F.nll_loss(out.log_probs_BC, y, reduction="sum")
    loss = nll_sum / global_n
    if use_reg and ctx.distributed:  # batch-level terms need the whole global batch
        from raymoe.parallel.collectives import all_gather_nograd, gather_model_output

        reg = regularize(reg_cfg, gather_model_output(out, ctx), all_gather_nograd(x, ctx))
    else:  # unweighted terms such as importance are still logged (cheap); total is 0 when inactive
        reg = regularize(reg_cfg, out, x)
    if use_reg:
        loss = loss + reg.total / ctx.world_size
    if out.aux_loss is not None:  # a mean over this rank's items: average it over ranks like the NLL
        loss = loss + out.aux_loss / ctx.world_size
    return loss, out, nll_sum, reg


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable, *, reg_cfg: RegularizerConfig,
                ctx: DistContext, epoch: int, num_samples: int, batch_size: int,
                hooks: list[nn.Module] | None = None,
                on_step: Callable[[int, float, float], None] | None = None,
                error_after_step: bool = False) -> EpochResult:
    """Run one epoch of optimizer steps.

    Args:
        batches: (x, y) local slices of global batches, in order.
        epoch: 1-based number of this epoch (for messages).
        num_samples: training samples in the whole epoch (all ranks); gives each step's global batch size.
        batch_size: global batch size.
        hooks: modules whose post_step(ctx) runs after each optimizer step.
        on_step: called on every rank with (step, running mean loss, running accuracy) after each step.
        error_after_step: count training accuracy with an extra no-grad forward after each optimizer step (the
            reference's count, train.count_train_error) instead of from the step's own forward.

    Raises:
        TrainingDiverged: the loss of some step was NaN/inf (checked before that step updates the weights).
    """
    hooks = post_step_hooks(model) if hooks is None else hooks
    use_reg = regularizer_active(reg_cfg)
    if ctx.distributed:
        from raymoe.parallel.expert_parallel import sync_gradients
    model.train()
    device = ctx.device
    totals = torch.zeros(2, dtype=torch.float64)  # [nll sum, correct] over the epoch, all ranks
    part_sums: dict[str, torch.Tensor] = {}
    data_seconds, steps, start = 0.0, 0, time.perf_counter()
    iterator = iter(batches)
    while True:
        fetch = time.perf_counter()
        try:
            x, y = next(iterator)
        except StopIteration:
            break
        data_seconds += time.perf_counter() - fetch
        global_n = min(batch_size, num_samples - steps * batch_size)
        loss, out, nll_sum, reg = step_loss(model, x, y, reg_cfg=reg_cfg, ctx=ctx, global_n=global_n, use_reg=use_reg)
        for name, value in reg.parts.items():
            part_sums[name] = part_sums.get(name, 0.0) + value.detach()
        correct = (out.log_probs_BC.detach().argmax(dim=1) == y).sum()
        stats = torch.stack([nll_sum.detach().double(), correct.double(), (~torch.isfinite(loss.detach())).double()])
        stats = ctx.all_reduce_sum(stats.to(device)).cpu() if ctx.distributed else stats.cpu()
        steps += 1
        if stats[2] > 0:
            lr = optimizer.param_groups[0]["lr"]
            raise TrainingDiverged(f"loss became NaN at epoch {epoch} step {steps} (lr={lr:g}); "
                                   f"lower train.lr or check the regularizer weights")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if ctx.distributed:
            sync_gradients(model, ctx)
        optimizer.step()
        for module in hooks:
            module.post_step(ctx)
        if error_after_step:  # the reference's count: the updated model on the same batch, still in train mode
            with torch.no_grad():
                correct = (model(x).log_probs_BC.argmax(dim=1) == y).sum().double()
            stats[1] = ctx.all_reduce_sum(correct.to(device)).cpu() if ctx.distributed else correct.cpu()
        totals += stats[:2]
        if on_step is not None:
            seen = min(steps * batch_size, num_samples)
            on_step(steps, totals[0].item() / seen, totals[1].item() / seen)
    seen = min(steps * batch_size, num_samples)
    parts = {name: float(total) / max(steps, 1) for name, total in part_sums.items()}
    return EpochResult(loss=totals[0].item() / max(seen, 1), error=1.0 - totals[1].item() / max(seen, 1),
                       samples=seen, steps=steps, seconds=time.perf_counter() - start, data_seconds=data_seconds,
                       parts=parts)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, *, ctx: DistContext, num_experts: int, num_classes: int,
             bn_eval: bool = True) -> tuple[dict[str, float], dict]:
    """Specialization metrics over the whole evaluation set (counts summed over ranks).

    Returns:
        (metrics, matrices): `SpecializationAccumulator.compute()` plus "loss" (mean NLL), and `.matrices()`.
    """
    from raymoe.metrics.accumulator import SpecializationAccumulator

    set_eval_mode(model, bn_eval)
    accumulator = SpecializationAccumulator(num_experts, num_classes)
    nll = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # [NLL sum, samples] on this rank
    for x, y in batches:
        out = model(x)
        accumulator.update(out, y)
        nll[0] += F.nll_loss(out.log_probs_BC, y, reduction="sum").double()
        nll[1] += y.shape[0]
    accumulator.reduce(ctx)
    ctx.all_reduce_sum(nll)
    metrics = {k: float(v) for k, v in accumulator.compute().items()}
    metrics["loss"] = nll[0].item() / max(nll[1].item(), 1.0)
    return metrics, accumulator.matrices()

