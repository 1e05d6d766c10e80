"""CPU fast paths applied from outside, as expert parallelism is (raymoe/parallel/expert_parallel.py).

Models are written with plain nn.Linear and nn.Conv2d (StackedConv2d for stacked experts).
`apply_fast_paths(model, device)` swaps modules for faster versions where a short probe on this machine, run once
per process, found them clearly faster (by WIN_MARGIN):

* GEMM: every nn.Linear becomes OneDnnLinear (raymoe/kernels/onednn_gemm.py) when oneDNN beat torch's default
  CPU GEMM: on AMD EPYC torch's MKL sgemm runs AVX2 kernels and oneDNN's AVX-512 ones were 2x faster, while an
  Intel Xeon's MKL may win. Under autocast and for inputs that are not 2-d float32 it is an ordinary nn.Linear.
* Conv: every one-channel 3x3 conv of a conv stage (a module's `convs[i]`, followed by `bns[i]`, as
  raymoe/models/paper_experts.py builds them) becomes a PatchConv2d, one GEMM over the patches, with a plain
  BatchNorm2d after it folded in; a one-channel StackedConv2d becomes a PatchStackedConv2d
  (raymoe/kernels/fast_conv.py), when that beat oneDNN's conv + BatchNorm.

A swap changes only the class of each module: same parameters, same buffers, same state_dict. Apply it last
(after expert parallelism replaces BatchNorm), though a replaced BatchNorm also ends its fold by itself.
"""

from __future__ import annotations

import functools
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.kernels.fast_conv import PatchConv2d, PatchStackedConv2d, one_channel_3x3
from raymoe.kernels.onednn_gemm import linear, uses_onednn
from raymoe.models.paper_experts import StackedConv2d

PROBE_SHAPE = (512, 1352, 512)  # rows, in, out: the Fashion-MNIST gate's fc1, the paper MoE's largest GEMM
CONV_PROBE_SHAPE = (512, 28, 8)  # images, side, out channels: the Fashion-MNIST gate's conv(1->8) + BatchNorm
# a fast path must beat torch's own op by 15%: a smaller win flips with machine load from one process to the next
# (a resumed worker would then round differently from the run it continues)
WIN_MARGIN = 0.85


class OneDnnLinear(nn.Linear):
    """nn.Linear whose 2-d float32 CPU products (forward and both gradients) run through oneDNN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # autocast picks the dtype: the ordinary op
            return F.linear(x, self.weight, self.bias)
        return linear(x, self.weight, self.bias)


def _median_ms(candidates: dict, rounds: int = 6) -> dict[str, float]:
    """Median milliseconds of each zero-argument callable, interleaved round by round; the first round warms up."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for rep in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            if rep:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


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

    def step(fn):
        x.grad = w.grad = b.grad = None
        fn(x, w, b).sum().backward()

    med = _median_ms({"torch": lambda: step(F.linear), "onednn": lambda: step(linear)})
    return {"backend": "onednn" if med["onednn"] < WIN_MARGIN * med["torch"] else "torch", "threads": threads,
            "shape": list(PROBE_SHAPE), "torch_ms": round(med["torch"], 3), "onednn_ms": round(med["onednn"], 3)}


@functools.lru_cache(maxsize=None)
def conv_probe(threads: int) -> dict:
    """Forward + backward (to the weights) of the Fashion-MNIST gate's first stage, conv(1->8, 3x3) + training
    BatchNorm on CONV_PROBE_SHAPE images, by oneDNN's conv and by the patch GEMM with the BatchNorm folded in;
    interleaved, median of 5 after a warm-up, cached per process. {"backend": "patch_gemm" | "torch", ...}."""
    n, side, o = CONV_PROBE_SHAPE
    with torch.random.fork_rng(devices=[]):  # the probe runs after the model is drawn: leave the run's RNG alone
        torch.manual_seed(0)
        x = torch.randn(n, 1, side, side)
        plain = nn.Sequential(nn.Conv2d(1, o, 3, bias=False), nn.BatchNorm2d(o))
        fast = nn.Sequential(nn.Conv2d(1, o, 3, bias=False), nn.BatchNorm2d(o))
    fast[0].__class__ = PatchConv2d
    fast[0].fold_into(fast, 1)

    def step(net):
        net.zero_grad(set_to_none=True)
        net(x).contiguous(memory_format=torch.channels_last).square().sum().backward()

    med = _median_ms({"torch": lambda: step(plain), "patch_gemm": lambda: step(fast)})
    return {"backend": "patch_gemm" if med["patch_gemm"] < WIN_MARGIN * med["torch"] else "torch", "threads": threads,
            "shape": list(CONV_PROBE_SHAPE), "torch_ms": round(med["torch"], 3),
            "patch_gemm_ms": round(med["patch_gemm"], 3)}


def gemm_choice(device: torch.device) -> dict:
    """The linear layers' GEMM backend on `device` and why (the probe's timings on a CPU), for logs and benches."""
    if device.type != "cpu":
        return {"backend": "torch", "why": f"{device.type}: the device's own GEMMs"}
    return gemm_probe(torch.get_num_threads())


def conv_choice(device: torch.device) -> dict:
    """The one-channel convs' path on `device` and why (the probe's timings on a CPU), for logs and benches."""
    if device.type != "cpu":
        return {"backend": "torch", "why": f"{device.type}: the device's own convolutions"}
    return conv_probe(torch.get_num_threads())


def _conv_candidates(model: nn.Module) -> list[tuple[nn.Module, nn.Module | None, int]]:
    """(conv, its stage's bns or None, index) for every conv the patch GEMM computes, in a module's `convs`."""
    found = []
    for module in model.modules():
        convs, bns = getattr(module, "convs", None), getattr(module, "bns", None)
        if not isinstance(convs, nn.ModuleList):
            continue
        for i, conv in enumerate(convs):
            if (type(conv) is nn.Conv2d and one_channel_3x3(conv)) or (type(conv) is StackedConv2d and conv.cin == 1):
                found.append((conv, bns if isinstance(bns, nn.ModuleList) and i < len(bns) else None, i))
    return found


def swap_convs(model: nn.Module) -> int:
    """Swap every candidate conv (module docstring) for its patch-GEMM class; returns how many."""
    candidates = _conv_candidates(model)
    for conv, bns, i in candidates:
        if type(conv) is StackedConv2d:
            conv.__class__ = PatchStackedConv2d
        else:
            conv.__class__ = PatchConv2d
            if bns is not None and type(bns[i]) is nn.BatchNorm2d:
                conv.fold_into(bns, i)
    return len(candidates)


def apply_fast_paths(model: nn.Module, device: torch.device) -> dict:
    """Swap `model`'s modules for the fast paths the probes picked on `device` (module docstring); returns
    {"linear": backend, "conv": backend, "swapped": modules swapped}. The conv probe runs only for a model that
    has a one-channel conv (the paper nets), not at the start of every language-model or ViT process."""
    linear_backend = gemm_choice(device)["backend"]
    conv_backend = conv_choice(device)["backend"] if _conv_candidates(model) else "torch"
    swapped = 0
    if linear_backend == "onednn":
        for module in model.modules():
            if type(module) is nn.Linear:
                module.__class__ = OneDnnLinear
                swapped += 1
    if conv_backend == "patch_gemm":
        swapped += swap_convs(model)
    return {"linear": linear_backend, "conv": conv_backend, "swapped": swapped}
