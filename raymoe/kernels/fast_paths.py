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


def _time_ms(fn, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        x.grad = w.grad = b.grad = None
        start = time.perf_counter()
        fn(x, w, b).sum().backward()
        out.append((time.perf_counter() - start) * 1e3)
    return out


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
            ms = _time_ms(fn, x, w, b, 1)
            if rep:  # the first round warms both up
                times[name] += ms
    med = {name: statistics.median(v) for name, v in times.items()}
    return {"backend": "onednn" if med["onednn"] < med["torch"] else "torch", "threads": threads,
            "shape": list(PROBE_SHAPE), "torch_ms": round(med["torch"], 3), "onednn_ms": round(med["onednn"], 3)}


def apply_fast_paths(model: nn.Module, device: torch.device) -> dict:
    """Swap every plain nn.Linear of `model` for OneDnnLinear on a CPU where the probe chose oneDNN; returns
    what was decided ({"linear": backend, "swapped": count, "probe": ...}) for logs and benchmarks."""
    if device.type != "cpu":
        return {"linear": "torch", "swapped": 0, "why": f"{device.type}: the device's own GEMMs"}
    probe = gemm_probe(torch.get_num_threads())
    swapped = 0
    if probe["backend"] == "onednn":
        for module in model.modules():
            if type(module) is nn.Linear:
                module.__class__ = OneDnnLinear
                swapped += 1
    return {"linear": probe["backend"], "swapped": swapped, "probe": probe}
