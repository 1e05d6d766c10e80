"""Whole-batch CIFAR augmentation: random horizontal flip, then RandomCrop(size, padding, reflect), vectorised.

Legend: N = samples, C = channels, H/W = image height/width, P = padding.
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
    """Per-sample draws: flip_N (bool), top_N / left_N (crop offsets in the padded image, 0..2P)."""

    flip_N: torch.Tensor
    top_N: torch.Tensor
    left_N: torch.Tensor

    def __getitem__(self, index) -> "AugmentParams":
        return AugmentParams(self.flip_N[index], self.top_N[index], self.left_N[index])


def draw_params(n: int, generator: torch.Generator, padding: int = 4) -> AugmentParams:
    """Flip with probability 1/2 and uniform crop offsets in [0, 2P], drawn on the generator's (CPU) device."""
    flip_N = torch.rand(n, generator=generator) < 0.5
    top_N = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    left_N = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    return AugmentParams(flip_N, top_N, left_N)


def apply_augment(x_NCHW: torch.Tensor, params: AugmentParams, padding: int = 4) -> torch.Tensor:
    """Flip where params.flip_N, reflect-pad by P, crop H x W at (top, left); no per-sample Python loop."""
    n, _, h, w = x_NCHW.shape
    device = x_NCHW.device
    flip_N = params.flip_N.to(device)
    x_NCHW = torch.where(flip_N.view(n, 1, 1, 1), x_NCHW.flip(3), x_NCHW)
    padded_NCHW = F.pad(x_NCHW, (padding, padding, padding, padding), mode="reflect")
    rows_NH = params.top_N.to(device).view(n, 1) + torch.arange(h, device=device)
    cols_NW = params.left_N.to(device).view(n, 1) + torch.arange(w, device=device)
    batch_N = torch.arange(n, device=device)
    # Advanced indexing on (N, H, W) of the channels-last view picks one crop window per sample.
    crops_NHWC = padded_NCHW.permute(0, 2, 3, 1)[batch_N.view(n, 1, 1), rows_NH.view(n, h, 1), cols_NW.view(n, 1, w)]
    return crops_NHWC.permute(0, 3, 1, 2).contiguous()
