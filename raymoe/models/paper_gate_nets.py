"""The paper's gate networks (docs/paper-notes.md §1.2 table): a trunk h_g(x) of conv stages -> fc1 -> ReLU -> fc2.

The trunk ends at fc2; the gate (raymoe/moe/gates.py) applies ReLU to it for the original gate, and for the
attentive gate only on Fashion-MNIST (docs/paper-notes.md §1.2, "Attentive-gate trunk" row). Both gates hold the trunk
under the same parameter names (`trunk.*`), so distillation loads one from the other (docs/paper-notes.md §1.3 rows 8/9).

Shape legend: B samples, Z channels, S image side, H trunk output width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.models.paper_experts import ConvNetSpec, conv_stages, run_conv_stages

# Gate columns of the docs/paper-notes.md §1.2 table: (conv channels, BatchNorm flags, padding, fc1, H, attentive ReLU on fc2).
GATE_ARCHS = {
    "mnist": ((1,), (False,), 0, 128, 32, False),
    "fashion_mnist": ((8,), (True,), 0, 512, 32, True),
    "cifar10": ((64, 128, 256, 256), (False, True, False, True), 1, 512, 32, False),
    "cifar100": ((64, 128, 256, 512), (False, True, False, True), 1, 512, 64, False),
}


def gate_trunk_spec(dataset: str, in_channels: int, image_size: int,
                    hidden: int | None = None) -> tuple[ConvNetSpec, bool]:
    """(trunk spec, whether the ATTENTIVE trunk ends in ReLU) for `dataset`; `hidden` overrides H."""
    if dataset not in GATE_ARCHS:
        raise ValueError(f"no paper gate architecture for data set {dataset!r}; known: {sorted(GATE_ARCHS)}")
    channels, bn, padding, fc1, h, attentive_relu = GATE_ARCHS[dataset]
    return ConvNetSpec(in_channels, image_size, channels, bn, padding, fc1, hidden or h), attentive_relu


class GateTrunk(nn.Module):
    """h_g(x): conv stages (conv, optional BatchNorm, ReLU, max-pool) -> fc1 -> ReLU -> fc2."""

    def __init__(self, spec: ConvNetSpec):
        super().__init__()
        self.out_features = spec.hidden
        self.convs, self.bns = conv_stages(spec)
        self.fc1 = nn.Linear(spec.flat_features, spec.fc1)
        self.fc2 = nn.Linear(spec.fc1, spec.hidden)

    def forward(self, x_BZSS: torch.Tensor) -> torch.Tensor:
        t = run_conv_stages(self.convs, self.bns, x_BZSS)
        return self.fc2(F.relu(self.fc1(t.flatten(1))))
