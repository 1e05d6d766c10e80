"""Specialisation metrics of the paper (docs/paper-notes.md §4), in bits (log base 2, as the reference's `entropy`).

Pure functions of probabilities or count matrices; 0 log 0 = 0 throughout.
Shape legend: N samples, E experts, C classes.
"""

from __future__ import annotations

import math

import torch


def entropy_bits(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """-sum p log2 p along `dim` (p need not be normalised; 0 log 0 = 0)."""
    p = p.double() if p.dtype != torch.float64 else p
    return -torch.special.xlogy(p, p).sum(dim) / math.log(2.0)


def _normalised(counts: torch.Tensor) -> torch.Tensor:
    counts = torch.as_tensor(counts, dtype=torch.float64)
    total = counts.sum()
    return counts / total if total > 0 else counts


def mutual_information_bits(counts_CE: torch.Tensor) -> float:
    """I(E;Y) = H(E) + H(Y) - H(E,Y) of the joint distribution counts / N (either axis order)."""
    p = _normalised(counts_CE)
    if p.sum() == 0:
        return 0.0
    value = entropy_bits(p.sum(0)) + entropy_bits(p.sum(1)) - entropy_bits(p.reshape(-1))
    return max(float(value), 0.0)  # rounding can give -1e-16


def sample_entropy_bits(probs_NE: torch.Tensor) -> float:
    """H_s: mean over samples of the gate's entropy (low = confident, near-hard routing)."""
    return float(entropy_bits(probs_NE, dim=-1).mean())


def usage_entropy_bits(mean_probs_E: torch.Tensor) -> float:
    """H_u: entropy of the mean gate distribution (high = all experts used). Normalised first."""
    return float(entropy_bits(_normalised(mean_probs_E)))


def coefficient_of_variation(x: torch.Tensor) -> float:
    """std / mean with torch.std's unbiased estimator (the reference `cv`); 0 for fewer than 2 values."""
    x = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
    if x.numel() < 2 or x.mean() == 0:
        return 0.0
    return float(x.std() / x.mean())
