"""The one router family, used by the paper's sample-level MoE (over the gate trunk's features, raymoe/moe/gates.py)
and by the token-level MoE layers (over token features, raymoe/moe/token/layer.py). docs/routers.md has the table.

A router computes scores from features and hands them to the one selection step of raymoe/moe/routing.py
(`select`: dense or top-k, the one renormalisation rule, the bias-balanced choice), so the two levels differ only
in what the features are and in `top_k` (None = dense: every expert, weight g_e, the paper's gates).

* LinearRouter: logits = proj(x) / T. Dense with bias: the paper's original gate, softmax(W_out ReLU(h_g(x)) / T)
  (docs/paper-notes.md §1.1). Top-k: the reference's top-k gate, Switch (k = 1, optional multiplicative input
  jitter, Fedus et al. 2021) or GShard (k = 2, renormalised; Lepikhin et al. 2020).
* NoisyRouter: Shazeer et al. 2017, H = x W_g + N(0,1) (softplus(x W_noise) + eps) while training (H = x W_g in
  eval), p = softmax(H / T), top-k, and the smooth load of their eq. 8-10 as load_E. W_g and W_noise start at zero
  as in the Hyper_MoE reference code, so all experts tie at first and only the noise breaks the tie.
* AttentiveRouter: the attention-like gate of Krishnamurthy et al. 2023 (docs/paper-notes.md §2): query
  q = W_q x, key k_e = W_k h_e(x) from expert e's pre-activation hidden layer, a_e = q.k_e / sqrt(key dim),
  p = softmax(a). No value projection, no temperature. Dense at sample level (the paper); top-k on tokens. It
  needs every expert's hidden layer: the caller passes `expert_keys`, a function W_k^T -> keys of every expert.
* ExpertChoiceRouter: Zhou et al. 2022, expert e takes the C tokens with the highest p[:, e],
  C = min(T, ceil(cf * T / E)) over the T tokens of this call (a token's experts depend on the rest of the
  batch: never in a causal model). Its GateResult has K = E: experts_NK[n, e] = e if e took n, else -1.

Routers compute in their weights' dtype with autocast off (float32 master weights under bf16 autocast: routing is
precision-sensitive) and return the choices before
capacity dropping (the token layer applies capacity, raymoe/moe/token/capacity.py).

Shape legend: N items (samples or tokens), I router input features, E experts, K experts per item,
H attentive query/key width (paper H), Q expert-choice capacity.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.moe.bias_balance import BiasBalancer
from raymoe.moe.routing import GateResult, renormalizes, select, smooth_load, standard_normal
from raymoe.moe.short_softmax import softmax_last

# W_k^T (H, A) -> keys_NEH of every expert for every item (sample level: from the experts' hidden rows; token
# level: TokenExperts.hidden_keys, which folds W1_e W_k first)
ExpertKeys = Callable[[torch.Tensor], torch.Tensor]


class Router(nn.Module):
    """Base: `forward(x_NI, expert_keys=None) -> GateResult`.

    top_k: experts kept per item, None = dense (every expert). token_choice: each item picks its experts (False
    for expert choice). needs_expert_hidden: forward needs `expert_keys` (the experts run before the router).
    """

    token_choice: bool = True
    needs_expert_hidden: bool = False

    def __init__(self, num_experts: int, top_k: int | None = None, renormalize: bool | None = None,
                 bias_balance_rate: float = 0.0):
        super().__init__()
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k ({top_k}) must be in [1, num_experts ({num_experts})]")
        if top_k is None and bias_balance_rate > 0:
            raise ValueError("bias balancing changes the top-k choice; a dense router has none")
        self.num_experts, self.top_k = num_experts, top_k
        self.renormalize = renormalizes(renormalize, top_k or num_experts)
        self.balancer = BiasBalancer(num_experts, bias_balance_rate) if bias_balance_rate > 0 else None

    @property
    def dense(self) -> bool:
        return self.top_k is None

    def scores(self, x_NI: torch.Tensor, expert_keys: ExpertKeys | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits_NE in the router weights' dtype, differentiable load_E or None)."""
        raise NotImplementedError

    def forward(self, x_NI: torch.Tensor, expert_keys: ExpertKeys | None = None) -> GateResult:
        logits_NE, load_E = self.scores(x_NI, expert_keys)
        probs_NE = softmax_last(logits_NE)
        biased_NE = None if self.balancer is None else self.balancer.selection_scores(probs_NE)
        gate = select(probs_NE, logits_NE, self.top_k, self.renormalize, load_E, biased_NE)
        if self.balancer is not None:
            self.balancer.record(gate.experts_NK)
        return gate


class LinearRouter(Router):
    """softmax(proj(x) / T): the paper's original gate (dense, with bias), its top-k gate, Switch and GShard."""

    def __init__(self, in_features: int, num_experts: int, top_k: int | None = None, renormalize: bool | None = None,
                 temperature: float = 1.0, jitter: float = 0.0, bias: bool = False, bias_balance_rate: float = 0.0):
        super().__init__(num_experts, top_k, renormalize, bias_balance_rate)
        self.temperature, self.jitter = temperature, jitter
        self.proj = nn.Linear(in_features, num_experts, bias=bias)

    def scores(self, x_NI, expert_keys):
        x = x_NI.to(self.proj.weight.dtype)
        if self.training and self.jitter > 0:  # Switch: multiply the router input by U(1 - eps, 1 + eps)
            x = x * torch.empty_like(x).uniform_(1 - self.jitter, 1 + self.jitter)
        with torch.autocast(x.device.type, enabled=False):
            logits_NE = self.proj(x)
        return (logits_NE if self.temperature == 1.0 else logits_NE / self.temperature), None


class NoisyRouter(Router):
    """Noisy top-k gating (Shazeer et al. 2017, eq. 3-5, and the smooth load of eq. 8-10)."""

    def __init__(self, in_features: int, num_experts: int, top_k: int = 1, renormalize: bool | None = None,
                 noise_eps: float = 1e-2, temperature: float = 1.0, bias_balance_rate: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__(num_experts, top_k, renormalize, bias_balance_rate)
        self.noise_eps, self.temperature, self.generator = noise_eps, temperature, generator
        self.w_gate_IE = nn.Parameter(torch.zeros(in_features, num_experts))
        self.w_noise_IE = nn.Parameter(torch.zeros(in_features, num_experts))

    def scores(self, x_NI, expert_keys):
        x = x_NI.to(self.w_gate_IE.dtype)
        with torch.autocast(x.device.type, enabled=False):
            clean_NE = x @ self.w_gate_IE
            std_NE = F.softplus(x @ self.w_noise_IE) + self.noise_eps
        noisy_NE = clean_NE + self.draw_noise(clean_NE) * std_NE if self.training else clean_NE
        return noisy_NE / self.temperature, smooth_load(clean_NE, noisy_NE, std_NE, self.top_k)

    def draw_noise(self, like_NE: torch.Tensor) -> torch.Tensor:
        """The training noise (eq. 4's StandardNormal()); tests replace it to feed each rank its rows of one draw."""
        return standard_normal(like_NE, self.generator)


class AttentiveRouter(Router):
    """Attention-like scores: query from the router input, keys from each expert's hidden layer."""

    needs_expert_hidden = True

    def __init__(self, in_features: int, hidden: int, num_experts: int, top_k: int | None = None,
                 renormalize: bool | None = None, key_dim: int | None = None, bias_balance_rate: float = 0.0):
        super().__init__(num_experts, top_k, renormalize, bias_balance_rate)
        self.key_dim = key_dim or in_features
        self.w_q = nn.Linear(in_features, self.key_dim, bias=False)
        self.w_k = nn.Linear(hidden, self.key_dim, bias=False)  # applied to the expert hidden layer (width H)

    def scores(self, x_NI, expert_keys):
        if expert_keys is None:
            raise ValueError("the attentive router needs every expert's hidden layer (expert_keys)")
        with torch.autocast(x_NI.device.type, enabled=False):
            q_NH = self.w_q(x_NI.to(self.w_q.weight.dtype))
            keys_NEH = expert_keys(self.w_k.weight.t()).to(q_NH.dtype)
        return torch.einsum("nh,neh->ne", q_NH, keys_NEH) / math.sqrt(self.key_dim), None


class ExpertChoiceRouter(LinearRouter):
    """Expert choice (Zhou et al. 2022): expert e takes the C tokens with the highest softmax score p[:, e] of the
    LinearRouter's logits."""

    token_choice = False

    def __init__(self, in_features: int, num_experts: int, capacity_factor: float | None = None,
                 temperature: float = 1.0):
        super().__init__(in_features, num_experts, temperature=temperature)
        self.capacity_factor = 1.0 if capacity_factor is None else capacity_factor
        if self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")

    @property
    def dense(self) -> bool:
        return False

    def capacity(self, num_tokens: int) -> int:
        """C = min(T, ceil(cf * T / E))."""
        return min(num_tokens, math.ceil(self.capacity_factor * num_tokens / self.num_experts))

    def forward(self, x_NI, expert_keys=None):
        n, e = x_NI.shape[0], self.num_experts
        logits_NE, _ = self.scores(x_NI, None)
        probs_NE = softmax_last(logits_NE)
        picked_QE = probs_NE.topk(self.capacity(n), dim=0).indices  # per expert (column): its top-C tokens
        chosen_NE = torch.zeros_like(probs_NE, dtype=torch.bool).scatter_(0, picked_QE, True)
        ids_NE = torch.arange(e, device=x_NI.device).expand(n, e)
        return GateResult(probs_NE=probs_NE, weights_NK=torch.where(chosen_NE, probs_NE, 0.0),
                          experts_NK=torch.where(chosen_NE, ids_NE, -1), logits_NE=logits_NE)
