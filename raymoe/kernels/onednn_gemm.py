"""float32 GEMMs through oneDNN on CPU, with autograd; the ordinary torch ops elsewhere.

Why: torch's CPU matmul calls MKL's sgemm, which runs its AVX2 kernels on AMD CPUs. On this 2-core AMD EPYC
(Zen 5) VM it reached 210 GFLOP/s for the Fashion-MNIST gate's 512x1352x512 layer, oneDNN's AVX-512 matmul
(the same library torch already uses for convolutions) 400-480 GFLOP/s, in float32 (no bf16/tf32 inputs; the
sums differ from MKL's only in rounding order). Products with a huge inner dimension and tiny outputs
(the first conv's filter gradient, 10 x 346,112 x 8) also ran 3.6x faster than MKL.

The op is torch.ops.mkldnn._linear_pointwise(x, w, b) = x w^T + b, the fused linear torch's CPU compiler
emits; any strides are accepted, so the backward GEMMs pass transposed views without copies.
Shape legend: N rows, I in features, O out features; mm_nt(a, b) is (rows, inner) x (cols, inner) -> (rows, cols).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_OP = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


def uses_onednn(t: torch.Tensor) -> bool:
    """True where the oneDNN path runs: a float32 CPU tensor, with torch built with oneDNN and it enabled."""
    return (_OP is not None and t.device.type == "cpu" and t.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def mm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b^T -> (R, C), by oneDNN on CPU (no autograd: for gradients and no-grad statistics)."""
    if uses_onednn(a) and b.dtype == a.dtype and a.shape[1] > 0:  # oneDNN refuses an empty inner dim
        return _OP(a, b, None, "none", [], "")
    return a @ b.t()


class _Linear(torch.autograd.Function):
    """y = x w^T + b with all three GEMMs (forward, input and weight gradient) by oneDNN."""

    @staticmethod
    def forward(fn_ctx, x_NI: torch.Tensor, w_OI: torch.Tensor, b_O: torch.Tensor | None) -> torch.Tensor:
        fn_ctx.save_for_backward(x_NI, w_OI)
        fn_ctx.has_bias = b_O is not None
        return _OP(x_NI, w_OI, b_O, "none", [], "")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(fn_ctx, dy_NO: torch.Tensor):
        x_NI, w_OI = fn_ctx.saved_tensors
        dx_NI = mm_nt(dy_NO, w_OI.t()) if fn_ctx.needs_input_grad[0] else None
        dw_OI = mm_nt(dy_NO.t(), x_NI.t()) if fn_ctx.needs_input_grad[1] else None
        db_O = dy_NO.sum(0) if fn_ctx.has_bias and fn_ctx.needs_input_grad[2] else None
        return dx_NI, dw_OI, db_O


def linear(x_NI: torch.Tensor, w_OI: torch.Tensor, b_O: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for 2-d input, by oneDNN on CPU float32 (forward and backward), else F.linear itself."""
    if x_NI.dim() == 2 and x_NI.shape[1] > 0 and uses_onednn(x_NI) and w_OI.dtype == torch.float32:
        return _Linear.apply(x_NI, w_OI, b_O)
    return F.linear(x_NI, w_OI, b_O)
