"""Index batching over device tensors, identical for 1 or many ranks.

Each training step takes one GLOBAL batch of the epoch's permutation (drawn from a generator seeded the same on
every rank) and rank r gets its contiguous slice (torch.tensor_split), so the union of the ranks' slices is
exactly the single-process batch; augmentation draws are made for the global batch before slicing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from raymoe.data.augment import apply_augment, draw_params

CROP_PADDING = 4  # paper (CIFAR-100): RandomCrop(32, padding=4, padding_mode="reflect")


def num_train_steps(n: int, batch_size: int) -> int:
    """Optimizer steps per epoch: the last, smaller batch is kept."""
    return math.ceil(n / batch_size)


def _rank_slice(n: int, rank: int, world_size: int) -> slice:
    """Rank r's contiguous part of n items, sizes differing by at most one (torch.tensor_split semantics)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def train_batches(split, batch_size: int, *, generator: torch.Generator, augment: bool, rank: int = 0,
                  world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled training batches; rank `rank` gets its slice of each global batch.

    Args:
        split: a Split (x (N, C, H, W), y (N,) on the device).
        batch_size: the GLOBAL batch size; the last batch may be smaller (not dropped).
        generator: CPU generator for the permutation and augmentation; seed it the same on every rank.
        augment: flip + reflect-pad crop (CIFAR-100 in the paper).
        rank, world_size: this rank's place among the data-parallel ranks.

    Yields:
        (x, y) of this rank's slice of each global batch (may be empty when a batch is smaller than world_size).
    """
    n = len(split.y)
    device = split.y.device
    perm_N = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        global_idx = perm_N[start:start + batch_size]
        params = draw_params(len(global_idx), generator, CROP_PADDING) if augment else None
        local = _rank_slice(len(global_idx), rank, world_size)
        idx = global_idx[local].to(device)
        x = split.x[idx]
        if params is not None:
            x = apply_augment(x, params[local], CROP_PADDING)
        yield x, split.y[idx]


def eval_batches(split, batch_size: int, *, rank: int = 0,
                 world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """In-order batches of rank r's contiguous shard of the whole split; every sample once across ranks."""
    shard = _rank_slice(len(split.y), rank, world_size)
    for start in range(shard.start, shard.stop, batch_size):
        stop = min(start + batch_size, shard.stop)
        yield split.x[start:stop], split.y[start:stop]
