"""What every router shares, sample-level and token-level alike (raymoe/moe/routers.py): the typed GateResult, the
one selection step (dense or top-k, with the one renormalisation rule), the noise they draw and Shazeer's smooth
load.

Shape legend: N items routed (samples or tokens), E experts, K experts chosen per item.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class GateResult:
    """What a gate decided for N items.

    probs_NE: the full gate distribution (softmax over all experts); used by the metrics and importance.
    weights_NK: combine weight of each chosen expert (dense gates: K = E, weights_NK = probs_NE).
    experts_NK: chosen global expert ids, long; -1 marks a slot dropped by capacity (its weight is 0).
    logits_NE: pre-softmax router logits (router z-loss).
    load_E: differentiable expected load (noisy top-k, Shazeer 2017 eq. 9-10), else None.
    """

    probs_NE: torch.Tensor
    weights_NK: torch.Tensor
    experts_NK: torch.Tensor
    logits_NE: torch.Tensor
    load_E: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.probs_NE.shape[-1]

    @property
    def top1_N(self) -> torch.Tensor:
        """The expert each item is assigned to for the specialization metrics (argmax of the gate)."""
        return self.probs_NE.argmax(dim=-1)


def standard_normal(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """N(0, 1) noise shaped like `like` (a noisy gate's logits), from `generator` when one is given (it must live on
    like's device); without one it draws from torch's default generator exactly as torch.randn_like does."""
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)


def renormalizes(renormalize: bool | None, k: int) -> bool:
    """The one rule for `gate.renormalize` (docs/hypermoe-notes.md §1.3(3)): null renormalises the kept weights
    only when k > 1 (GShard top-2); with k = 1 the weight stays p_{i*}, so the task loss trains the router
    (renormalised it would always be 1)."""
    return k > 1 if renormalize is None else bool(renormalize)


def dense_result(probs_NE: torch.Tensor, logits_NE: torch.Tensor, load_E: torch.Tensor | None = None) -> GateResult:
    """Every item goes to every expert with weight g_e: experts_NK = arange(E) for every item, weights = probs."""
    n, e = probs_NE.shape
    experts_NK = torch.arange(e, device=probs_NE.device).expand(n, e)
    return GateResult(probs_NE=probs_NE, weights_NK=probs_NE, experts_NK=experts_NK, logits_NE=logits_NE,
                      load_E=load_E)


def select(probs_NE: torch.Tensor, logits_NE: torch.Tensor, top_k: int | None, renormalize: bool,
           load_E: torch.Tensor | None = None, scores_NE: torch.Tensor | None = None) -> GateResult:
    """The selection step of every token-choice router and sample-level gate: dense when top_k is None (the
    paper's gates), else select_top_k."""
    if top_k is None:
        return dense_result(probs_NE, logits_NE, load_E)
    return select_top_k(probs_NE, logits_NE, top_k, renormalize, load_E, scores_NE)


def select_top_k(probs_NE: torch.Tensor, logits_NE: torch.Tensor, k: int, renormalize: bool,
                 load_E: torch.Tensor | None = None, scores_NE: torch.Tensor | None = None) -> GateResult:
    """The top-k selection step: the top k experts by `scores_NE`
    (default: the probabilities; sorted, so slot 0 is the best), weighted by their probabilities, renormalised
    over the kept experts when `renormalize`. A bias-balanced router passes biased scores: the bias picks the
    experts, the unbiased probabilities weight them (DeepSeek-V3)."""
    experts_NK = (probs_NE if scores_NE is None else scores_NE).topk(k, dim=-1).indices
    weights_NK = probs_NE.gather(-1, experts_NK)
    if renormalize:
        weights_NK = weights_NK / weights_NK.sum(-1, keepdim=True)
    return GateResult(probs_NE=probs_NE, weights_NK=weights_NK, experts_NK=experts_NK, logits_NE=logits_NE,
                      load_E=load_E)


def smooth_load(clean_NE: torch.Tensor, noisy_NE: torch.Tensor, std_NE: torch.Tensor, k: int) -> torch.Tensor:
    """Shazeer eq. 8-10: load_e = sum_n P(expert e stays in the top k when only its own noise is redrawn)
    = sum_n Phi((clean_ne - kth_excluding(noisy_n, k, e)) / std_ne)."""
    n, e = clean_NE.shape
    if k >= e:  # every expert is always kept
        return clean_NE.new_full((e,), float(n))
    top_NK1 = noisy_NE.topk(k + 1, dim=-1).values
    threshold_if_in_N1 = top_NK1[:, k:k + 1]  # e in the top k: it must beat the (k+1)-th value
    threshold_if_out_N1 = top_NK1[:, k - 1:k]  # e outside: it must beat the k-th value
    is_in_NE = noisy_NE > threshold_if_in_N1
    normal = torch.distributions.Normal(clean_NE.new_zeros(()), clean_NE.new_ones(()))
    prob_NE = torch.where(is_in_NE, normal.cdf((clean_NE - threshold_if_in_N1) / std_NE),
                          normal.cdf((clean_NE - threshold_if_out_N1) / std_NE))
    return prob_NE.sum(0)
