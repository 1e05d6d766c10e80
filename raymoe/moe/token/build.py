"""Build token-level MoE parts from the typed experiment config (gate.*, model.vit.* or model.gpt.*,
model.num_experts)."""

from __future__ import annotations

from dataclasses import dataclass

from raymoe.config.schema import LM_ARCHS, ExperimentConfig
from raymoe.moe.router_build import build_router
from raymoe.moe.token.hypermoe import HyperMoE, HyperNetwork
from raymoe.moe.token.layer import TokenMoE


@dataclass(frozen=True, slots=True)
class Backbone:
    """The sizes of the transformer that holds the MoE layers."""

    dim: int
    depth: int
    d_ff: int  # each expert's hidden width
    num_shared_experts: int


def backbone(cfg: ExperimentConfig) -> Backbone:
    """model.gpt for the language models (arch gpt / gpt_moe), model.vit otherwise."""
    b = cfg.model.gpt if cfg.model.arch in LM_ARCHS else cfg.model.vit
    return Backbone(b.dim, b.depth, b.mlp_dim, b.num_shared_experts)


def build_hypernet(cfg: ExperimentConfig) -> HyperNetwork | None:
    """The model's one shared HyperNetwork (None when gate.hypermoe.enabled is false)."""
    h, net = cfg.gate.hypermoe, backbone(cfg)
    if not h.enabled:
        return None
    return HyperNetwork(num_layers=net.depth, dim=net.dim, input_dim=h.hypernet_input,
                        bottleneck=h.hypernet_bottleneck, layer_embed_dim=h.layer_embed_dim,
                        adapter_dim=h.adapter_dim)


def build_token_moe(cfg: ExperimentConfig, layer_index: int, hypernet: HyperNetwork | None) -> TokenMoE:
    """One MoE FFN for block `layer_index` of the ViT or the GPT."""
    net, g, e = backbone(cfg), cfg.gate, cfg.model.num_experts
    router = build_router(g, "token", net.dim, net.d_ff, e)
    hyper = None
    if hypernet is not None:
        hyper = HyperMoE(e, hypernet, g.hypermoe.expert_embed_dim, g.hypermoe.process_dim)
    capacity = g.capacity_factor if router.token_choice else None  # expert choice took it already
    return TokenMoE(net.dim, net.d_ff, e, router, capacity, hyper, net.num_shared_experts, layer_index)
