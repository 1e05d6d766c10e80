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
from typing import TYPE_CHECKING, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.config.schema import RegularizerConfig
from raymoe.parallel.context import DistContext

if TYPE_CHECKING:
    from raymoe.metrics.accumulator import SpecializationAccumulator


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; training stops and the MLflow run is marked FAILED."""


@dataclass
class EpochResult:
    """Training-set numbers of one epoch, identical on every rank.

    error: 1 - accuracy of the forward pass of each step (before its optimizer step), sample-weighted over
    the epoch; costs nothing extra. The reference averages per-batch accuracies measured after each step with
    an extra no-grad pass (StepSettings.error_after_step).
    """

    loss: float  # mean NLL per training target (image label or next token; no regularizer)
    error: float
    samples: int
    steps: int
    seconds: float
    data_seconds: float  # time spent waiting for batches (the data pipeline's share of step time)
    # unweighted regularizer terms, mean over steps (with no regularizer weighted and several ranks: rank-local)
    parts: dict[str, float] = field(default_factory=dict)
    targets: int = 0  # labels or tokens predicted (all ranks): tokens/s for language models
    grad_norm: float | None = None  # mean global gradient norm before clipping (when clipping)
    lr: float = 0.0  # learning rate of the last step


def regularizer_active(reg: RegularizerConfig) -> bool:
    ss = reg.sample_similarity
    return any(w > 0 for w in (reg.importance, reg.load, reg.load_balance, reg.z_loss, ss.beta_s, ss.beta_d))


def post_step_hooks(model: nn.Module) -> list[nn.Module]:
    """Modules with a `post_step(ctx)` (e.g. aux-loss-free bias balancing), called after each optimizer step."""
    return [m for m in model.modules() if callable(getattr(m, "post_step", None))]


def set_eval_mode(model: nn.Module, bn_eval: bool) -> None:
    """model.eval(); with bn_eval False BatchNorm keeps batch statistics at test, as the reference code did
    (it never called eval(); docs/paper-notes.md §7.7). Gate noise and jitter stay off either way."""
    model.eval()
    if not bn_eval:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train()


def step_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, reg_cfg: RegularizerConfig, ctx: DistContext,
              global_n: int, use_reg: bool | None = None, micro_batches: int = 1):
    """The loss of one training step (or of one of its `micro_batches` accumulation slices) on this rank's part
    of a global batch of `global_n` samples. Targets y are (B,) class labels or (B, T) next tokens; the NLL is
    averaged over every target of the global batch.

    Returns:
        (loss, model output, NLL sum over this rank's targets, RegTerms); loss = NLL sum / global targets
        + (regularizers + the model's own aux loss) / (world size * micro_batches) (module docstring).
    """
    from raymoe.regularizers.combine import regularize

    use_reg = regularizer_active(reg_cfg) if use_reg is None else use_reg
    out = model(x)
    targets_per_sample = y[0].numel() if len(y) else 1
    nll_sum = F.nll_loss(out.log_probs_BC.float(), y.reshape(-1), reduction="sum")
    loss = nll_sum / (global_n * targets_per_sample)
    if use_reg and ctx.distributed:  # batch-level terms need the whole global batch
        from raymoe.parallel.collectives import all_gather_nograd, gather_model_output

        reg = regularize(reg_cfg, gather_model_output(out, ctx), all_gather_nograd(x, ctx))
    else:  # unweighted terms such as importance are still logged (cheap); total is 0 when inactive
        reg = regularize(reg_cfg, out, x)
    shares = ctx.world_size * micro_batches
    if use_reg:
        loss = loss + reg.total / shares
    if out.aux_loss is not None:  # a mean over this rank's items: average it over ranks like the NLL
        loss = loss + out.aux_loss / shares
    return loss, out, nll_sum, reg


@dataclass(frozen=True)
class StepSettings:
    """How each optimizer step runs (train.* in the config)."""

    precision: str = "fp32"  # fp32 | bf16 (autocast, float32 master weights; raymoe/train/precision.py)
    grad_clip: float | None = None  # clip by the global gradient norm (over every expert of every rank)
    accum_steps: int = 1  # micro-batches per optimizer step (gradient accumulation)
    lr_at: Callable[[int], float] | None = None  # lr of 0-based optimizer step n (raymoe/train/schedule.py)
    error_after_step: bool = False  # the reference's count: an extra no-grad forward after each step


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable, *, reg_cfg: RegularizerConfig,
                ctx: DistContext, epoch: int, num_samples: int, batch_size: int,
                hooks: list[nn.Module] | None = None,
                on_step: Callable[[int, float, float], None] | None = None,
                settings: StepSettings | None = None, first_step: int = 0) -> EpochResult:
    """Run one epoch (or one evaluation interval) of optimizer steps.

    Args:
        batches: (x, y) local slices of global batches, in order.
        epoch: 1-based number of this epoch (for messages).
        num_samples: training samples in the whole epoch (all ranks); gives each step's global batch size.
        batch_size: global batch size.
        hooks: modules whose post_step(ctx) runs after each optimizer step.
        on_step: called on every rank with (step, running mean loss, running accuracy) after each step.
        settings: precision, clipping, accumulation, learning-rate schedule.
        first_step: optimizer steps done before this call (the schedule's position).

    Raises:
        TrainingDiverged: the loss of some step was NaN/inf (checked before that step updates the weights).
    """
    from raymoe.train.precision import autocast
    from raymoe.train.schedule import set_lr

    settings = settings or StepSettings()
    hooks = post_step_hooks(model) if hooks is None else hooks
    use_reg = regularizer_active(reg_cfg)
    if ctx.distributed:
        from raymoe.parallel.expert_parallel import sync_gradients
    if settings.grad_clip is not None:
        from raymoe.parallel.grad_norm import clip_grad_norm
    model.train()
    device = ctx.device
    totals = torch.zeros(3, dtype=torch.float64)  # [nll sum, correct, targets] over the epoch, all ranks
    part_sums: dict[str, torch.Tensor] = {}
    norm_sum, last_lr = 0.0, optimizer.param_groups[0]["lr"]
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
        if settings.lr_at is not None:
            last_lr = settings.lr_at(first_step + steps)
            set_lr(optimizer, last_lr)
        optimizer.zero_grad(set_to_none=True)
        # [nll sum, correct, targets, non-finite losses] on the model's device: one host copy per step, after
        # backward (a NaN's gradients never reach the weights: every rank raises before optimizer.step)
        stats = torch.zeros(4, dtype=torch.float64, device=device)
        for xm, ym in zip(torch.tensor_split(x, settings.accum_steps), torch.tensor_split(y, settings.accum_steps)):
            with autocast(device, settings.precision):
                loss, out, nll_sum, reg = step_loss(model, xm, ym, reg_cfg=reg_cfg, ctx=ctx, global_n=global_n,
                                                    use_reg=use_reg, micro_batches=settings.accum_steps)
            for name, value in reg.parts.items():
                part_sums[name] = part_sums.get(name, 0.0) + value.detach() / settings.accum_steps
            correct = (out.log_probs_BC.detach().argmax(dim=1) == ym.reshape(-1)).sum()
            stats += torch.stack([nll_sum.detach().double(), correct.double(),
                                  torch.full((), ym.numel(), dtype=torch.float64, device=device),
                                  (~torch.isfinite(loss.detach())).double()])
            loss.backward()
        stats = (ctx.all_reduce_sum(stats) if ctx.distributed else stats).cpu()
        steps += 1
        if stats[3] > 0:
            lr = optimizer.param_groups[0]["lr"]
            raise TrainingDiverged(f"loss became NaN at epoch {epoch} step {steps} (lr={lr:g}); "
                                   f"lower train.lr or check the regularizer weights")
        if ctx.distributed:
            sync_gradients(model, ctx)
        if settings.grad_clip is not None:
            norm_sum += float(clip_grad_norm(model, settings.grad_clip, ctx))
        optimizer.step()
        for module in hooks:
            module.post_step(ctx)
        if settings.error_after_step:  # the reference's count: the updated model on the same batch, train mode
            with torch.no_grad(), autocast(device, settings.precision):
                correct = (model(x).log_probs_BC.argmax(dim=1) == y.reshape(-1)).sum().double()
            stats[1] = ctx.all_reduce_sum(correct.to(device)).cpu() if ctx.distributed else correct.cpu()
        totals += stats[:3]
        if on_step is not None:
            on_step(steps, totals[0].item() / totals[2].item(), totals[1].item() / totals[2].item())
    seen = min(steps * batch_size, num_samples)
    targets = max(totals[2].item(), 1.0)
    parts = {name: float(total) / max(steps, 1) for name, total in part_sums.items()}
    return EpochResult(loss=totals[0].item() / targets, error=1.0 - totals[1].item() / targets,
                       samples=seen, steps=steps, seconds=time.perf_counter() - start, data_seconds=data_seconds,
                       parts=parts, targets=int(totals[2].item()),
                       grad_norm=norm_sum / steps if settings.grad_clip is not None and steps else None,
                       lr=last_lr)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, *, ctx: DistContext, num_experts: int, num_classes: int,
             bn_eval: bool = True, keep_items: int = 0) -> tuple[dict[str, float], SpecializationAccumulator]:
    """Specialization metrics over the whole evaluation set (counts summed over ranks).

    Args:
        keep_items: the accumulator also keeps each gate's top-1 expert of this rank's first keep_items items
            (`.first_top1()`: routing stability between evaluations).
    Returns:
        (metrics, accumulator): `SpecializationAccumulator.compute()` plus "loss" (mean NLL), and the reduced
        accumulator (its `.matrices()` draw the figures).
    """
    from raymoe.metrics.accumulator import SpecializationAccumulator

    set_eval_mode(model, bn_eval)
    accumulator = SpecializationAccumulator(num_experts, num_classes, keep_items)
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
    return metrics, accumulator

