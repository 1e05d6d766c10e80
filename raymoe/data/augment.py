"""Whole-batch CIFAR augmentation: random horizontal flip, then RandomCrop(size, padding, reflect), vectorised.

Shape legend: B images, Z channels, S image side (the padding is a scalar, not an axis).
The random draws are made for the whole GLOBAL batch from one generator and only then sliced per rank, so every
rank's pixels equal the single-process pixels. Reflect padding commutes with per-channel normalisation, so
augmenting normalised tensors equals the reference's augment-then-normalise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentParams:
    """Per-sample draws: flip_B (bool), top_B / left_B (crop offsets in the padded image, 0..2P)."""

    flip_B: torch.Tensor
    top_B: torch.Tensor
    left_B: torch.Tensor

    def __getitem__(self, index) -> "AugmentParams":
        return AugmentParams(self.flip_B[index], self.top_B[index], self.left_B[index])


def draw_params(n: int, generator: torch.Generator, padding: int = 4) -> AugmentParams:
    """Flip with probability 1/2 and uniform crop offsets in [0, 2P], drawn on the generator's (CPU) device."""
    flip_B = torch.rand(n, generator=generator) < 0.5
    top_B = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    left_B = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    return AugmentParams(flip_B, top_B, left_B)


def apply_augment(x_BZSS: torch.Tensor, params: AugmentParams, padding: int = 4) -> torch.Tensor:
    """Flip where params.flip_B, reflect-pad by P, crop H x W at (top, left); no per-sample Python loop."""
    n, _, h, w = x_BZSS.shape
    device = x_BZSS.device
    flip_B = params.flip_B.to(device)
    x_BZSS = torch.where(flip_B.view(n, 1, 1, 1), x_BZSS.flip(3), x_BZSS)
    padded_BZSS = F.pad(x_BZSS, (padding, padding, padding, padding), mode="reflect")
    rows_BS = params.top_B.to(device).view(n, 1) + torch.arange(h, device=device)
    cols_BS = params.left_B.to(device).view(n, 1) + torch.arange(w, device=device)
    batch_B = torch.arange(n, device=device)
    # Advanced indexing on (N, H, W) of the channels-last view picks one crop window per sample.
    crops_BSSZ = padded_BZSS.permute(0, 2, 3, 1)[batch_B.view(n, 1, 1), rows_BS.view(n, h, 1), cols_BS.view(n, 1, w)]
    return crops_BSSZ.permute(0, 3, 1, 2).contiguous()
