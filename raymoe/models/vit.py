"""A small Vision Transformer whose FFNs are token-level sparse MoE layers in every moe_every-th block (V-MoE).

Layout: patch embedding (conv, stride = patch) -> [class token] + learned position embedding -> depth pre-norm
blocks x + Attn(LN(x)), x + FFN(LN(x)) -> LN -> pool (class token or mean of the tokens) -> linear head.
Block i has a TokenMoE FFN when i % moe_every == moe_every - 1 (Riquelme et al. 2021), a dense GELU FFN otherwise.
Every token of the sequence is routed, the class token included (as in V-MoE), so a MoE layer routes
N = B * T tokens with T = patches + 1 for pool "cls" and T = patches for pool "mean" (= items_per_sample).
With HyperMoE the model owns the one HyperNetwork shared by all MoE layers.

Shape legend: B images, Z channels, S image side, T tokens per image, D model dim, C classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.config.schema import ExperimentConfig
from raymoe.models.blocks import run_blocks
from raymoe.models.output import ModelOutput
from raymoe.moe.token.build import build_hypernet, build_token_moe
from raymoe.moe.token.layer import TokenMoE
from raymoe.moe.token.shared import FeedForward


class SelfAttention(nn.Module):
    """Multi-head self-attention (optionally causal, only to exercise routers that refuse causal models)."""

    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        b, t, d = x_BTD.shape
        q, k, v = self.qkv(x_BTD).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block; `ffn` is a dense FeedForward or a TokenMoE."""

    def __init__(self, dim: int, heads: int, ffn: nn.Module, causal: bool = False):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, causal)
        self.ffn = ffn

    def forward(self, x_BTD: torch.Tensor):
        """Returns (x, (GateResult, stats) for a MoE block or None)."""
        x_BTD = x_BTD + self.attn(self.norm1(x_BTD))
        h_BTD = self.norm2(x_BTD)
        if isinstance(self.ffn, TokenMoE):
            y_BTD, gate, stats = self.ffn(h_BTD)
            return x_BTD + y_BTD, (gate, stats)
        return x_BTD + self.ffn(h_BTD), None


class ViTMoE(nn.Module):
    """ViT with sparse MoE FFNs; forward(x_BZSS) -> ModelOutput."""

    def __init__(self, cfg: ExperimentConfig, num_classes: int, in_channels: int, image_size: int):
        super().__init__()
        vit = cfg.model.vit
        if image_size % vit.patch_size:
            raise ValueError(f"patch_size {vit.patch_size} does not divide image_size {image_size}")
        self.pool = vit.pool
        self.patch_embed = nn.Conv2d(in_channels, vit.dim, kernel_size=vit.patch_size, stride=vit.patch_size)
        self.num_tokens = (image_size // vit.patch_size) ** 2 + (1 if vit.pool == "cls" else 0)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, vit.dim)) if vit.pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_tokens, vit.dim) * 0.02)
        self.hypernet = build_hypernet(cfg)  # one per model, shared by every MoE layer (HyperMoE)
        blocks = []
        for i in range(vit.depth):
            if i % vit.moe_every == vit.moe_every - 1:
                ffn = build_token_moe(cfg, layer_index=i, hypernet=self.hypernet)
            else:
                ffn = FeedForward(vit.dim, vit.mlp_dim)
            blocks.append(Block(vit.dim, vit.heads, ffn, vit.causal))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(vit.dim)
        self.head = nn.Linear(vit.dim, num_classes)

    def forward(self, x_BZSS: torch.Tensor) -> ModelOutput:
        x_BTD = self.patch_embed(x_BZSS).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x_BTD = torch.cat([self.cls_token.expand(x_BTD.shape[0], -1, -1), x_BTD], dim=1)
        x_BTD = x_BTD + self.pos_embed
        x_BTD, gates, stats = run_blocks(self.blocks, x_BTD)
        x_BTD = self.norm(x_BTD)
        pooled_BD = x_BTD[:, 0] if self.pool == "cls" else x_BTD.mean(dim=1)
        logits_BC = self.head(pooled_BD)
        return ModelOutput(log_probs_BC=F.log_softmax(logits_BC.float(), dim=-1), gates=gates,
                           items_per_sample=self.num_tokens, selected_pred_B=None, aux_loss=None,
                           layer_stats=stats)


def build_vit(cfg: ExperimentConfig, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The ViT-MoE of cfg.model.vit with cfg.model.num_experts experts and the router of cfg.gate."""
    return ViTMoE(cfg, num_classes, in_channels, image_size)
