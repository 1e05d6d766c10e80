"""Train the literal model (literal.py) and raymoe's model from the SAME weights on the SAME batches, step by step,
and measure how far apart they are: loss, gate probabilities, every gradient, every parameter after the step.

raymoe's side runs exactly what `train_fn` runs per step (raymoe.train.step.step_loss, the optimizer from
raymoe.train.loop.make_optimizer, the fast paths); the literal side runs plain modules, torch.optim.Adam
(the reference's optimizer) and the notes' loss (docs/paper-notes.md §1.1, §3).

Shape legend: B samples, E experts, C classes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from raymoe.config.schema import ExperimentConfig
from raymoe.fidelity.literal import (LiteralMoE, LiteralSingle, literal_importance, literal_nll,
                                     literal_sample_similarity)
from raymoe.fidelity.transfer import literal_grads, load_literal_into


@dataclass(frozen=True)
class Gaps:
    """How far one model's step is from a reference step (relative: ||a - b|| / ||b||)."""

    loss: float
    probs: float  # max |g - g_ref| over the batch (absolute: probabilities)
    grad: float  # worst parameter's relative gradient gap
    grad_worst: str
    param: float  # worst parameter's relative gap after the optimizer step
    param_worst: str


@dataclass(frozen=True)
class StepGap:
    """One step: raymoe vs the float64 literal model, and the float32 literal model vs the float64 one (the
    float32 rounding floor: what any float32 implementation of the same step differs by); and raymoe's model
    run in float64 vs the float64 literal model (same_function: whether they are one computation)."""

    step: int
    loss_literal: float
    loss_raymoe: float
    raymoe: Gaps
    floor: Gaps
    raymoe_float64: Gaps

    def same_function(self, tolerance: float = 1e-6) -> bool:
        """raymoe's model in float64 equals the float64 literal model (gate probabilities, gradients and
        parameters after the step): then a float32 gap beyond the floor is rounding amplified by the training
        dynamics (a ReLU unit at the edge flips, Adam scales its tiny gradient up), not another computation.
        1e-6: the float64 twins agreed to 1e-11 over 6 FMNIST steps (1e-8 for the L_s rows); a flip in float32
        shows as 1e-4 or more, a 1% change of the computation as 1e-2."""
        g = self.raymoe_float64
        return max(g.probs, g.grad, g.param) <= tolerance

    def within_rounding(self, factor: float = 20.0, slack: float = 1e-4) -> bool:
        """raymoe is no further from float64 than `factor` x the float32 literal model (+ `slack`)."""
        pairs = ((self.raymoe.loss, self.floor.loss), (self.raymoe.probs, self.floor.probs),
                 (self.raymoe.grad, self.floor.grad), (self.raymoe.param, self.floor.param))
        return all(mine <= factor * floor + slack for mine, floor in pairs)


def literal_for(cfg: ExperimentConfig, num_classes: int) -> nn.Module:
    """The literal model of a paper preset (single, or a MoE with the softmax or attentive gate)."""
    if cfg.model.arch == "single":
        return LiteralSingle(cfg.data.name, num_classes)
    if cfg.model.arch != "moe":
        raise ValueError(f"the literal reference covers the paper's models, not model.arch {cfg.model.arch!r}")
    return LiteralMoE(cfg.data.name, cfg.model.num_experts, num_classes, cfg.gate.kind, cfg.gate.temperature)


def literal_loss(cfg: ExperimentConfig, literal: nn.Module, x: torch.Tensor,
                 y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_CE (+ L_importance) (+ L_s) as the reference adds them (docs/paper-notes.md §3), the mixture y_hat (B, C))."""
    mixture_BC = literal(x)
    loss = literal_nll(mixture_BC, y, cfg.model.log_eps)
    if isinstance(literal, LiteralMoE):
        reg, ss = cfg.regularizer, cfg.regularizer.sample_similarity
        if ss.beta_s > 0 or ss.beta_d > 0:
            loss = loss + literal_sample_similarity(x, literal.gate_probs, ss.beta_s, ss.beta_d)
        if reg.importance > 0:
            loss = loss + literal_importance(literal.gate_probs, reg.importance)
    return loss, mixture_BC


def _rel_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius): a max-norm would flag a single ReLU or max-pool tie that rounding flips."""
    b = b.double()
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-30)) if b.numel() else 0.0


def _worst(mine: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    worst, name = 0.0, ""
    for key, value in ref.items():
        if value is None or mine.get(key) is None:
            continue
        gap = _rel_gap(mine[key], value)
        if gap > worst:
            worst, name = gap, key
    return worst, name


def _literal_params(model: nn.Module, literal: nn.Module) -> dict[str, torch.Tensor]:
    """The literal model's parameters under raymoe's names (copied into a float64 twin of raymoe's model)."""
    twin = load_literal_into(copy.deepcopy(model).double(), literal)
    return {k: p.detach() for k, p in twin.named_parameters()}


class _LiteralSide:
    """A literal model with its Adam, in float32 or float64."""

    def __init__(self, cfg: ExperimentConfig, literal: nn.Module, dtype: torch.dtype):
        self.cfg, self.dtype = cfg, dtype
        self.model = copy.deepcopy(literal).to(dtype).train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.train.lr,
                                          weight_decay=cfg.train.weight_decay)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss, _ = literal_loss(self.cfg, self.model, x.to(self.dtype), y)
        loss.backward()
        return float(loss.detach())

    @property
    def gate_probs(self) -> torch.Tensor | None:
        return getattr(self.model, "gate_probs", None)


def compare_steps(cfg: ExperimentConfig, batches: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                  in_channels: int, image_size: int, seed: int = 0) -> list[StepGap]:
    """raymoe's model, the float32 literal model and the float64 literal model, all from the literal model's
    initial weights (drawn with `seed`), one step per batch; every step is compared against the float64 side.

    Args:
        cfg: a paper preset (model.arch single or moe with a softmax/attentive gate).
        batches: (x, y) training batches, used in order by all three.
    Returns:
        One StepGap per batch. raymoe's model also runs in float64 (without the float32 fast paths) from the
        same weights, for StepGap.same_function.
    """
    from raymoe.kernels.fast_paths import apply_fast_paths
    from raymoe.models.build import build_model
    from raymoe.parallel.context import DistContext
    from raymoe.train.loop import make_optimizer
    from raymoe.train.step import step_loss

    torch.manual_seed(seed)
    literal = literal_for(cfg, num_classes)
    model = load_literal_into(build_model(cfg, num_classes, in_channels, image_size), literal).train()
    model64 = copy.deepcopy(model).double()
    apply_fast_paths(model, torch.device("cpu"))  # the model exactly as train_fn runs it
    opt, opt64 = make_optimizer(cfg.train, model), make_optimizer(cfg.train, model64)
    lit32, lit64 = _LiteralSide(cfg, literal, torch.float32), _LiteralSide(cfg, literal, torch.float64)
    ctx = DistContext()
    gaps = []
    for step, (x, y) in enumerate(batches, start=1):
        loss32, loss64 = lit32.forward_backward(x, y), lit64.forward_backward(x, y)
        opt.zero_grad(set_to_none=True)
        loss, out, _, _ = step_loss(model, x, y, reg_cfg=cfg.regularizer, ctx=ctx, global_n=len(y))
        loss.backward()
        opt64.zero_grad(set_to_none=True)
        loss_m64, out64, _, _ = step_loss(model64, x.double(), y, reg_cfg=cfg.regularizer, ctx=ctx, global_n=len(y))
        loss_m64.backward()
        grads64 = literal_grads(lit64.model)
        mine = {k: p.grad for k, p in model.named_parameters()}
        mine64 = {k: p.grad for k, p in model64.named_parameters()}
        grads32 = literal_grads(lit32.model)
        probs_mine = probs_floor = probs_m64 = 0.0
        if out.gates:
            ref = lit64.gate_probs.detach()
            probs_mine = float((out.gates[0].probs_NE.detach().double() - ref).abs().max())
            probs_floor = float((lit32.gate_probs.detach().double() - ref).abs().max())
            probs_m64 = float((out64.gates[0].probs_NE.detach() - ref).abs().max())
        opt.step()
        opt64.step()
        lit32.optimizer.step()
        lit64.optimizer.step()
        params64 = _literal_params(model, lit64.model)
        mine_params = {k: p.detach() for k, p in model.named_parameters()}
        mine64_params = {k: p.detach() for k, p in model64.named_parameters()}
        params32 = _literal_params(model, lit32.model)
        loss_ref = max(abs(loss64), 1e-12)
        gaps.append(StepGap(
            step, loss32, float(loss.detach()),
            Gaps(abs(float(loss.detach()) - loss64) / loss_ref, probs_mine, *_worst(mine, grads64),
                 *_worst(mine_params, params64)),
            Gaps(abs(loss32 - loss64) / loss_ref, probs_floor, *_worst(grads32, grads64),
                 *_worst(params32, params64)),
            Gaps(abs(float(loss_m64.detach()) - loss64) / loss_ref, probs_m64, *_worst(mine64, grads64),
                 *_worst(mine64_params, params64))))
    return gaps
