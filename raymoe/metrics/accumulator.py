"""Evaluation metrics accumulated over batches as sums and counts, so ranks can be summed exactly.

`update` per batch, `reduce(ctx)` once (all-reduce of the sums: distributed metrics equal single-process
ones), then `compute()` for the scalars and `matrices()` for the figures.

Sample-level MoE (one gate, N = B): error, top5_error (C > 5), mi_true_bits (expert = argmax gate x true
label), mi_pred_bits (x class predicted by that expert: the paper's I(E;Y), docs/paper-notes.md §4.2), sample_entropy_bits
(H_s), usage_entropy_bits (H_u over the WHOLE evaluation set: the reference used its last test batch, docs/paper-notes.md §7.4),
importance_cv (CV of the summed gate probabilities), max_load_share, dead_expert_frac (experts with a share
below 1/(10E)) and load_share/{j} (routed counts: docs/observatory.md).
Token-level models (items_per_sample > 1, one gate per MoE layer): per layer "layer{i}/..." with i the 0-based
MoE layer: usage_entropy_bits, mi_true_bits (token t of image b labelled y_b), mi_pred_bits (labelled with the
model's predicted class, as no single expert predicts), sample_entropy_bits (per token), importance_cv,
dropped_frac, router_z (mean logsumexp^2); the top-level keys are the means over layers.
The single model (no gate) gets error and top5_error only.
Shape legend: B samples, N routed items, E experts, C classes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from raymoe.metrics.specialization import coefficient_of_variation, entropy_bits, mutual_information_bits
from raymoe.metrics.stability import FirstItems
from raymoe.models.output import ModelOutput
from raymoe.parallel.context import DistContext

HIST_BINS = 40
_SCALARS = ("correct", "top5_correct", "samples")
_GATE_SCALARS = ("items", "entropy_sum", "z_sum", "dropped_sum", "dropped_items")


def _hist_top(num_experts: int) -> float:
    return math.log2(num_experts) if num_experts > 1 else 1.0


class _GateSums:
    """Sums for one gate (the sample-level gate, or one token-level MoE layer)."""

    def __init__(self, num_experts: int, num_classes: int, device: torch.device, keep_items: int = 0):
        f64 = dict(dtype=torch.float64, device=device)
        self.num_experts = num_experts
        self.first = FirstItems(keep_items)  # top-1 expert of this rank's first keep_items items (stability)
        self.scalars = torch.zeros(len(_GATE_SCALARS), **f64)
        self.probs_E = torch.zeros(num_experts, **f64)
        self.load_E = torch.zeros(num_experts, **f64)
        self.true_EC = torch.zeros(num_experts, num_classes, **f64)
        self.pred_EC = torch.zeros(num_experts, num_classes, **f64)
        self.hist = torch.zeros(HIST_BINS, **f64)

    def tensors(self) -> list[torch.Tensor]:
        return [self.scalars, self.probs_E, self.load_E, self.true_EC, self.pred_EC, self.hist]

    @torch.no_grad()
    def update(self, gate, labels_N: torch.Tensor, preds_N: torch.Tensor, stats: dict | None) -> None:
        e, c = self.true_EC.shape
        probs_NE = gate.probs_NE.detach()
        n = probs_NE.shape[0]
        ent_N = entropy_bits(probs_NE, dim=-1)
        top1_N = gate.top1_N
        lse_N = torch.logsumexp(gate.logits_NE.detach().double(), dim=-1)
        kept = gate.experts_NK[gate.experts_NK >= 0]
        dropped = torch.zeros((), dtype=torch.float64, device=self.scalars.device)
        has_dropped = 0.0
        if stats and "dropped_frac" in stats:
            dropped = stats["dropped_frac"].detach().double().reshape(()) * n
            has_dropped = float(n)
        self.scalars += torch.stack([torch.tensor(float(n), dtype=torch.float64, device=ent_N.device),
                                     ent_N.sum(), lse_N.pow(2).sum(), dropped.to(ent_N.device),
                                     torch.tensor(has_dropped, dtype=torch.float64, device=ent_N.device)])
        self.probs_E += probs_NE.double().sum(0)
        self.load_E += torch.bincount(kept, minlength=e).double()
        self.true_EC += torch.bincount(top1_N * c + labels_N, minlength=e * c).view(e, c).double()
        self.pred_EC += torch.bincount(top1_N * c + preds_N, minlength=e * c).view(e, c).double()
        bins_N = (ent_N / _hist_top(e) * HIST_BINS).floor().long().clamp(0, HIST_BINS - 1)
        self.hist += torch.bincount(bins_N, minlength=HIST_BINS).double()
        self.first.keep(top1_N)

    def metrics(self) -> dict[str, float]:
        items, entropy_sum, z_sum, dropped_sum, dropped_items = self.scalars.tolist()
        out = {
            "mi_true_bits": mutual_information_bits(self.true_EC.cpu()),
            "mi_pred_bits": mutual_information_bits(self.pred_EC.cpu()),
            "sample_entropy_bits": entropy_sum / items if items else float("nan"),
            "usage_entropy_bits": float(entropy_bits(self.probs_E.cpu() / max(items, 1.0))),
            "importance_cv": coefficient_of_variation(self.probs_E.cpu()),
            "router_z": z_sum / items if items else float("nan"),
        }
        if dropped_items:
            out["dropped_frac"] = dropped_sum / dropped_items
        share_E = self.load_share()
        out["max_load_share"] = float(share_E.max())
        out["dead_expert_frac"] = float((share_E < 1.0 / (10 * self.num_experts)).double().mean())
        out.update({f"load_share/{j}": float(v) for j, v in enumerate(share_E)})
        return out

    def load_share(self) -> torch.Tensor:
        """Share of the routed items each expert received (counts, not gate mass): the routed slots of a sparse
        router, the top-1 choice of a dense gate (where every expert gets every item)."""
        items = self.scalars[0].item()
        dense = self.load_E.sum().item() >= items * self.num_experts > 0
        counts_E = (self.true_EC.sum(1) if dense else self.load_E).cpu()
        return counts_E / counts_E.sum().clamp_min(1.0)

    def matrices(self) -> dict[str, np.ndarray]:
        return {
            "counts_true_EC": self.true_EC.cpu().numpy().astype(np.int64),
            "counts_pred_EC": self.pred_EC.cpu().numpy().astype(np.int64),
            "usage_E": self.probs_E.cpu().numpy(),
            "load_E": self.load_E.cpu().numpy().astype(np.int64),
            "entropy_hist": self.hist.cpu().numpy().astype(np.int64),
            "entropy_edges": np.linspace(0.0, _hist_top(self.num_experts), HIST_BINS + 1),
        }


class SpecializationAccumulator:
    """Sums over evaluation batches of error, gate entropy, usage and expert x class counts."""

    def __init__(self, num_experts: int, num_classes: int, keep_items: int = 0):
        self.num_experts, self.num_classes, self.keep_items = num_experts, num_classes, keep_items
        self.scalars: torch.Tensor | None = None  # correct, top-5 correct, samples
        self.gates: list[_GateSums] = []
        self.token_level = False

    def _init(self, device: torch.device, num_gates: int, token_level: bool, experts: list[int]) -> None:
        self.scalars = torch.zeros(len(_SCALARS), dtype=torch.float64, device=device)
        self.token_level = token_level
        self.gates = [_GateSums(e, self.num_classes, device, self.keep_items) for e in experts[:num_gates]]

    @torch.no_grad()
    def update(self, out: ModelOutput, y_B: torch.Tensor) -> None:
        """Add one batch: the model output and the true labels."""
        log_probs_BC = out.log_probs_BC.detach()
        if self.scalars is None:
            token_level = out.items_per_sample > 1 or len(out.gates) > 1
            self._init(log_probs_BC.device, len(out.gates), token_level, [g.num_experts for g in out.gates])
        y_B = y_B.to(log_probs_BC.device)
        pred_B = log_probs_BC.argmax(-1)
        top5 = torch.zeros((), device=pred_B.device)
        if log_probs_BC.shape[1] > 5:
            top5 = (log_probs_BC.topk(5, dim=-1).indices == y_B[:, None]).any(-1).sum()
        self.scalars += torch.stack([(pred_B == y_B).sum(), top5, torch.tensor(y_B.numel(), device=pred_B.device)]
                                    ).double()
        if not self.gates:
            return
        if not self.token_level:
            selected = out.selected_pred_B if out.selected_pred_B is not None else pred_B
            self.gates[0].update(out.gates[0], y_B, selected.detach(), out.layer_stats[0] if out.layer_stats else None)
            return
        t = out.items_per_sample
        labels_N, preds_N = y_B.repeat_interleave(t), pred_B.repeat_interleave(t)  # token t of image b gets y_b
        for i, (sums, gate) in enumerate(zip(self.gates, out.gates)):
            sums.update(gate, labels_N, preds_N, out.layer_stats[i] if i < len(out.layer_stats) else None)

    def state_tensors(self) -> list[torch.Tensor]:
        """Every sum, in a fixed order (what `reduce` all-reduces)."""
        if self.scalars is None:
            return []
        return [self.scalars, *(t for g in self.gates for t in g.tensors())]

    def reduce(self, ctx: DistContext) -> None:
        """Sum the state over all ranks (in place); a rank that saw no batch contributes zeros."""
        if not ctx.distributed:
            return
        mine = self.scalars is not None
        layout = torch.tensor([float(mine), float(self.token_level) * mine, len(self.gates) * mine,
                               *([g.num_experts for g in self.gates][:1] or [0])], dtype=torch.float64,
                              device=ctx.device)
        ctx.all_reduce_sum(layout)
        ranks_with_data = int(layout[0].item())
        if ranks_with_data == 0:
            return
        if not mine:
            num_gates = round(layout[2].item() / ranks_with_data)
            experts = round(layout[3].item() / ranks_with_data) or self.num_experts
            self._init(ctx.device, num_gates, bool(round(layout[1].item() / ranks_with_data)), [experts] * num_gates)
        for t in self.state_tensors():
            ctx.all_reduce_sum(t)

    def compute(self) -> dict[str, float]:
        """Scalar metrics (see the module docstring for the keys)."""
        if self.scalars is None:
            return {}
        correct, top5, samples = self.scalars.tolist()
        out = {"error": 1.0 - correct / samples if samples else float("nan")}
        if self.num_classes > 5:
            out["top5_error"] = 1.0 - top5 / samples if samples else float("nan")
        if not self.gates:
            return out
        if not self.token_level:
            metrics = self.gates[0].metrics()
            metrics.pop("router_z", None)
            return {**out, **metrics}
        per_layer = [g.metrics() for g in self.gates]
        for i, metrics in enumerate(per_layer):
            out.update({f"layer{i}/{k}": v for k, v in metrics.items()})
        for key in ("mi_true_bits", "mi_pred_bits", "sample_entropy_bits", "usage_entropy_bits", "importance_cv",
                    "max_load_share", "dead_expert_frac"):
            out[key] = float(np.mean([m[key] for m in per_layer]))
        return out

    def first_top1(self) -> list[np.ndarray]:
        """Per gate (layer), the top-1 expert of this rank's first keep_items routed items, in evaluation order."""
        return [g.first.array() for g in self.gates]

    def matrices(self) -> dict[str, np.ndarray]:
        """Arrays for the figures; token-level ones are prefixed "layer{i}/"."""
        if not self.gates:
            return {}
        if not self.token_level:
            return self.gates[0].matrices()
        return {f"layer{i}/{k}": v for i, g in enumerate(self.gates) for k, v in g.matrices().items()}
