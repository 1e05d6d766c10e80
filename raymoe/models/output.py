"""What every model's forward returns to the training loop."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from raymoe.moe.routing import GateResult


@dataclass(slots=True)
class ModelOutput:
    """log_probs_BC: log class probabilities (the loss is NLL on them; the paper MoE folds its eps in here).
        Language models (gpt, gpt_moe): next-token log-probs over the vocabulary, (B * T, V), row b * T + t.
    gates: one GateResult per MoE layer ([] for the single model); sample-level N = B, token-level N = B * T.
    items_per_sample: N // B (1 for sample-level gates, tokens per image / sequence for token-level layers).
    selected_pred_B: class predicted by each sample's top-1 expert (the paper's I(E;Y)); None for token-level.
    aux_loss: loss terms the model adds itself (e.g. none for the paper MoE); regularizers are separate.
    layer_stats: per MoE layer, unweighted diagnostics such as {"dropped_frac": t} (token-level).
    """

    log_probs_BC: torch.Tensor
    gates: list[GateResult] = field(default_factory=list)
    items_per_sample: int = 1
    selected_pred_B: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    layer_stats: list[dict[str, torch.Tensor]] = field(default_factory=list)
