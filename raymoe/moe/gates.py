"""The paper's sample-level gates: a router of the one family (raymoe/moe/routers.py) over the gate trunk's features.

    original gate (gate.kind softmax):  LinearRouter, dense, over ReLU(h_g(x))     g = softmax(W_out ReLU(h_g(x)) / T)
    top-k gate (topk):                  LinearRouter, top-k, over ReLU(h_g(x))
    noisy top-k gate (noisy_topk):      NoisyRouter over ReLU(h_g(x))
    attentive gate (attentive):         AttentiveRouter, dense, query from h_g(x) (ReLU only on Fashion-MNIST,
                                        docs/paper-notes.md §1.2), keys from the experts' pre-ReLU fc2 rows (§2)

Dense gates report experts_NK = arange(E) for every sample and weights_NK = probs_NE (routing.dense_result).
NOTE with k = 1 and renormalisation the single weight is exactly 1, so a top-k gate then gets no gradient from
the task loss (only from regularisers); the default renormalises only when k > 1 (routing.renormalizes).

Shape legend: B samples, E experts, H gate trunk / expert hidden width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.moe.routers import Router
from raymoe.moe.routing import GateResult


class TrunkGate(nn.Module):
    """router(features), features = h_g(x) (with ReLU when `relu_features`); `trunk` is the gate network
    (raymoe/models/paper_gate_nets.py), its weights under `trunk.*` and the router's under `router.*`."""

    def __init__(self, trunk: nn.Module, router: Router, relu_features: bool):
        super().__init__()
        self.trunk, self.router, self.relu_features = trunk, router, relu_features

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def dense(self) -> bool:
        return self.router.dense

    @property
    def needs_expert_hidden(self) -> bool:
        return self.router.needs_expert_hidden

    def forward(self, x: torch.Tensor, hidden_BEH: torch.Tensor | None = None) -> GateResult:
        """hidden_BEH: every expert's pre-ReLU fc2 output for each sample (attentive gate only; any strides)."""
        feats_BH = self.trunk(x)
        if self.relu_features:
            feats_BH = F.relu(feats_BH)
        keys = None if hidden_BEH is None else (lambda w_k_HH: hidden_BEH.to(w_k_HH.dtype) @ w_k_HH)
        return self.router(feats_BH, keys)
