"""Single-model baseline (docs/paper-notes.md §1.3 row 1): one network with the expert's architecture, no gate."""

from __future__ import annotations

import torch
from torch import nn

from raymoe.models.output import ModelOutput
from raymoe.models.paper_experts import ConvNetSpec, PlainExpert


class SingleModel(nn.Module):
    """forward(x_BZSS) -> ModelOutput(log(softmax output + eps)); gates=[] and no selected expert."""

    def __init__(self, spec: ConvNetSpec, num_classes: int, log_eps: float = 1e-7):
        super().__init__()
        self.net, self.log_eps = PlainExpert(spec, num_classes), log_eps

    def forward(self, x_BZSS: torch.Tensor) -> ModelOutput:
        # same eps convention as the MoE so the two rows of the paper table share one loss
        return ModelOutput(log_probs_BC=torch.log(self.net(x_BZSS) + self.log_eps))
