"""A 3x3 convolution of a ONE-channel image as a GEMM over its patches, optionally with BatchNorm folded in.

Why: the paper's 28x28 nets start with a conv from one channel (MNIST/FMNIST gate: conv(1->8)+BN). On CPU
oneDNN runs such a conv slowly and in NCHW (a one-channel input is NCHW and NHWC at once, so it cannot pick
channels-last), and BatchNorm then makes two more passes forward and two backward over the largest activation
of the model. Here the output comes straight out of one (B*P, 9) x (9, O) GEMM in channels-last memory.

BatchNorm folding is exact, in training too: with z = patch . w_c + b_c, the batch mean and (biased) variance
of channel c are mean_p . w_c + b_c and w_c^T Cov_p w_c, where mean_p and Cov_p are the 9-dim patch mean and
covariance over the batch (constants: the input needs no gradient). So
    BN(z)_c = a_c (patch - mean_p) . w_c + beta_c,   a_c = gamma_c / sqrt(w_c^T Cov_p w_c + eps),
and autograd through a_c gives the gradients of training-mode BatchNorm. Running statistics are updated as
nn.BatchNorm2d does (unbiased variance, momentum). Only a plain nn.BatchNorm2d is folded: a replacement such as
GlobalBatchNorm (data parallel) keeps its own statistics, so the conv then leaves it alone.

The models are written with plain nn.Conv2d / StackedConv2d; kernels.apply_fast_paths (fast_paths.py) swaps in the
modules below where its start-up probe found the patch GEMM faster on this machine.

Shape legend: B images (G: the images every stacked expert sees), S side, S' = S + 2 pad - 2 output side,
O output channels, N = B*S'^2 patch rows, J = 9 kernel offsets (10 with a row of ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.kernels.onednn_gemm import mm_nt
from raymoe.models.paper_experts import StackedConv2d


def patches_JN(x_B1SS: torch.Tensor, padding: int, shift: torch.Tensor | None = None,
               ones_row: bool = False) -> tuple[torch.Tensor, int]:
    """The 3x3 patches of a one-channel image batch as a (9, B*S'*S') matrix (kernel-offset-major: each row
    is one shifted copy of the images, a fast contiguous copy), and S'. `shift` is subtracted after the zero
    padding (so padded pixels shift too); `ones_row` appends a row of ones."""
    xs = F.pad(x_B1SS[:, 0], (padding,) * 4) if padding else x_B1SS[:, 0]
    if shift is not None:
        xs = xs - shift
    xs = xs.contiguous()
    b, h, w = xs.shape
    side = h - 2
    cols_JN = xs.new_empty((10 if ones_row else 9, b * side * side))
    # all 9 shifted copies as one strided view, copied in one kernel (35% faster than stacking 9 slices)
    shifted = xs.as_strided((3, 3, b, side, side), (w, 1, h * w, w, 1))
    cols_JN[:9].view(3, 3, b, side, side).copy_(shifted)
    if ones_row:
        cols_JN[9].fill_(1.0)
    return cols_JN, side


class _PatchGemm(torch.autograd.Function):
    """y = patches^T w^T (+ bias) for patches without gradient; the filters' gradient by oneDNN (onednn_gemm.py)."""

    @staticmethod
    def forward(fn_ctx, cols_JN: torch.Tensor, w_OJ: torch.Tensor, bias_O: torch.Tensor | None) -> torch.Tensor:
        fn_ctx.save_for_backward(cols_JN)
        fn_ctx.has_bias = bias_O is not None
        return cols_JN.t() @ w_OJ.t() if bias_O is None else torch.addmm(bias_O, cols_JN.t(), w_OJ.t())

    @staticmethod
    def backward(fn_ctx, dy_NO: torch.Tensor):
        (cols_JN,) = fn_ctx.saved_tensors
        dy_NO = dy_NO.to(cols_JN.dtype)  # under bf16 autocast the output (so its gradient) is bf16
        # (cols dy)^T, inner dim M = B*P: with the row-major patches as oneDNN's source, 7x faster than dy^T cols^T
        dw_OJ = mm_nt(cols_JN, dy_NO.t()).t() if fn_ctx.needs_input_grad[1] else None
        db_O = dy_NO.sum(0) if fn_ctx.has_bias and fn_ctx.needs_input_grad[2] else None
        return None, dw_OJ, db_O


def patch_gemm(cols_JN: torch.Tensor, w_OJ: torch.Tensor, bias_O: torch.Tensor | None = None) -> torch.Tensor:
    """(M, O) = cols_JN^T w_OJ^T + bias_O: the conv over the patches (cols_JN must not need a gradient)."""
    return _PatchGemm.apply(cols_JN, w_OJ, bias_O)


def _nchw_view(y_NO: torch.Tensor, b: int, side: int) -> torch.Tensor:
    """(B*S'*S', O) rows -> logical (B, O, S', S') with channels-last strides (no copy)."""
    return y_NO.view(b, side, side, -1).permute(0, 3, 1, 2)


def conv1ch_weights(x_B1SS: torch.Tensor, w_OJ: torch.Tensor, bias_O: torch.Tensor | None,
                    padding: int) -> torch.Tensor:
    """A 3x3 conv of one-channel images with filters w_OJ (O, 9) as one GEMM, channels-last output."""
    cols_JN, side = patches_JN(x_B1SS, padding)
    return _nchw_view(patch_gemm(cols_JN, w_OJ, bias_O), x_B1SS.shape[0], side)


def conv1ch_bn(x_B1SS: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """bn(conv(x)) for a one-channel 3x3 conv, BatchNorm folded into the GEMM (module docstring)."""
    w_OJ = conv.weight.reshape(conv.out_channels, 9)
    bias_O = conv.bias if conv.bias is not None else w_OJ.new_zeros(conv.out_channels)
    gamma = bn.weight if bn.affine else torch.ones_like(bias_O)
    beta = bn.bias if bn.affine else torch.zeros_like(bias_O)
    if not (bn.training or not bn.track_running_stats):  # running statistics: a plain folded conv
        scale_O = gamma * torch.rsqrt(bn.running_var + bn.eps)
        return conv1ch_weights(x_B1SS, w_OJ * scale_O[:, None], beta + scale_O * (bias_O - bn.running_mean),
                               conv.padding[0])
    # Batch statistics are shift-invariant, so the patches of x - mean(x) give the same output; that keeps the
    # one-pass second moments below (sum of x x^T) well conditioned. Row 9 of the patches is ones: one GEMM gives
    # the sums, the second moments and the count.
    shift = x_B1SS.mean()
    cols_JN, side = patches_JN(x_B1SS, conv.padding[0], shift=shift, ones_row=True)
    with torch.no_grad():
        gram = mm_nt(cols_JN, cols_JN)
        m = gram[9, 9]
        mean_J = gram[:9, 9] / m
        cov_JJ = gram[:9, :9] / m - mean_J[:, None] * mean_J[None, :]
    mean_O = w_OJ @ mean_J + bias_O  # batch mean of conv(x - shift)
    var_O = ((w_OJ @ cov_JJ) * w_OJ).sum(1)
    if bn.training and bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.mul_(1 - momentum).add_(momentum * (mean_O + shift * w_OJ.sum(1)))  # of conv(x)
            bn.running_var.mul_(1 - momentum).add_(momentum * var_O * (m / (m - 1).clamp_min(1)))
    scale_O = gamma * torch.rsqrt(var_O + bn.eps)
    # the conv bias cancels (its gradient is exactly 0, as BatchNorm makes it) but stays in the graph
    w_aug_OJ1 = torch.cat([w_OJ * scale_O[:, None], (beta + scale_O * (bias_O - mean_O))[:, None]], dim=1)
    return _nchw_view(patch_gemm(cols_JN, w_aug_OJ1), x_B1SS.shape[0], side)


def one_channel_3x3(conv: nn.Conv2d) -> bool:
    """Whether the patch GEMM computes this conv: 3x3, stride 1, one input channel, no dilation or groups."""
    return (conv.in_channels == 1 and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and isinstance(conv.padding, tuple)
            and conv.padding[0] == conv.padding[1])


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """The BatchNorm2d after a PatchConv2d, which applies it (folded into its GEMM, or after its ordinary conv):
    called by the model it passes its input through. Same parameters, buffers and state_dict as nn.BatchNorm2d;
    a replacement module (GlobalBatchNorm for data parallelism) ends the fold, since the conv then finds another
    type in its slot."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class PatchConv2d(nn.Conv2d):
    """A one-channel 3x3 nn.Conv2d computed as one GEMM over the patches, channels-last output; with its
    BatchNorm folded in when fold_into() gave it the slot of a FoldedBatchNorm2d. An input that needs a gradient
    takes the ordinary conv (the patches are built without autograd)."""

    _bn_slot: tuple[nn.ModuleList, int] | None = None

    def fold_into(self, bns: nn.ModuleList, index: int) -> None:
        """Fold bns[index] (a plain nn.BatchNorm2d, made a FoldedBatchNorm2d here) into this conv."""
        bns[index].__class__ = FoldedBatchNorm2d
        object.__setattr__(self, "_bn_slot", (bns, index))  # a reference, not a submodule: state_dict unchanged

    def _folded_bn(self) -> FoldedBatchNorm2d | None:
        if self._bn_slot is None:
            return None
        bn = self._bn_slot[0][self._bn_slot[1]]
        return bn if type(bn) is FoldedBatchNorm2d else None

    def forward(self, x_B1SS: torch.Tensor) -> torch.Tensor:
        bn = self._folded_bn()
        if x_B1SS.requires_grad:
            y = super().forward(x_B1SS).contiguous(memory_format=torch.channels_last)
            return y if bn is None else bn.normalize(y)
        if bn is not None:
            return conv1ch_bn(x_B1SS, self, bn)
        return conv1ch_weights(x_B1SS, self.weight.reshape(self.out_channels, 9), self.bias, self.padding[0])


class PatchStackedConv2d(StackedConv2d):
    """StackedConv2d of one-channel 3x3 convs whose shared-input path (every expert on the same images) is one
    GEMM over the patches, the E experts' filters stacked as output channels."""

    def forward_shared(self, x_G1SS: torch.Tensor) -> torch.Tensor:
        if x_G1SS.requires_grad:
            return super().forward_shared(x_G1SS)
        e = self.weight.shape[0]
        bias = None if self.bias is None else self.bias.reshape(-1)
        return conv1ch_weights(x_G1SS, self.weight.reshape(e * self.cout, 9), bias, self.padding)
