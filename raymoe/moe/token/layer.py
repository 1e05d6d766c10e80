"""Token-level sparse MoE layer: a drop-in replacement for a transformer block's FFN.

    y = sum_{kept (token, expert) pairs} w * Expert_e(x)   [+ HyperExpert(x)]   [+ SharedFFN(x)]

Flow: router -> (capacity dropping) -> dispatcher.dispatch -> experts.forward_grouped -> dispatcher.combine
(token choice: the N*K pairs are token-major; dispatch gathers each pair's row from the token and combine returns
each token's weighted sum of its pairs; expert choice: only chosen pairs are sent, weighted, and index_add brings
them back). Top-1 HyperMoE on one worker without capacity runs on the dispatched rows and returns through the
same combine (_hypermoe_in_dispatched_rows).
The layer touches the experts ONLY through `self.dispatcher` and `self.experts.forward_grouped`, so expert
parallelism can swap both from outside (all_to_all.py:
`layer.dispatcher = AllToAllDispatcher(...)`, `layer.experts = layer.experts.shard(ep_rank, ep_size)`);
nothing here assumes all experts are local (except the attentive router, which says so).

forward returns (y, GateResult, stats): the GateResult is over N = all tokens of the call (capacity-dropped
pairs have expert -1 and weight 0); stats = {"dropped_frac": share of routed (token, choice) pairs dropped by
capacity (expert choice: share of tokens no expert took), "load_E": tokens processed per expert (float)}.

Shape legend: N tokens, D model dim, E experts, K experts per token, P (token, expert) pairs sent,
R rows received by the local experts.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn

from raymoe.moe.dispatch import LocalDispatcher
from raymoe.moe.routers import Router
from raymoe.moe.routing import GateResult
from raymoe.moe.token.capacity import token_capacity, within_capacity
from raymoe.moe.token.experts import TokenExperts
from raymoe.moe.token.grouped import Impl
from raymoe.moe.token.hypermoe import HyperMoE
from raymoe.moe.token.shared import shared_experts


class TokenMoE(nn.Module):
    """Sparse MoE FFN over tokens.

    Args:
        dim: model dim D.
        d_ff: hidden width of each expert.
        num_experts: E (global).
        router: a sparse Router of the one family (raymoe/moe/routers.py).
        capacity_factor: token-choice capacity ceil(cf * T * k / E) with dropping; None = dropless. Must be None
            for expert choice (that router owns its capacity).
        hypermoe: per-layer HyperMoE part (needs a token-choice router), or None.
        num_shared_experts: DeepSeekMoE always-on experts (0 = none).
        layer_index: this layer's index in the model (HyperMoE layer embedding).
        impl: expert GEMM path, "auto" | "grouped_mm" | "loop".
    """

    def __init__(self, dim: int, d_ff: int, num_experts: int, router: Router,
                 capacity_factor: float | None = None, hypermoe: HyperMoE | None = None,
                 num_shared_experts: int = 0, layer_index: int = 0, impl: Impl = "auto"):
        super().__init__()
        if capacity_factor is not None and not router.token_choice:
            raise ValueError("capacity_factor applies to token-choice routers; expert choice has its own capacity")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        if hypermoe is not None and not router.token_choice:
            raise ValueError("HyperMoE needs a per-token unselected set: use a token-choice router")
        if router.dense:
            raise ValueError("a token MoE layer needs a sparse router (top_k set, or expert choice)")
        if router.num_experts != num_experts:
            raise ValueError(f"router has {router.num_experts} experts, layer has {num_experts}")
        self.dim, self.num_experts, self.layer_index = dim, num_experts, layer_index
        self.capacity_factor = capacity_factor
        self.router = router
        self.experts = TokenExperts(num_experts, dim, d_ff, impl)
        self.dispatcher = LocalDispatcher(num_experts)
        self.hypermoe = hypermoe
        self.shared = shared_experts(dim, d_ff, num_shared_experts) if num_shared_experts > 0 else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, GateResult, dict[str, torch.Tensor]]:
        """x: (..., D) -> (y of the same shape, GateResult over N = prod(leading dims), stats)."""
        x_ND = x.reshape(-1, self.dim)
        keys = functools.partial(self.experts.hidden_keys, x_ND) if self.router.needs_expert_hidden else None
        gate = self.router(x_ND, keys)
        selected_NK = gate.experts_NK  # before capacity: HyperMoE's unselected set (docs/hypermoe-notes.md §1.3(4))
        if self.capacity_factor is not None:
            cap = token_capacity(self.capacity_factor, x_ND.shape[0], selected_NK.shape[1], self.num_experts)
            kept_NK = within_capacity(selected_NK, cap, self.num_experts)
            gate = dataclasses.replace(gate, experts_NK=torch.where(kept_NK, selected_NK, -1),
                                       weights_NK=torch.where(kept_NK, gate.weights_NK, 0.0))
        hyper_in_rows = self._hypermoe_in_dispatched_rows(selected_NK)
        y_ND = self._routed_experts(x_ND, gate.experts_NK, gate.weights_NK, hyper_in_rows)
        # in-place adds: y_ND is this layer's own fresh tensor and no backward formula needs its value
        if self.hypermoe is not None and not hyper_in_rows:
            y_ND = self.hypermoe(x_ND, selected_NK, self.layer_index, out_ND=y_ND)
        if self.shared is not None:
            y_ND = y_ND.add_(self.shared(x_ND))
        with torch.no_grad():
            kept_ids = gate.experts_NK[gate.experts_NK >= 0]
            load_E = torch.bincount(kept_ids, minlength=self.num_experts).float()
            if self.router.token_choice:
                dropped = 1.0 - kept_ids.numel() / max(selected_NK.numel(), 1)
            else:  # expert choice: tokens that no expert took
                dropped = float((gate.experts_NK < 0).all(dim=1).float().mean())
        stats = {"dropped_frac": torch.tensor(dropped, device=x.device), "load_E": load_E}
        return y_ND.view(x.shape), gate, stats

    def _hypermoe_in_dispatched_rows(self, selected_NK: torch.Tensor) -> bool:
        """Whether the HyperExpert can run on the experts' dispatched rows: top-1, dropless, one worker.

        There a token's unselected set is "every expert but the chosen one", so the dispatch's stable sort by
        expert is HyperMoE's grouping by set (docs/hypermoe-notes.md §1.3(2)), and its output returns through the
        experts' combine: one gather and one scatter fewer, forward and backward.
        """
        return (self.hypermoe is not None and selected_NK.shape[1] == 1 and self.capacity_factor is None
                and self.dispatcher.local_rows)

    def _routed_experts(self, x_ND: torch.Tensor, experts_NK: torch.Tensor, weights_NK: torch.Tensor,
                        hyper_in_rows: bool = False) -> torch.Tensor:
        """sum over a token's kept pairs of weight * expert(x), through dispatch / grouped experts / combine;
        with hyper_in_rows (see _hypermoe_in_dispatched_rows) plus the HyperExpert's output."""
        n, k = experts_NK.shape
        if self.router.token_choice:
            # pairs token-major (n, j) -> pair n * k + j; dropped pairs stay in with id -1 (the dispatcher skips
            # them, combine gives them weight 0); the dispatcher gathers each pair's row from x_ND and combine
            # returns each token's weighted sum, so no N * k copy of x or of the output is made
            x_RD, counts, meta = self.dispatcher.dispatch(x_ND, experts_NK.reshape(-1), pairs_per_item=k)
            y_RD = self.experts.forward_grouped(x_RD, counts)
            if hyper_in_rows:  # w * expert(x) + HyperExpert(x) on the grouped rows, then one combine
                w_R1 = weights_NK.reshape(-1).index_select(0, meta.order_p).to(y_RD.dtype).unsqueeze(1)
                hyper_RD = self.hypermoe.forward_grouped(x_RD, self.hypermoe.top1_sets(), counts, self.layer_index)
                return self.dispatcher.combine(torch.addcmul(hyper_RD.to(y_RD.dtype), y_RD, w_R1), meta)
            return self.dispatcher.combine(y_RD, meta, weights_NK)
        # expert choice: K = E slots per token, mostly empty; send only the chosen pairs
        pair_P = (experts_NK.reshape(-1) >= 0).nonzero().squeeze(1)
        tok_P = pair_P // k
        x_RD, counts, meta = self.dispatcher.dispatch(x_ND.index_select(0, tok_P), experts_NK.reshape(-1)[pair_P])
        y_PD = self.dispatcher.combine(self.experts.forward_grouped(x_RD, counts), meta)
        y_PD = y_PD * weights_NK.reshape(-1)[pair_P].to(y_PD.dtype).unsqueeze(1)
        return y_PD.new_zeros(n, y_PD.shape[1]).index_add_(0, tok_P, y_PD)
