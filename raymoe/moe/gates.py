"""Sample-level gates of the paper MoE; each returns a GateResult (raymoe/moe/routing.py).

* SoftmaxGate, the "original" gate: g(x) = softmax(W_out ReLU(h_g(x)) / T) (docs/paper-notes.md §1.1). Dense.
* AttentiveGate (docs/paper-notes.md §2): q = W_q h_g(x), k_e = W_k h_e(x) from expert e's pre-ReLU hidden layer,
  a_e = q.k_e / sqrt(H), g = softmax(a). No value projection, no temperature. Dense; needs every expert's hidden.
* TopKGate: p = softmax(W_out ReLU(h_g(x)) / T), keep the top k. Weights are renormalised over the kept experts
  when `renormalize` (default: only when k > 1, as GShard); NOTE with k = 1 and renormalisation the single weight
  is exactly 1, so the gate then gets no gradient from the task loss (only from regularisers).
* NoisyTopKGate (Shazeer et al. 2017): H = x W_g + N(0,1) softplus(x W_noise) (+ noise_eps in the std) while
  training only, G = softmax(KeepTopK(H, k)) (the paper's G is the renormalised top-k: raymoe's one rule,
  routing.renormalizes, gives it for k > 1; with k = 1 the weight stays p_{i*}), and the smooth load estimate of
  their eq. 8-10 in load_E. x = ReLU(h_g(x)), the original gate's features. W_g and W_noise start
  at zero as in the Hyper_MoE reference code, so all experts tie at first and only the noise breaks the tie.

Dense gates report experts_NK = arange(E) for every item and weights_NK = probs_NE.
Shape legend: N samples, E experts, K experts kept per sample, H gate/expert hidden width, B = N.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.moe.routing import GateResult, renormalizes, select_top_k, smooth_load, standard_normal


def dense_result(probs_NE: torch.Tensor, logits_NE: torch.Tensor) -> GateResult:
    """Every item goes to every expert with weight g_e."""
    n, e = probs_NE.shape
    experts_NK = torch.arange(e, device=probs_NE.device).expand(n, e)
    return GateResult(probs_NE=probs_NE, weights_NK=probs_NE, experts_NK=experts_NK, logits_NE=logits_NE)


class SoftmaxGate(nn.Module):
    """The original gate: softmax(W_out ReLU(h_g(x)) / T)."""

    dense = True
    needs_expert_hidden = False

    def __init__(self, trunk: nn.Module, num_experts: int, temperature: float = 1.0):
        super().__init__()
        self.trunk, self.num_experts, self.temperature = trunk, num_experts, temperature
        self.out = nn.Linear(trunk.out_features, num_experts)

    def forward(self, x: torch.Tensor) -> GateResult:
        logits_NE = self.out(F.relu(self.trunk(x))) / self.temperature
        return dense_result(torch.softmax(logits_NE, dim=-1), logits_NE)


class AttentiveGate(nn.Module):
    """Attention-like gate: query from the gate trunk, keys from the experts' hidden layers (docs/paper-notes.md §2)."""

    dense = True
    needs_expert_hidden = True

    def __init__(self, trunk: nn.Module, num_experts: int, hidden: int):
        super().__init__()
        if trunk.out_features != hidden:
            raise ValueError(f"gate trunk width {trunk.out_features} != expert hidden width {hidden}")
        self.trunk, self.num_experts, self.hidden = trunk, num_experts, hidden
        self.w_q = nn.Linear(hidden, hidden, bias=False)
        self.w_k = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor, hidden_BEH: torch.Tensor) -> GateResult:
        """hidden_BEH: every expert's pre-ReLU fc2 output for each sample (any strides)."""
        q_BH = self.w_q(self.trunk(x))
        # q . (W_k h_e) = (q W_k) . h_e: one (B, H) product instead of keys for every (sample, expert) pair
        scores_BE = torch.einsum("bh,beh->be", q_BH @ self.w_k.weight, hidden_BEH) / math.sqrt(self.hidden)
        return dense_result(torch.softmax(scores_BE, dim=-1), scores_BE)


class TopKGate(nn.Module):
    """Softmax top-k on the original gate's logits (the reference's gate_layers_top_k + KeepTopK)."""

    dense = False
    needs_expert_hidden = False

    def __init__(self, trunk: nn.Module, num_experts: int, top_k: int = 1, renormalize: bool | None = None,
                 temperature: float = 1.0):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k ({top_k}) must be in [1, num_experts ({num_experts})]")
        self.trunk, self.num_experts, self.top_k, self.temperature = trunk, num_experts, top_k, temperature
        self.renormalize = renormalizes(renormalize, top_k)
        self.out = nn.Linear(trunk.out_features, num_experts)

    def forward(self, x: torch.Tensor) -> GateResult:
        logits_NE = self.out(F.relu(self.trunk(x))) / self.temperature
        return select_top_k(torch.softmax(logits_NE, dim=-1), logits_NE, self.top_k, self.renormalize)


class NoisyTopKGate(nn.Module):
    """Noisy top-k gating (Shazeer et al. 2017, eq. 3-5 and the load estimate of eq. 8-10)."""

    dense = False
    needs_expert_hidden = False

    def __init__(self, trunk: nn.Module, num_experts: int, top_k: int = 1, renormalize: bool | None = None,
                 noise_eps: float = 1e-2, temperature: float = 1.0, generator: torch.Generator | None = None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k ({top_k}) must be in [1, num_experts ({num_experts})]")
        self.trunk, self.num_experts, self.top_k = trunk, num_experts, top_k
        self.noise_eps, self.temperature, self.generator = noise_eps, temperature, generator
        self.renormalize = renormalizes(renormalize, top_k)  # renormalised: G = softmax(KeepTopK(H, k))
        self.w_gate_HE = nn.Parameter(torch.zeros(trunk.out_features, num_experts))
        self.w_noise_HE = nn.Parameter(torch.zeros(trunk.out_features, num_experts))

    def forward(self, x: torch.Tensor) -> GateResult:
        feats_NH = F.relu(self.trunk(x))
        clean_NE = feats_NH @ self.w_gate_HE
        if self.training:
            std_NE = F.softplus(feats_NH @ self.w_noise_HE) + self.noise_eps
            noisy_NE = clean_NE + self.draw_noise(clean_NE) * std_NE
            load_E = smooth_load(clean_NE, noisy_NE, std_NE, self.top_k)
        else:
            noisy_NE, load_E = clean_NE, None
        logits_NE = noisy_NE / self.temperature
        result = select_top_k(torch.softmax(logits_NE, dim=-1), logits_NE, self.top_k, self.renormalize, load_E)
        if load_E is None:  # no noise at test: the load is the plain count of chosen experts
            counts_E = torch.bincount(result.experts_NK.reshape(-1), minlength=self.num_experts)
            result = GateResult(result.probs_NE, result.weights_NK, result.experts_NK, result.logits_NE,
                                counts_E.to(clean_NE.dtype))
        return result

    def draw_noise(self, like_NE: torch.Tensor) -> torch.Tensor:
        """The training noise (eq. 4's StandardNormal()); tests replace it to feed each rank its rows of one draw."""
        return standard_normal(like_NE, self.generator)
