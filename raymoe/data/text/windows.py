"""Language-model samples from a 1-d token tensor: windows of block_size + 1 tokens, x = w[:-1], y = w[1:].

Training windows start at uniform random offsets drawn ON THE TOKENS' DEVICE with a torch.Generator (same seed
-> same windows; a CUDA generator for CUDA tokens), so sampling is a gather on the device, never a host copy.
Data parallel: every rank draws the same global batch of offsets and keeps its contiguous slice
(torch.tensor_split), so the ranks' slices together are exactly the single-process batch.
Evaluation windows are fixed: evenly spaced over the split, non-overlapping when the split is long enough.

Shape legend: N tokens in the split, B windows (a training batch or the evaluation subset), T = block_size.
"""

from __future__ import annotations

import torch


def _gather(tokens_N: torch.Tensor, starts_B: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    w_BT1 = tokens_N[starts_B[:, None] + torch.arange(block_size + 1, device=tokens_N.device)].long()
    return w_BT1[:, :-1], w_BT1[:, 1:]


def sample_windows(tokens_N: torch.Tensor, block_size: int, batch_size: int, generator: torch.Generator,
                   rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random contiguous windows of one global batch; this rank's slice.

    Args:
        tokens_N: the split's ids (any integer dtype) on the device.
        block_size: T.
        batch_size: the GLOBAL number of windows.
        generator: on tokens_N's device; seed it the same on every rank.
        rank, world_size: this rank's place among the data-parallel ranks.
    Returns:
        (x_BT, y_BT) int64, y_BT = x shifted by one token.
    """
    n = tokens_N.numel()
    if n < block_size + 1:
        raise ValueError(f"{n} tokens cannot hold a window of block_size + 1 = {block_size + 1}")
    starts_B = torch.randint(0, n - block_size, (batch_size,), generator=generator, device=tokens_N.device)
    return _gather(tokens_N, torch.tensor_split(starts_B, world_size)[rank], block_size)


def eval_starts(num_tokens: int, block_size: int, max_tokens: int | None = None) -> torch.Tensor:
    """Offsets of the fixed evaluation windows: W = min(max_tokens, N - 1) // T windows, evenly spaced over N.

    Each window predicts T tokens, so the subset scores W * T <= max_tokens targets; with max_tokens None
    (the whole split) the windows tile it without overlap.
    """
    usable = num_tokens - 1  # the last token is only ever a target
    budget = usable if max_tokens is None else min(max_tokens, usable)
    w = budget // block_size
    if w < 1:
        raise ValueError(f"{num_tokens} tokens cannot hold a window of block_size + 1 = {block_size + 1}")
    span = num_tokens - block_size - 1  # largest start
    return torch.div(torch.arange(w, dtype=torch.long) * span, max(w - 1, 1), rounding_mode="floor")


def eval_windows(tokens_N: torch.Tensor, block_size: int,
                 max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed evaluation windows (x_BT, y_BT), int64 on tokens_N's device; see eval_starts."""
    starts_B = eval_starts(tokens_N.numel(), block_size, max_tokens).to(tokens_N.device)
    return _gather(tokens_N, starts_B, block_size)
