"""Softmax over a short last dimension: a router's E experts for each of N tokens.

NOTE: torch's CPU softmax vectorises along the softmaxed dimension; with fewer than 16 float32 values per row it
takes a slow path. 8192 x 8 router logits at 2 threads: torch.softmax 0.60 ms, the four passes below (max,
subtract-exp, sum, divide, each vectorised over whole rows) 0.14 ms (docs/benchmarks.md, round 12). Backward is
torch's own softmax backward. CUDA and long rows keep torch.softmax (one fused kernel there).

Shape legend: N rows (tokens or samples), E the short dimension (experts).
"""

from __future__ import annotations

import torch

SHORT_ROW = 16  # rows shorter than one AVX-512 float32 vector take torch's slow CPU path


class _ShortSoftmax(torch.autograd.Function):
    """softmax(l, -1) as exp(l - max) / sum; backward p * (g - sum(g * p)) by torch's kernel. No double backward."""

    @staticmethod
    def forward(fn_ctx, logits_NE: torch.Tensor) -> torch.Tensor:
        probs_NE = (logits_NE - logits_NE.amax(dim=-1, keepdim=True)).exp_()
        probs_NE.div_(probs_NE.sum(dim=-1, keepdim=True))
        fn_ctx.save_for_backward(probs_NE)
        return probs_NE

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(fn_ctx, grad_NE: torch.Tensor) -> torch.Tensor:
        (probs_NE,) = fn_ctx.saved_tensors
        return torch._softmax_backward_data(grad_NE.contiguous(), probs_NE, -1, probs_NE.dtype)


def softmax_last(logits_NE: torch.Tensor) -> torch.Tensor:
    """softmax over the last dimension; the short-row CPU path above where it applies."""
    if (logits_NE.device.type == "cpu" and logits_NE.shape[-1] < SHORT_ROW and logits_NE.dim() == 2
            and logits_NE.dtype in (torch.float32, torch.float64)):
        return _ShortSoftmax.apply(logits_NE)
    return torch.softmax(logits_NE, dim=-1)
