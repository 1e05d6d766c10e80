"""A decoder-only GPT whose FFNs are token-level MoE layers in every moe_every-th block (arch gpt_moe), or its
dense baseline (arch gpt) through the same code.

Layout (nanoGPT, pre-norm): token embedding [+ learned positions] -> dropout -> depth blocks
x + Attn(LN(x)), x + FFN(LN(x)) with causal attention (F.scaled_dot_product_attention(is_causal=True), rotary or
learned positions) -> LN -> output head TIED to the token embedding -> log_softmax over the vocabulary.
Block i has a TokenMoE FFN when i % moe_every == moe_every - 1 (as the ViT), a dense GELU FFN of width
mlp_dim otherwise. Arch gpt puts a dense FFN of width (gate.top_k + num_shared_experts) * mlp_dim where gpt_moe
has its MoE, so both run the same expert weights per token (top_k experts + the shared ones); the MoE adds its
router, its (top_k - 1 + shared) extra output biases and HyperMoE's parameters.
Every token is routed on its own (token-choice routers, dropless), so no token sees a later one; expert choice
and capacity dropping rank tokens against the whole batch, and are refused (ConfigError).
Init as nanoGPT: N(0, 0.02) weights, zero biases, residual output projections N(0, 0.02 / sqrt(2 * depth));
TokenMoE layers and the shared HyperNetwork keep their own init.

Shape legend: B sequences, T positions, D model dim, h heads, d head width, V vocabulary (embedding rows).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.config.schema import ExperimentConfig
from raymoe.errors import ConfigError
from raymoe.models.blocks import run_blocks
from raymoe.models.output import ModelOutput
from raymoe.models.rope import Rotary
from raymoe.moe.token.build import build_hypernet, build_token_moe
from raymoe.moe.token.hypermoe import HyperNetwork
from raymoe.moe.token.layer import TokenMoE
from raymoe.moe.token.shared import FeedForward

INIT_STD = 0.02  # GPT-2 / nanoGPT


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; rotary positions on q and k when `rotary` is given."""

    def __init__(self, dim: int, heads: int, dropout: float, rotary: Rotary | None):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self._rotary = (rotary,)  # shared by all blocks; a tuple keeps it out of this module's buffers

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        b, t, d = x_BTD.shape
        q_BhTd, k_BhTd, v_BhTd = self.qkv(x_BTD).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        rotary = self._rotary[0]
        if rotary is not None:
            q_BhTd, k_BhTd = rotary(q_BhTd), rotary(k_BhTd)
        out_BhTd = F.scaled_dot_product_attention(q_BhTd, k_BhTd, v_BhTd, is_causal=True,
                                                  dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out_BhTd.transpose(1, 2).reshape(b, t, d))


class GPTBlock(nn.Module):
    """Pre-norm decoder block; `ffn` is a dense FeedForward or a TokenMoE."""

    def __init__(self, dim: int, heads: int, ffn: nn.Module, dropout: float, rotary: Rotary | None):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout, rotary)
        self.ffn = ffn
        self.drop = nn.Dropout(dropout)

    def forward(self, x_BTD: torch.Tensor):
        """Returns (x, (GateResult, stats) for a MoE block or None)."""
        x_BTD = x_BTD + self.drop(self.attn(self.norm1(x_BTD)))
        h_BTD = self.norm2(x_BTD)
        if isinstance(self.ffn, TokenMoE):
            y_BTD, gate, stats = self.ffn(h_BTD)
            return x_BTD + self.drop(y_BTD), (gate, stats)
        return x_BTD + self.drop(self.ffn(h_BTD)), None


def check_causal_routing(cfg: ExperimentConfig) -> None:
    """Refuse the MoE settings that let a token's output depend on later tokens (ConfigError, CLI exit 2)."""
    g = cfg.gate
    if g.kind == "expert_choice":
        raise ConfigError("gate.kind", g.kind, "expert choice looks at all tokens of the batch, so it would leak "
                          "future tokens in a causal model (model.arch gpt / gpt_moe)")
    if g.capacity_factor is not None:
        raise ConfigError("gate.capacity_factor", g.capacity_factor,
                          "capacity dropping ranks tokens across the batch (first choices of later tokens before "
                          "second choices of earlier ones, earlier sequences first), so it would leak future "
                          "tokens in a causal model; use null (dropless) with model.arch gpt / gpt_moe")


def dense_width(cfg: ExperimentConfig) -> int:
    """Arch gpt's FFN width where gpt_moe has a MoE: the experts a token runs (top_k + shared) side by side."""
    gpt = cfg.model.gpt
    return (cfg.gate.top_k + gpt.num_shared_experts) * gpt.mlp_dim


class GPT(nn.Module):
    """Decoder-only LM; forward(idx_BT) -> ModelOutput with log_probs_BC = log_softmax(logits) as (B * T, V)."""

    def __init__(self, cfg: ExperimentConfig, vocab_size: int):
        super().__init__()
        gpt, moe = cfg.model.gpt, cfg.model.arch == "gpt_moe"
        if cfg.model.arch not in ("gpt", "gpt_moe"):
            raise ConfigError("model.arch", cfg.model.arch, "GPT builds model.arch gpt or gpt_moe")
        check_causal_routing(cfg)
        rows = gpt.vocab_size or vocab_size
        if rows < vocab_size:
            raise ConfigError("model.gpt.vocab_size", gpt.vocab_size,
                              f"smaller than the data's vocabulary ({vocab_size} ids)")
        self.block_size, self.vocab_size = gpt.block_size, rows
        self.tok_embed = nn.Embedding(rows, gpt.dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, gpt.block_size, gpt.dim)) if gpt.positions == "learned" \
            else None
        self.rotary = Rotary(gpt.dim // gpt.heads, gpt.block_size) if gpt.positions == "rope" else None
        self.drop = nn.Dropout(gpt.dropout)
        self.hypernet = build_hypernet(cfg) if moe else None  # one per model, shared by every MoE layer (HyperMoE)
        blocks = []
        for i in range(gpt.depth):
            if i % gpt.moe_every == gpt.moe_every - 1:
                ffn = build_token_moe(cfg, layer_index=i, hypernet=self.hypernet) if moe \
                    else FeedForward(gpt.dim, dense_width(cfg))
            else:
                ffn = FeedForward(gpt.dim, gpt.mlp_dim)
            blocks.append(GPTBlock(gpt.dim, gpt.heads, ffn, gpt.dropout, self.rotary))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(gpt.dim)
        self.head = nn.Linear(gpt.dim, rows, bias=False)
        self.head.weight = self.tok_embed.weight  # tied (Press & Wolf 2017), as GPT-2
        self._init_weights(gpt.depth)

    def _init_weights(self, depth: int) -> None:
        """nanoGPT's init everywhere except inside TokenMoE layers and the HyperNetwork (their own init)."""
        def visit(module: nn.Module) -> None:
            if isinstance(module, (TokenMoE, HyperNetwork)):
                return
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=INIT_STD)
            for child in module.children():
                visit(child)

        visit(self)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed, std=INIT_STD)
        # GPT-2: each residual branch's output projection scaled down so the residual stream's variance stays O(1)
        residual_std = INIT_STD / math.sqrt(2 * depth)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            if isinstance(block.ffn, FeedForward):
                nn.init.normal_(block.ffn.fc2.weight, std=residual_std)

    def forward(self, idx_BT: torch.Tensor) -> ModelOutput:
        b, t = idx_BT.shape
        if t > self.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than model.gpt.block_size {self.block_size}")
        x_BTD = self.tok_embed(idx_BT)
        if self.pos_embed is not None:
            x_BTD = x_BTD + self.pos_embed[:, :t]
        x_BTD = self.drop(x_BTD)
        x_BTD, gates, stats = run_blocks(self.blocks, x_BTD)
        logits_BTV = self.head(self.norm(x_BTD))
        log_probs_NV = F.log_softmax(logits_BTV.float(), dim=-1).view(b * t, -1)
        return ModelOutput(log_probs_BC=log_probs_NV, gates=gates, items_per_sample=t, selected_pred_B=None,
                           aux_loss=None, layer_stats=stats)


def build_gpt(cfg: ExperimentConfig, vocab_size: int) -> GPT:
    """The GPT of cfg.model.gpt (arch gpt: dense; gpt_moe: cfg.model.num_experts experts, router of cfg.gate).

    Args:
        cfg: the experiment config.
        vocab_size: the data's vocabulary (TextDataset.vocab_size); model.gpt.vocab_size may pad it up.
    """
    return GPT(cfg, vocab_size)
