"""HyperMoE (Zhao et al., ACL 2024, arXiv 2402.12656): a HyperExpert generated from the unselected experts.

Per MoE layer l (computation as in the authors' released code, docs/hypermoe-notes.md §1.2):
    s_t   = sum_{j not selected by token t} e_j^(l)          expert embeddings, a SUM; router probs do not enter
    z_t   = W2 ReLU(W1 s_t + c1) + c2                        embedding_process (per layer)
    h_t   = ReLU(W_h [z_t ; LayerEmbed(l)] + c_h)            HyperNetwork, ONE module shared by all layers
    W_down, b_down, W_up, b_up = heads(h_t)                  a d x b / b x d bottleneck adapter
    HyperExpert(x_t) = ReLU(x_t W_down + b_down) W_up + b_up  added to the MoE output (no internal residual)

s_t depends only on the token's *set* of selected experts, so the adapter is generated once per distinct
unselected set present in the batch (<= E sets for top-1, <= C(E, k) for top-k; found with torch.unique over
a bitmask code) and applied to the tokens of each set as one grouped GEMM. This is numerically the per-token
computation of the reference code without its per-token weight generation (docs/hypermoe-notes.md §1.3(2)).
The selection is taken *before* capacity dropping, so dropped tokens still get the HyperExpert (docs/hypermoe-notes.md §1.3(4)).
Hyperfan-in initialisation makes the generated adapter start at ~0, i.e. training starts from the plain MoE.

Shape legend: N tokens, D model dim, E experts, K experts per token, U distinct unselected sets,
A adapter bottleneck (adapter_dim), L layer-embedding width, I hypernetwork input dim, M expert embedding dim, R tokens sorted by set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.moe.dispatch import inverse_permutation, put_rows, take_rows
from raymoe.moe.token.grouped import grouped_ffn, grouped_ffn_applies


@dataclass(frozen=True, slots=True)
class AdapterWeights:
    """One generated bottleneck adapter per unselected set."""

    w_down_UDA: torch.Tensor
    b_down_UA: torch.Tensor
    w_up_UAD: torch.Tensor
    b_up_UD: torch.Tensor


class SelectionSets(NamedTuple):
    """unselected_UE: 0/1 float mask of the experts NOT chosen, one row per distinct set; set_N: each token's set;
    order_R: token indices sorted by set (stable); counts: tokens per set (python ints)."""

    unselected_UE: torch.Tensor
    set_N: torch.Tensor
    order_R: torch.Tensor
    counts: list[int]


class HyperNetwork(nn.Module):
    """The cross-layer hypernetwork (the code's ParameterGenerator): [z ; layer embedding] -> adapter weights."""

    def __init__(self, num_layers: int, dim: int, input_dim: int = 128, bottleneck: int = 128,
                 layer_embed_dim: int = 10, adapter_dim: int = 64):
        super().__init__()
        self.dim, self.input_dim, self.adapter_dim, self.num_layers = dim, input_dim, adapter_dim, num_layers
        self.layer_embed = nn.Embedding(num_layers, layer_embed_dim)
        self.trunk = nn.Linear(input_dim + layer_embed_dim, bottleneck)
        self.w_down_head = nn.Linear(bottleneck, dim * adapter_dim)
        self.b_down_head = nn.Linear(bottleneck, adapter_dim)
        self.w_up_head = nn.Linear(bottleneck, adapter_dim * dim)
        self.b_up_head = nn.Linear(bottleneck, dim)
        self.reset_heads(bottleneck)

    def reset_heads(self, bottleneck: int) -> None:
        """Hyperfan-in init of the Hyper_MoE code: tiny heads, zero head biases, so the adapter starts ~0."""
        for head, fan in ((self.w_down_head, self.dim), (self.w_up_head, self.adapter_dim)):
            bound = 1e-3 * math.sqrt(3 / (bottleneck * fan))
            nn.init.uniform_(head.weight, -bound, bound)
        for head in (self.b_down_head, self.b_up_head):
            bound = 1e-3 * math.sqrt(3 / bottleneck)
            nn.init.uniform_(head.weight, -bound, bound)
        for head in (self.w_down_head, self.b_down_head, self.w_up_head, self.b_up_head):
            nn.init.zeros_(head.bias)

    def forward(self, z_UI: torch.Tensor, layer_index: int) -> AdapterWeights:
        u, d, b = z_UI.shape[0], self.dim, self.adapter_dim
        if not 0 <= layer_index < self.num_layers:
            raise IndexError(f"layer_index {layer_index} outside the hypernetwork's {self.num_layers} layers")
        layer_UL = self.layer_embed.weight[layer_index].expand(u, -1)
        h = F.relu(self.trunk(torch.cat([z_UI, layer_UL], dim=-1)))
        return AdapterWeights(w_down_UDA=self.w_down_head(h).view(u, d, b), b_down_UA=self.b_down_head(h),
                              w_up_UAD=self.w_up_head(h).view(u, b, d), b_up_UD=self.b_up_head(h))


class HyperMoE(nn.Module):
    """Per-layer HyperMoE part: expert embeddings + embedding_process; uses the model's shared HyperNetwork.

    The HyperNetwork is held by reference, not registered here, so the model that owns it lists its
    parameters (and checkpoint entries) once. A standalone layer must keep the HyperNetwork's parameters
    in its optimizer itself.
    """

    def __init__(self, num_experts: int, hypernet: HyperNetwork, expert_embed_dim: int = 128,
                 process_dim: int = 128):
        super().__init__()
        self.num_experts = num_experts
        self._hypernet = (hypernet,)  # a tuple hides it from nn.Module registration
        self.expert_embed = nn.Embedding(num_experts, expert_embed_dim)
        self.embedding_process = nn.Sequential(nn.Linear(expert_embed_dim, process_dim), nn.ReLU(),
                                               nn.Linear(process_dim, hypernet.input_dim))

    @property
    def hypernet(self) -> HyperNetwork:
        return self._hypernet[0]

    def unselected_sets(self, experts_NK: torch.Tensor) -> SelectionSets:
        """Distinct selection sets in the batch, and the tokens grouped by set.

        Args:
            experts_NK: selected expert ids (distinct per token, all >= 0).
        Returns:
            SelectionSets (see there).
        """
        e, dev = self.num_experts, experts_NK.device
        selected_NE = torch.zeros(experts_NK.shape[0], e, dtype=torch.bool, device=dev)
        selected_NE.scatter_(1, experts_NK, True)
        if e <= 62:  # one int64 code per set: a single sort gives the sets, their sizes and the token order
            bits_E = torch.ones(e, dtype=torch.long, device=dev) << torch.arange(e, device=dev)
            codes_R, order_R = torch.sort((selected_NE.long() * bits_E).sum(-1), stable=True)
            codes_U, counts_U = torch.unique_consecutive(codes_R, return_counts=True)
            selected_UE = (codes_U[:, None] & bits_E) != 0
            set_R = torch.repeat_interleave(torch.arange(codes_U.shape[0], device=dev), counts_U)
            set_N = torch.empty_like(set_R).scatter_(0, order_R, set_R)
        else:
            selected_UE, set_N = torch.unique(selected_NE, dim=0, return_inverse=True)
            order_R = torch.argsort(set_N, stable=True)
            counts_U = torch.bincount(set_N, minlength=selected_UE.shape[0])
        return SelectionSets((~selected_UE).float(), set_N, order_R, counts_U.tolist())

    def generate(self, unselected_UE: torch.Tensor, layer_index: int) -> AdapterWeights:
        """s = sum of the unselected experts' embeddings -> embedding_process -> shared hypernetwork."""
        s_UM = unselected_UE @ self.expert_embed.weight
        return self.hypernet(self.embedding_process(s_UM), layer_index)

    def top1_sets(self) -> torch.Tensor:
        """unselected_UE of top-1 routing with one set per expert, in expert order: set u left out expert u."""
        eye_EE = torch.eye(self.num_experts, device=self.expert_embed.weight.device)
        return 1.0 - eye_EE

    def forward_grouped(self, x_RD: torch.Tensor, unselected_UE: torch.Tensor, counts: list[int],
                        layer_index: int) -> torch.Tensor:
        """HyperExpert output of rows grouped by set: set u's adapter on the next counts[u] rows.

        Args:
            x_RD: tokens grouped by set (set-major).
            unselected_UE: the sets (0/1 rows), len(counts) of them.
            counts: rows per set (python ints; zero for a set without tokens).
        Returns:
            y_RD in the same row order.
        """
        w = self.generate(unselected_UE, layer_index)
        dt = x_RD.dtype
        w_down, w_up = w.w_down_UDA.to(dt), w.w_up_UAD.to(dt)
        # NOTE: narrow adapters over many sets: grouped_mm's one call beat the per-set loop on CPU too
        # (docs/benchmarks.md, round 12), unlike the experts' wide FFNs (use_grouped_mm)
        impl = "grouped_mm" if grouped_ffn_applies(x_RD, w_down, w_up) else "loop"
        return grouped_ffn(x_RD, w_down, w.b_down_UA.to(dt), w_up, w.b_up_UD.to(dt), counts, "relu", impl)

    def forward(self, x_ND: torch.Tensor, experts_NK: torch.Tensor, layer_index: int,
                out_ND: torch.Tensor | None = None) -> torch.Tensor:
        """HyperExpert output per token: the adapter of its unselected set applied to x (the MoE's input).

        Args:
            x_ND: the tokens entering the MoE layer.
            experts_NK: the router's choices before capacity dropping.
            layer_index: this layer's index for the layer embedding.
            out_ND: if given, the output is added into it in place (saves a pass over N x D) and it is returned.
        Returns:
            y_ND (or out_ND + y_ND).
        """
        sets = self.unselected_sets(experts_NK)
        order_R = sets.order_R
        inverse_R = inverse_permutation(order_R, x_ND.shape[0])  # every token is in exactly one set
        x_RD = take_rows(x_ND, order_R, inverse_R)
        y_RD = self.forward_grouped(x_RD, sets.unselected_UE, sets.counts, layer_index)
        if out_ND is None:
            return put_rows(y_RD, order_R, x_ND.shape[0], inverse_R)
        return out_ND.index_add_(0, order_R, y_RD.to(out_ND.dtype))  # bf16 autocast: experts may answer in bf16
