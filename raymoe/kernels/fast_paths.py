"""CPU fast paths applied from outside, as expert parallelism is (raymoe/parallel/expert_parallel.py).

Models are written with plain nn.Linear. `apply_fast_paths(model, device)` gives every nn.Linear the oneDNN GEMM
path (raymoe/kernels/onednn_gemm.py) when a short probe on this machine found it faster than torch's default
CPU GEMM: on AMD EPYC torch's MKL sgemm runs AVX2 kernels and oneDNN's AVX-512 ones were 2x faster, while an
Intel Xeon's MKL may win. The swap changes only the class of each module (same parameters, same state_dict);
under autocast and for inputs that are not 2-d float32 the module is an ordinary nn.Linear.
"""

from __future__ import annotations

import functools
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.kernels.onednn_gemm import linear, uses_onednn

PROBE_SHAPE = (512, 1352, 512)  # rows, in, out: the Fashion-MNIST gate's fc1, the paper MoE's largest GEMM


class OneDnnLinear(nn.Linear):
    """nn.Linear whose 2-d float32 CPU products (forward and both gradients) run through oneDNN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # autocast picks the dtype: the ordinary op
            return F.linear(x, self.weight, self.bias)
        return linear(x, self.weight, self.bias)


def _time_ms(fn, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> float:
    """Milliseconds of one forward + backward of fn(x, w, b)."""
    x.grad = w.grad = b.grad = None
    start = time.perf_counter()
    fn(x, w, b).sum().backward()
    return (time.perf_counter() - start) * 1e3


@functools.lru_cache(maxsize=None)
def gemm_probe(threads: int) -> dict:
    """Forward + backward of one PROBE_SHAPE linear layer by torch's default GEMM and by oneDNN, interleaved,
    median of 5 after a warm-up; cached per process and thread count. {"backend": "onednn" | "torch", ...}."""
    n, i, o = PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, i, generator=g, requires_grad=True)
    w = torch.randn(o, i, generator=g, requires_grad=True)
    b = torch.randn(o, generator=g, requires_grad=True)
    if not uses_onednn(x):
        return {"backend": "torch", "why": "oneDNN is not available for float32 CPU tensors here"}
    times: dict[str, list[float]] = {"torch": [], "onednn": []}
    for rep in range(6):
        for name, fn in (("torch", F.linear), ("onednn", linear)):
            ms = _time_ms(fn, x, w, b)
            if rep:  # the first round warms both up
                times[name].append(ms)
    med = {name: statistics.median(v) for name, v in times.items()}
    return {"backend": "onednn" if med["onednn"] < med["torch"] else "torch", "threads": threads,
            "shape": list(PROBE_SHAPE), "torch_ms": round(med["torch"], 3), "onednn_ms": round(med["onednn"], 3)}


def gemm_choice(device: torch.device) -> dict:
    """The linear layers' GEMM backend on `device` and why (the probe's timings on a CPU), for logs and benches."""
    if device.type != "cpu":
        return {"backend": "torch", "why": f"{device.type}: the device's own GEMMs"}
    return gemm_probe(torch.get_num_threads())


def apply_fast_paths(model: nn.Module, device: torch.device) -> dict:
    """Swap every plain nn.Linear of `model` for OneDnnLinear where gemm_choice picked oneDNN; returns
    {"linear": backend, "swapped": count}."""
    backend = gemm_choice(device)["backend"]
    swapped = 0
    if backend == "onednn":
        for module in model.modules():
            if type(module) is nn.Linear:
                module.__class__ = OneDnnLinear
                swapped += 1
    return {"linear": backend, "swapped": swapped}
