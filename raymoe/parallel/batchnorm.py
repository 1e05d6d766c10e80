"""BatchNorm over the global batch of a data-parallel job, on any backend.

torch.nn.SyncBatchNorm refuses CPU tensors ("expected input tensor to be on GPU", torch 2.14), so gloo jobs would
normalise each rank's slice with its own statistics and drift from the single-process model. This module computes
the batch mean and variance over all ranks with two differentiable all-reduces (two-pass: mean first, then the
centred sum of squares) and keeps the same parameters, buffers and state_dict keys as nn.BatchNorm*d.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from raymoe.parallel.collectives import _AllReduceSum, in_graph


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in for BatchNorm1d/2d/3d whose training statistics cover every rank's batch (world group)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training and self.running_mean is not None:  # eval: running statistics, nothing to sync
            return super().forward(x)
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]
        count = torch.tensor([x.numel() / max(x.shape[1], 1)], dtype=x.dtype, device=x.device)
        dist.all_reduce(count)  # items * spatial positions over all ranks (no gradient)
        mean_Z = _AllReduceSum.apply(in_graph(x.sum(dim=dims))) / count
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = x - mean_Z.view(shape)
        var_Z = _AllReduceSum.apply(in_graph((centred * centred).sum(dim=dims))) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                unbiased = var_Z * (count / (count - 1).clamp(min=1))
                self.running_mean.mul_(1 - momentum).add_(momentum * mean_Z.detach())
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased.detach())
        y = centred * torch.rsqrt(var_Z + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> "GlobalBatchNorm":
        """Same parameters and running statistics, global-batch statistics in training."""
        out = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                  track_running_stats=bn.track_running_stats)
        out.load_state_dict(bn.state_dict())
        out.train(bn.training)
        tensors = [*bn.parameters(), *bn.buffers()]
        return out.to(tensors[0].device) if tensors else out


def globalize_batchnorm(module: nn.Module, skip: tuple[type, ...] = ()) -> nn.Module:
    """Replace every BatchNorm*d outside modules of the types in `skip` by GlobalBatchNorm (in place)."""
    for name, child in list(module.named_children()):
        if skip and isinstance(child, skip):
            continue
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            setattr(module, name, GlobalBatchNorm.from_batchnorm(child))
        else:
            globalize_batchnorm(child, skip)
    return module
