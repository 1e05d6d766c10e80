"""The regulariser terms of one step, from the model output: what the training loop adds to the NLL.

total = w_importance * L_importance + w_load * L_load + w_balance * L_switch + w_z * L_z (summed over MoE
layers) + L_s (sample-level gates only). Only terms with a weight > 0 enter the total; `parts` also carries the
cheap importance and z-loss values for logging. Parts are unweighted and detached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from raymoe.config.schema import RegularizerConfig
from raymoe.models.output import ModelOutput
from raymoe.regularizers.importance import importance_loss
from raymoe.regularizers.load import load_loss
from raymoe.regularizers.sample_similarity import sample_similarity
from raymoe.regularizers.switch_balance import switch_balance_loss
from raymoe.regularizers.z_loss import router_z_loss


@dataclass
class RegTerms:
    total: torch.Tensor  # weighted sum, differentiable
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted, detached, for logging


def regularize(cfg: RegularizerConfig, out: ModelOutput, x_B: torch.Tensor) -> RegTerms:
    """Regulariser terms for one batch.

    Args:
        cfg: the weights (cfg.regularizer).
        out: the model output on the batch (gathered over ranks when data parallel).
        x_B: the input images of that batch (for the sample-similarity distance).
    Returns:
        RegTerms(total, parts) with parts keys importance, z_loss always (when there is a gate), load,
        load_balance when weighted, and sample_similarity, ls_same, ls_diff when L_s is on.
    """
    device = out.log_probs_BC.device
    total = torch.zeros((), device=device)
    parts: dict[str, torch.Tensor] = {}
    if not out.gates:
        return RegTerms(total=total, parts=parts)

    def add(name: str, weight: float, values: list[torch.Tensor], always: bool = False) -> None:
        nonlocal total
        if weight <= 0 and not always:
            return
        value = torch.stack(values).sum()
        if weight > 0:
            total = total + weight * value
        parts[name] = value.detach()

    add("importance", cfg.importance, [importance_loss(g) for g in out.gates], always=True)
    add("z_loss", cfg.z_loss, [router_z_loss(g) for g in out.gates], always=True)
    if cfg.load > 0:
        add("load", cfg.load, [load_loss(g) for g in out.gates])
    if cfg.load_balance > 0:
        add("load_balance", cfg.load_balance, [switch_balance_loss(g) for g in out.gates])
    ss = cfg.sample_similarity
    if (ss.beta_s > 0 or ss.beta_d > 0) and out.items_per_sample == 1:
        terms = [sample_similarity(g.probs_NE, x_B, ss.beta_s, ss.beta_d, ss.normalization, ss.distance)
                 for g in out.gates]
        total = total + torch.stack([t.value for t in terms]).sum()
        parts["sample_similarity"] = torch.stack([t.value for t in terms]).sum().detach()
        parts["ls_same"] = torch.stack([t.same for t in terms]).sum().detach()
        parts["ls_diff"] = torch.stack([t.diff for t in terms]).sum().detach()
    return RegTerms(total=total, parts=parts)
