"""Mixed precision: bf16 autocast on CPU and CUDA with float32 master weights (the parameters and the optimizer
state stay float32; autocast runs matmuls/convs in bf16 and keeps reductions such as log-softmax in float32)."""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, precision: str):
    """The context a forward pass runs in for train.precision ("fp32": none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}")
