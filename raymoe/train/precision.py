"""Mixed precision: bf16 autocast on CPU and CUDA with float32 master weights (the parameters and the optimizer
state stay float32; autocast runs matmuls/convs in bf16 and keeps reductions such as log-softmax in float32)."""

from __future__ import annotations

import contextlib

import torch


def bf16_supported(device: torch.device) -> bool:
    """bf16 arithmetic in hardware: CUDA devices that report it, CPUs with AVX512-BF16 or AMX (oneDNN's check)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(check()) if check is not None else False
    return False


def autocast(device: torch.device, precision: str):
    """The context a forward pass runs in for train.precision ("fp32": none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}")
