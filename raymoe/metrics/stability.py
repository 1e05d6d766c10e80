"""Routing stability between two evaluations of the same fixed items: how many changed their top-1 expert (churn),
and how much the two assignments agree beyond chance (adjusted mutual information, Vinh, Epps & Bailey 2010,
"max" normalisation). Shape legend: N items, R / C distinct labels of the first / second assignment.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def gammaln(x) -> np.ndarray:
    """log Gamma(x) in float64 (torch's lgamma: no SciPy needed)."""
    return torch.lgamma(torch.as_tensor(x, dtype=torch.float64)).numpy()


def churn(previous_N: np.ndarray, current_N: np.ndarray) -> float:
    """Fraction of items whose top-1 expert differs between the two evaluations."""
    previous_N, current_N = np.asarray(previous_N), np.asarray(current_N)
    if previous_N.shape != current_N.shape or previous_N.size == 0:
        raise ValueError(f"need two assignments of the same items, got {previous_N.shape} and {current_N.shape}")
    return float(np.mean(previous_N != current_N))


def _contingency(a_N: np.ndarray, b_N: np.ndarray) -> np.ndarray:
    _, a = np.unique(a_N, return_inverse=True)
    _, b = np.unique(b_N, return_inverse=True)
    table_RC = np.zeros((a.max() + 1, b.max() + 1), dtype=np.int64)
    np.add.at(table_RC, (a, b), 1)
    return table_RC


def _entropy(counts: np.ndarray, n: int) -> float:
    p = counts[counts > 0] / n
    return float(-(p * np.log(p)).sum())


def mutual_information(table_RC: np.ndarray) -> float:
    """MI in nats of a contingency table."""
    n = table_RC.sum()
    a_R, b_C = table_RC.sum(1), table_RC.sum(0)
    nz = table_RC > 0
    nij = table_RC[nz]
    outer = np.outer(a_R, b_C)[nz]
    return float((nij / n * (np.log(nij) + math.log(n) - np.log(outer))).sum())


def expected_mutual_information(a_R: np.ndarray, b_C: np.ndarray, n: int) -> float:
    """E[MI] in nats over all assignments with these marginals (the hypergeometric model of Vinh et al.)."""
    total = 0.0
    for ai in a_R:
        for bj in b_C:
            lo, hi = max(1, ai + bj - n), min(ai, bj)
            if lo > hi:
                continue
            nij = np.arange(lo, hi + 1, dtype=np.float64)
            log_p = (gammaln(ai + 1) + gammaln(bj + 1) + gammaln(n - ai + 1) + gammaln(n - bj + 1)
                     - gammaln(n + 1) - gammaln(nij + 1) - gammaln(ai - nij + 1) - gammaln(bj - nij + 1)
                     - gammaln(n - ai - bj + nij + 1))
            total += float((nij / n * np.log(n * nij / (ai * bj)) * np.exp(log_p)).sum())
    return total


def adjusted_mutual_information(a_N: np.ndarray, b_N: np.ndarray) -> float:
    """AMI = (MI - E[MI]) / (max(H(a), H(b)) - E[MI]): 1 for identical partitions (up to relabelling), ~0 for
    independent ones; 1.0 when both put every item in one group (nothing to disagree on)."""
    table_RC = _contingency(np.asarray(a_N), np.asarray(b_N))
    n = int(table_RC.sum())
    a_R, b_C = table_RC.sum(1), table_RC.sum(0)
    h_a, h_b = _entropy(a_R, n), _entropy(b_C, n)
    if h_a == 0.0 and h_b == 0.0:
        return 1.0
    mi, emi = mutual_information(table_RC), expected_mutual_information(a_R, b_C, n)
    denominator = max(h_a, h_b) - emi
    return float((mi - emi) / denominator) if denominator > 1e-12 else 0.0


class FirstItems:
    """The top-1 expert of the first `limit` items an evaluation routes on this rank, kept across its batches: the
    fixed items two evaluations are compared on (churn, AMI)."""

    def __init__(self, limit: int):
        self.limit, self.count, self.parts = limit, 0, []

    def keep(self, top1_N: torch.Tensor) -> None:
        if self.count < self.limit:
            self.parts.append(top1_N[:self.limit - self.count].cpu())
            self.count += self.parts[-1].numel()

    def array(self) -> np.ndarray:
        return torch.cat(self.parts).numpy() if self.parts else np.zeros(0, np.int64)

