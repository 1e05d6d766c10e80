"""Grouped linear layer: row group g of x is multiplied by its own weight w[g] (one GEMM per expert).

`torch._grouped_mm` does all groups in one call where it applies (torch >= 2.9, CPU and CUDA; the dtype and
kernel are checked once per device by a probe, and every call checks the kernel's 16-byte stride rule);
otherwise a loop of addmm over contiguous row slices gives the same numbers. "auto" picks grouped_mm on CUDA
and the loop on CPU, where it measured faster (see use_grouped_mm).

Shape legend: R rows grouped by group (group-major), e groups (local experts), F hidden width of grouped_ffn,
X input features, Y output features.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Impl = Literal["auto", "grouped_mm", "loop"]

_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_probe_cache: dict[tuple[str, int | None, torch.dtype], bool] = {}


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    NOTE: grouped_mm's backward rejects stride-0 (expanded) gradients, e.g. from `y.sum().backward()`.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class _AddGroupBias(torch.autograd.Function):
    """y[rows of group g] += b[g] in place, one row slice per group; backward sums each group's rows.

    NOTE: on CPU this beat adding b.repeat_interleave(counts) (a materialised R x Y bias and a fresh output):
    forward + backward, 8 groups of 1024 rows, Y 256: 1.9 -> 0.7 ms; with 120 groups of 34 rows it was 0.1-0.3 ms
    slower (per-slice op overhead), and on CUDA it would launch one kernel per group (docs/benchmarks.md, round 13).
    """

    @staticmethod
    def forward(ctx, y_RY, b_eY, counts: list[int]):
        ctx.counts = counts
        for group_rows, group_bias in zip(y_RY.split(counts), b_eY):
            group_rows.add_(group_bias)
        ctx.mark_dirty(y_RY)
        return y_RY

    @staticmethod
    def backward(ctx, dy_RY):
        db_eY = dy_RY.new_empty((len(ctx.counts), dy_RY.shape[1]))
        for group_grad, bias_grad in zip(dy_RY.split(ctx.counts), db_eY):
            torch.sum(group_grad, 0, out=bias_grad)  # an empty group sums to 0
        return dy_RY, db_eY, None


def _aligned(t: torch.Tensor) -> bool:
    """The kernel needs a contiguous last dim and every other stride a multiple of 16 bytes."""
    if t.stride(-1) != 1:
        return False
    return all((s * t.element_size()) % 16 == 0 for s in t.stride()[:-1])


def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    """Try a tiny grouped_mm forward + backward once per (device, dtype): kernels differ by arch and version."""
    key = (device.type, device.index, dtype)
    if key not in _probe_cache:
        try:
            with torch.inference_mode(False), torch.enable_grad():
                x = torch.ones(24, 16, device=device, dtype=dtype, requires_grad=True)
                w = torch.ones(2, 16, 8, device=device, dtype=dtype, requires_grad=True)
                offs = torch.tensor([5, 24], device=device, dtype=torch.int32)  # uneven groups, as in routing
                y = torch._grouped_mm(x, w, offs=offs)
                y.backward(torch.ones_like(y))
            _probe_cache[key] = bool(torch.allclose(y.float(), torch.full_like(y.float(), 16.0)))
        except (RuntimeError, NotImplementedError, TypeError):
            _probe_cache[key] = False
    return _probe_cache[key]


def grouped_mm_applies(x_RX: torch.Tensor, w_eXY: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` can run this product (availability, dtype, alignment, working kernel)."""
    return (hasattr(torch, "_grouped_mm") and x_RX.dtype in _GROUPED_DTYPES and w_eXY.dtype == x_RX.dtype
            and x_RX.dim() == 2 and w_eXY.dim() == 3 and _aligned(x_RX) and _aligned(w_eXY)
            and w_eXY.shape[-1] * x_RX.element_size() % 16 == 0  # the output's row stride
            and _probe(x_RX.device, x_RX.dtype))


def grouped_ffn_applies(x_RX: torch.Tensor, w1_eXF: torch.Tensor, w2_eFY: torch.Tensor) -> bool:
    """Whether grouped_ffn's grouped_mm path can run: rows to multiply, and both products supported."""
    return x_RX.shape[0] > 0 and grouped_mm_applies(x_RX, w1_eXF) and grouped_mm_applies(x_RX, w2_eFY)


def use_grouped_mm(x_RX: torch.Tensor, w_eXY: torch.Tensor, impl: Impl = "auto") -> bool:
    """The path of `impl`: "auto" takes grouped_mm on CUDA where it applies, the loop on CPU.

    NOTE: on CPU, torch._grouped_mm is a composite of per-group GEMMs (torch 2.9-2.14); measured on a 2-core x86
    VM (CPU time, forward + backward of the expert FFN) it was 0-15% slower than the per-group loop of
    grouped_ffn, which keeps each group's hidden block in cache for the bias, activation and second GEMM
    (raymoe bench moe-layer --impl grouped_mm vs --impl loop).
    """
    if impl == "auto":
        return x_RX.is_cuda and x_RX.shape[0] > 0 and grouped_mm_applies(x_RX, w_eXY)
    return impl == "grouped_mm"


def grouped_linear(x_RX: torch.Tensor, w_eXY: torch.Tensor, b_eY: torch.Tensor | None, counts: list[int],
                   impl: Impl = "auto") -> torch.Tensor:
    """y[rows of group g] = x[rows of group g] @ w[g] + b[g].

    Args:
        x_RX: rows sorted by group; group g owns the next counts[g] rows.
        w_eXY: one weight matrix per group.
        b_eY: one bias per group, or None.
        counts: rows per group (python ints, len G, summing to R).
        impl: "grouped_mm", "loop", or "auto" (see use_grouped_mm).
    Returns:
        y_RY.
    """
    if use_grouped_mm(x_RX, w_eXY, impl):
        offs_e = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(x_RX.device)
        y_RY = torch._grouped_mm(x_RX, w_eXY, offs=offs_e)
        if b_eY is not None and x_RX.is_cuda:  # one broadcast kernel, not one per group
            counts_e = torch.tensor(counts, device=x_RX.device)
            y_RY = y_RY + b_eY.repeat_interleave(counts_e, dim=0, output_size=x_RX.shape[0])
        elif b_eY is not None:
            y_RY = _AddGroupBias.apply(y_RY, b_eY, counts)
        return _ContiguousGrad.apply(y_RY)
    # split/unbind keep one autograd node each (slicing per group would allocate a full-size gradient per slice)
    xs, ws = x_RX.split(counts), w_eXY.unbind(0)
    if b_eY is None:
        return torch.cat([torch.mm(x, w) for x, w in zip(xs, ws)])
    return torch.cat([torch.addmm(b, x, w) for x, w, b in zip(xs, ws, b_eY.unbind(0))])


Activation = Literal["gelu", "relu"]


def _act(pre: torch.Tensor, act: Activation) -> torch.Tensor:
    return F.gelu(pre) if act == "gelu" else F.relu(pre)


def _act_into(pre: torch.Tensor, act: Activation, out: torch.Tensor) -> torch.Tensor:
    """act(pre) written into `out` (a row slice of a preallocated tensor)."""
    if act == "gelu":
        return torch.ops.aten.gelu.out(pre, out=out)
    return torch.clamp_min(pre, 0.0, out=out)


def _act_backward(grad: torch.Tensor, pre: torch.Tensor, act: Activation) -> torch.Tensor:
    if act == "gelu":
        return torch.ops.aten.gelu_backward(grad, pre)
    return grad.masked_fill_(pre <= 0, 0.0)


class _LoopFFN(torch.autograd.Function):
    """Per-group FFN with a hand-written backward that writes every weight gradient straight into its slot of
    the stacked (G, ...) gradient and every row gradient into one (R, X) tensor.

    NOTE: autograd over split/unbind would stack the per-group weight gradients afterwards (a full copy of all
    expert weights per step) and concatenate the row gradients; with many experts that traffic was ~20% of the
    layer's CPU time. The pre-activation and the activation are both saved, as autograd over nn.Linear would
    (recomputing the activation in backward measured 1-1.5% slower for the whole layer). No double backward.
    """

    @staticmethod
    def forward(ctx, x_RX, w1_eXF, b1_eF, w2_eFY, b2_eY, counts: list[int], act: Activation):
        pre_RF = x_RX.new_empty((x_RX.shape[0], w1_eXF.shape[2]))
        h_RF = torch.empty_like(pre_RF)
        y_RY = x_RX.new_empty((x_RX.shape[0], w2_eFY.shape[2]))
        start = 0
        for g, c in enumerate(counts):
            if c:
                rows = slice(start, start + c)
                torch.addmm(b1_eF[g], x_RX[rows], w1_eXF[g], out=pre_RF[rows])
                torch.addmm(b2_eY[g], _act_into(pre_RF[rows], act, h_RF[rows]), w2_eFY[g], out=y_RY[rows])
                start += c
        ctx.save_for_backward(x_RX, w1_eXF, w2_eFY, pre_RF, h_RF)
        ctx.counts, ctx.act = counts, act
        return y_RY

    @staticmethod
    def backward(ctx, dy_RY):
        x_RX, w1_eXF, w2_eFY, pre_RF, h_RF = ctx.saved_tensors
        dy_RY = dy_RY.contiguous()
        dx_RX = torch.empty_like(x_RX)
        dw1, dw2 = torch.empty_like(w1_eXF), torch.empty_like(w2_eFY)  # every group's slot written below
        db1 = w1_eXF.new_empty((w1_eXF.shape[0], w1_eXF.shape[2]))
        db2 = w2_eFY.new_empty((w2_eFY.shape[0], w2_eFY.shape[2]))
        start = 0
        for g, c in enumerate(ctx.counts):
            if not c:  # a group without rows gets zero gradient
                for grad in (dw1, dw2, db1, db2):
                    grad[g].zero_()
            else:
                rows = slice(start, start + c)
                x, pre, dy = x_RX[rows], pre_RF[rows], dy_RY[rows]
                torch.mm(h_RF[rows].t(), dy, out=dw2[g])
                torch.sum(dy, 0, out=db2[g])
                dpre = _act_backward(dy @ w2_eFY[g].t(), pre, ctx.act)
                torch.mm(x.t(), dpre, out=dw1[g])
                torch.sum(dpre, 0, out=db1[g])
                torch.mm(dpre, w1_eXF[g].t(), out=dx_RX[rows])
                start += c
        return dx_RX, dw1, db1, dw2, db2, None, None


def grouped_ffn(x_RX: torch.Tensor, w1_eXF: torch.Tensor, b1_eF: torch.Tensor, w2_eFY: torch.Tensor,
                b2_eY: torch.Tensor, counts: list[int], act: Activation, impl: Impl = "auto") -> torch.Tensor:
    """y[rows of group g] = act(x W1_g + b1_g) W2_g + b2_g: the experts' FFN and HyperMoE's adapters.

    The loop path runs each group's two GEMMs and activation back to back, so the group's hidden block stays
    in cache (the grouped_mm path materialises the whole hidden R x H tensor between the kernels), with a
    hand-written backward (_LoopFFN).

    Args:
        act: "gelu" (exact) or "relu".
    """
    if (x_RX.is_cuda and grouped_ffn_applies(x_RX, w1_eXF, w2_eFY)) if impl == "auto" else impl == "grouped_mm":
        h_RF = _act(grouped_linear(x_RX, w1_eXF, b1_eF, counts, "grouped_mm"), act)
        return grouped_linear(h_RF, w2_eFY, b2_eY, counts, "grouped_mm")
    if sum(counts) != x_RX.shape[0] or len(counts) != w1_eXF.shape[0]:
        raise ValueError(f"counts {counts} do not match {x_RX.shape[0]} rows and {w1_eXF.shape[0]} groups")
    return _LoopFFN.apply(x_RX.contiguous(), w1_eXF.contiguous(), b1_eF.contiguous(), w2_eFY.contiguous(),
                          b2_eY.contiguous(), counts, act)
