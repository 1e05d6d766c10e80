"""Config -> model: the paper MoE (arch "moe"), the single-model baseline ("single"), the ViT-MoE ("vit_moe") or
the language models ("gpt" dense, "gpt_moe"; built by `build_lm` from the text data's vocabulary).

cfg.data.name picks the paper's expert and gate networks (docs/paper-notes.md §1.2); cfg.model.hidden_size overrides H.
"""

from __future__ import annotations

from torch import nn

from raymoe.config.schema import LM_ARCHS, ExperimentConfig
from raymoe.models.moe import ExpectationMoE
from raymoe.models.paper_experts import PaperExperts, expert_spec
from raymoe.models.paper_gate_nets import GateTrunk, gate_trunk_spec
from raymoe.models.single import SingleModel
from raymoe.moe.gates import TrunkGate
from raymoe.moe.router_build import build_router


def build_gate(cfg: ExperimentConfig, in_channels: int, image_size: int) -> TrunkGate:
    """The sample-level gate of cfg.gate.kind: a router over the data set's gate trunk (raymoe/moe/gates.py)."""
    spec, attentive_relu = gate_trunk_spec(cfg.data.name, in_channels, image_size, cfg.model.hidden_size)
    trunk = GateTrunk(spec)  # built before the router: the reference code's order of initial draws
    router = build_router(cfg.gate, "sample", spec.hidden, spec.hidden, cfg.model.num_experts)
    # the original gate reads ReLU(fc2), the attentive one fc2 (ReLU only on FMNIST, docs/paper-notes.md §1.2)
    relu = attentive_relu if router.needs_expert_hidden else True
    return TrunkGate(trunk, router, relu_features=relu)


def build_lm(cfg: ExperimentConfig, vocab_size: int) -> nn.Module:
    """The language model of cfg.model.arch gpt / gpt_moe; forward(idx_BT) -> ModelOutput over B * T tokens.

    Args:
        cfg: the experiment config.
        vocab_size: the text data's vocabulary (TextDataset.vocab_size).
    """
    from raymoe.models.gpt import build_gpt

    return build_gpt(cfg, vocab_size)


def build_model(cfg: ExperimentConfig, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The model of cfg.model.arch; forward(x_BZSS) -> ModelOutput (language models: forward(idx_BT)).

    Args:
        cfg: the experiment config.
        num_classes, in_channels, image_size: from the data set. For gpt / gpt_moe the classes are the
            vocabulary (num_classes = TextDataset.vocab_size) and the image sizes are ignored; see build_lm.
    """
    m = cfg.model
    if m.arch in LM_ARCHS:
        return build_lm(cfg, num_classes)
    if m.arch == "vit_moe":
        from raymoe.models.vit import build_vit

        return build_vit(cfg, num_classes, in_channels, image_size)
    spec = expert_spec(cfg.data.name, in_channels, image_size, m.hidden_size)
    if m.arch == "single":
        return SingleModel(spec, num_classes, m.log_eps)
    if m.arch == "moe":
        experts = PaperExperts(m.num_experts, spec, num_classes)
        gate = build_gate(cfg, in_channels, image_size)
        return ExpectationMoE(experts, gate, num_classes, m.log_eps, m.output_softmax)
    raise ValueError(f"unknown model.arch {m.arch!r}")
