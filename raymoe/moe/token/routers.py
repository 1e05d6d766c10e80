"""Token-level routers behind one interface: `router(x_ND, experts) -> GateResult` (N = tokens).

* TopKRouter: softmax top-k. k = 1 is Switch (weight = p_{i*}, optional multiplicative input jitter while
  training, Fedus et al. 2021); k = 2 with renormalised weights is GShard top-2 (Lepikhin et al. 2020).
* NoisyTopKRouter: Shazeer et al. 2017, H = x W_g + N(0,1) (softplus(x W_noise) + eps) while training (H = x W_g in
  eval); probs_NE = softmax(H) and logits_NE = H, so the renormalised top-k probs are their Softmax(KeepTopK(H, k)).
  renormalize defaults to k > 1: with k = 1 the weight stays p_{i*} so the task loss trains the router (renormalised,
  it is always 1.0, the Hyper_MoE GPT-2 quirk, docs/hypermoe-notes.md §1.3(3)). Their eq. 9-10 smooth load is GateResult.load_E.
* ExpertChoiceRouter: Zhou et al. 2022, each expert takes its top-C tokens by softmax score,
  C = min(T, ceil(cf * T / E)) with T the tokens of this forward (the whole batch is one routing group, so a
  token's experts depend on the other images in the batch; never use it in a causal model). Its GateResult has
  K = E: experts_NK[n, e] = e if expert e took token n, else -1, and weights_NK[n, e] = p[n, e] or 0.
* AttentiveRouter: the attention-like gate of Krishnamurthy et al. 2023 adapted to tokens, made sparse: query
  q = W_q x (x = the token), key k_e = W_k h_e(x) with h_e(x) = x W1_e + b1_e the pre-activation hidden layer of
  expert e on this token (as the paper uses the experts' pre-ReLU hidden layer), logits a_e = q.k_e / sqrt(H),
  p = softmax(a), then top-k like TopKRouter. H = the model dim. It reads every expert's W1, so it needs all
  experts local (no expert parallelism); gradients reach W1_e through the keys, as in the paper. No temperature
  (the paper's attentive gate has none).

Token-choice routers and the sample-level sparse gates share one selection step (raymoe/moe/routing.py
select_top_k, with the one renormalisation rule and Shazeer's smooth load), plus an optional aux-loss-free bias
(bias_balance.py) that changes which experts are chosen but never the weights.
Routers compute in float32 and return the choices *before* capacity dropping (the layer applies capacity).

Shape legend: N tokens, D model dim, E experts, K experts per token, H attentive key dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.moe.routing import GateResult, renormalizes, select_top_k, smooth_load, standard_normal
from raymoe.moe.token.bias_balance import BiasBalancer
from raymoe.moe.token.experts import TokenExperts


class TokenRouter(nn.Module):
    """Base: `forward(x_ND, experts) -> GateResult`. `token_choice` says whether each token picks its experts."""

    token_choice: bool = True

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts

    def forward(self, x_ND: torch.Tensor, experts: TokenExperts) -> GateResult:
        raise NotImplementedError


class TokenChoiceRouter(TokenRouter):
    """Every token picks its top-k experts from softmax(logits); subclasses define the logits."""

    def __init__(self, num_experts: int, top_k: int, renormalize: bool | None = None,
                 bias_balance_rate: float = 0.0):
        super().__init__(num_experts)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k ({top_k}) must be in [1, num_experts ({num_experts})]")
        self.top_k = top_k
        self.renormalize = renormalizes(renormalize, top_k)
        self.balancer = BiasBalancer(num_experts, bias_balance_rate) if bias_balance_rate > 0 else None

    def route_logits(self, x_ND: torch.Tensor, experts: TokenExperts) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits_NE in float32, differentiable load_E or None)."""
        raise NotImplementedError

    def forward(self, x_ND: torch.Tensor, experts: TokenExperts) -> GateResult:
        logits_NE, load_E = self.route_logits(x_ND, experts)
        probs_NE = torch.softmax(logits_NE, dim=-1)
        scores_NE = None if self.balancer is None else self.balancer.selection_scores(probs_NE)
        gate = select_top_k(probs_NE, logits_NE, self.top_k, self.renormalize, load_E, scores_NE)
        if self.balancer is not None:
            self.balancer.record(gate.experts_NK)
        return gate


class TopKRouter(TokenChoiceRouter):
    """Softmax top-k: Switch (k=1, jitter) or GShard (k=2, renormalised)."""

    def __init__(self, dim: int, num_experts: int, top_k: int = 1, renormalize: bool | None = None,
                 jitter: float = 0.0, temperature: float = 1.0, bias_balance_rate: float = 0.0):
        super().__init__(num_experts, top_k, renormalize, bias_balance_rate)
        self.jitter, self.temperature = jitter, temperature
        self.proj = nn.Linear(dim, num_experts, bias=False)

    def route_logits(self, x_ND, experts):
        x = x_ND.float()
        if self.training and self.jitter > 0:  # Switch: multiply the router input by U(1 - eps, 1 + eps)
            x = x * torch.empty_like(x).uniform_(1 - self.jitter, 1 + self.jitter)
        with torch.autocast(x.device.type, enabled=False):  # routing stays float32 under bf16 autocast
            logits_NE = self.proj(x)
        return (logits_NE if self.temperature == 1.0 else logits_NE / self.temperature), None


class NoisyTopKRouter(TokenChoiceRouter):
    """Noisy top-k gating (Shazeer et al. 2017); W_g and W_noise start at zero as in the reference code."""

    def __init__(self, dim: int, num_experts: int, top_k: int = 1, renormalize: bool | None = None,
                 noise_eps: float = 1e-2, temperature: float = 1.0, bias_balance_rate: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__(num_experts, top_k, renormalize, bias_balance_rate)
        self.noise_eps, self.temperature, self.generator = noise_eps, temperature, generator
        self.w_gate_DE = nn.Parameter(torch.zeros(dim, num_experts))
        self.w_noise_DE = nn.Parameter(torch.zeros(dim, num_experts))

    def route_logits(self, x_ND, experts):
        x = x_ND.float()
        with torch.autocast(x.device.type, enabled=False):  # routing stays float32 under bf16 autocast
            clean_NE = x @ self.w_gate_DE.float()
            std_NE = F.softplus(x @ self.w_noise_DE.float()) + self.noise_eps
        noisy_NE = clean_NE + self.draw_noise(clean_NE) * std_NE if self.training else clean_NE
        return noisy_NE / self.temperature, smooth_load(clean_NE, noisy_NE, std_NE, self.top_k)

    def draw_noise(self, like_NE: torch.Tensor) -> torch.Tensor:
        """The training noise (Shazeer et al. eq. 4); tests replace it to feed each rank its rows of one draw."""
        return standard_normal(like_NE, self.generator)


class AttentiveRouter(TokenChoiceRouter):
    """Attention-like gate on tokens: query from the token, keys from each expert's hidden layer, then top-k."""

    def __init__(self, dim: int, d_ff: int, num_experts: int, top_k: int = 1, renormalize: bool | None = None,
                 key_dim: int | None = None, bias_balance_rate: float = 0.0):
        super().__init__(num_experts, top_k, renormalize, bias_balance_rate)
        self.key_dim = key_dim or dim
        self.w_q = nn.Linear(dim, self.key_dim, bias=False)
        self.w_k = nn.Linear(d_ff, self.key_dim, bias=False)  # applied to the expert hidden layer (width d_ff)

    def route_logits(self, x_ND, experts):
        q_NH = self.w_q(x_ND)
        keys_NEH = experts.hidden_keys(x_ND, self.w_k.weight.t())
        scores_NE = torch.einsum("nh,neh->ne", q_NH, keys_NEH) / math.sqrt(self.key_dim)
        return scores_NE.float(), None


class ExpertChoiceRouter(TokenRouter):
    """Expert choice (Zhou et al. 2022): expert e takes the C tokens with the highest softmax score p[:, e]."""

    token_choice = False

    def __init__(self, dim: int, num_experts: int, capacity_factor: float | None = None, temperature: float = 1.0):
        super().__init__(num_experts)
        self.capacity_factor = 1.0 if capacity_factor is None else capacity_factor
        if self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        self.temperature = temperature
        self.proj = nn.Linear(dim, num_experts, bias=False)

    def capacity(self, num_tokens: int) -> int:
        """C = min(T, ceil(cf * T / E))."""
        return min(num_tokens, math.ceil(self.capacity_factor * num_tokens / self.num_experts))

    def forward(self, x_ND, experts):
        n, e = x_ND.shape[0], self.num_experts
        logits_NE = F.linear(x_ND.float(), self.proj.weight.float())
        logits_NE = logits_NE if self.temperature == 1.0 else logits_NE / self.temperature
        probs_NE = torch.softmax(logits_NE, dim=-1)
        picked_QE = probs_NE.topk(self.capacity(n), dim=0).indices  # per expert (column): its top-C tokens
        chosen_NE = torch.zeros_like(probs_NE, dtype=torch.bool).scatter_(0, picked_QE, True)
        ids_NE = torch.arange(e, device=x_ND.device).expand(n, e)
        return GateResult(probs_NE=probs_NE, weights_NK=torch.where(chosen_NE, probs_NE, 0.0),
                          experts_NK=torch.where(chosen_NE, ids_NE, -1), logits_NE=logits_NE)
