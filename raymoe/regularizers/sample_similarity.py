"""Sample-similarity regulariser L_s (docs/paper-notes.md §3.1): similar samples to the same expert, dissimilar apart.

d_nm = ||x_n - x_m|| / max ||x_n' - x_m'|| on the flattened, normalised input images (not squared; raw pixels;
the reference computes it with cdist's direct float32 mode, here by the Gram identity in float64, which is closer
to the exact value);
S = (1/E) sum_e sum_nm g_e(x_n) g_e(x_m) d_nm;  D = 1/(E^2 - E) sum_{e != e'} sum_nm g_e(x_n) g_e'(x_m) d_nm.
normalization "reference": L_s = beta_s S - beta_d D / N^2  (exactly as coded; Python precedence divides only D)
normalization "normalized": L_s = (beta_s S - beta_d D) / N^2.
distance "raw_channel_sum": channels summed first (AAAI-submission code, before commit 971557a2).

Vectorised: with M = d g (N x E), S = (1/E) sum(g * M) and, since sum_{e,e'} g_e^T d g_e' = s^T d s with
s = g 1 (row sums), D = (s^T d s - sum(g * M)) / (E^2 - E).
Shape legend: N samples in the batch, E experts, X flattened pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SampleSimilarity:
    value: torch.Tensor  # L_s, the term added to the loss
    same: torch.Tensor  # S
    diff: torch.Tensor  # D


def pixel_distance_NN(x: torch.Tensor, distance: str = "raw") -> torch.Tensor:
    """d_nm: pairwise Euclidean distance of the flattened images, divided by the largest one in the batch."""
    if distance == "raw_channel_sum":
        x = x.sum(dim=1)
    elif distance != "raw":
        raise ValueError(f"unknown sample-similarity distance {distance!r}")
    flat_NX = x.detach().reshape(x.shape[0], -1).double()
    # ||a - b||^2 = |a|^2 + |b|^2 - 2 a.b as one float64 GEMM: 10x faster than the reference's direct float32
    # cdist and closer to the exact distance (docs/benchmarks.md, round 11); float64 keeps the cancellation tiny
    sq_N = (flat_NX * flat_NX).sum(1)
    scale_NN = sq_N[:, None] + sq_N[None, :]
    d2_NN = torch.addmm(scale_NN, flat_NX, flat_NX.t(), alpha=-2.0)
    # below the float64 GEMM's worst-case rounding of |a|^2 + |b|^2 is cancellation noise: equal images get 0
    d2_NN = d2_NN.masked_fill_(d2_NN <= 1e-13 * scale_NN, 0.0)
    d_NN = d2_NN.sqrt_().to(torch.promote_types(x.dtype, torch.float32))  # float64 input (the fidelity twin) stays so
    top = d_NN.max()
    return d_NN / top if top > 0 else d_NN  # all-identical batch: every distance is 0


def sample_similarity(probs_NE: torch.Tensor, x: torch.Tensor, beta_s: float, beta_d: float,
                      normalization: str = "reference", distance: str = "raw") -> SampleSimilarity:
    """L_s of docs/paper-notes.md §3.1 for gate probabilities probs_NE of the N images x (N, C, H, W)."""
    n, e = probs_NE.shape
    g_NE = probs_NE.to(torch.promote_types(probs_NE.dtype, torch.float32))  # bf16 -> float32; float64 kept
    d_NN = pixel_distance_NN(x, distance).to(device=g_NE.device, dtype=g_NE.dtype)
    m_NE = d_NN @ g_NE
    same_raw = (g_NE * m_NE).sum()  # sum_e g_e^T d g_e
    s_N = g_NE.sum(1)
    same = same_raw / e
    diff = (s_N @ (d_NN @ s_N) - same_raw) / (e * e - e) if e > 1 else same_raw.new_zeros(())
    if normalization == "reference":
        value = beta_s * same - beta_d * diff / (n * n)
    elif normalization == "normalized":
        value = (beta_s * same - beta_d * diff) / (n * n)
    else:
        raise ValueError(f"unknown sample-similarity normalization {normalization!r}")
    return SampleSimilarity(value=value, same=same, diff=diff)
