"""Distilling the attentive-gate MoE into an original-gate MoE (docs/paper-notes.md §1.3 rows 8/9, `train_from_model`).

The experts are copied from the trained attentive model and frozen; a new original (softmax) gate loads the
attentive gate's trunk (conv/fc1/fc2) with strict=False semantics, and its output layer starts random. Only the
gate trains. This gives back a gate that routes a sample without running every expert first.
"""

from __future__ import annotations

import torch
from torch import nn

from raymoe.config.schema import ExperimentConfig
from raymoe.models.build import build_model
from raymoe.models.moe import ExpectationMoE
from raymoe.moe.routers import LinearRouter


def _sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def build_distilled(cfg: ExperimentConfig, attentive_state: dict[str, torch.Tensor], num_classes: int,
                    in_channels: int, image_size: int) -> nn.Module:
    """A softmax-gate ExpectationMoE with the attentive model's experts (frozen) and gate trunk.

    Args:
        cfg: config of the NEW model (model.arch moe, gate.kind softmax; same data set, experts and H).
        attentive_state: full `state_dict()` (all experts) of a trained attentive ExpectationMoE.
    Raises:
        KeyError: the state has no experts or no attentive gate trunk.
        RuntimeError: a tensor shape does not fit this model (another architecture).
    """
    model = build_model(cfg, num_classes, in_channels, image_size)
    original = isinstance(model, ExpectationMoE) and isinstance(model.gate.router, LinearRouter) and model.gate.dense
    if not original:
        raise ValueError("distillation builds an original-gate MoE: use model.arch moe and gate.kind softmax")
    experts_state = _sub_state(attentive_state, "experts.")
    trunk_state = _sub_state(attentive_state, "gate.trunk.")
    if not experts_state or not trunk_state:
        raise KeyError("the state dict has no 'experts.*' or no 'gate.trunk.*' entries (not an attentive MoE)")
    if "gate.router.w_q.weight" not in attentive_state:
        raise KeyError("the state dict has no attentive gate (gate.router.w_q.weight); distil from an attentive MoE")
    model.experts.load_state_dict(experts_state, strict=True)
    model.gate.trunk.load_state_dict(trunk_state, strict=False)  # as the reference: missing keys stay random
    for p in model.experts.parameters():
        p.requires_grad_(False)
    return model
