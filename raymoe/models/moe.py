"""The paper's "expectation" MoE (docs/paper-notes.md §1.1): y_hat(x) = sum_e g_e(x) f_e(x), loss NLL on log(y_hat + eps).

The model talks to its experts only through the dispatcher:
    dispatch -> experts.forward_grouped (sparse pairs) or experts.forward_dense (every expert, every image)
    -> dispatcher.combine,
so expert parallelism can swap in an all-to-all dispatcher and a shard of the experts from outside
(raymoe/parallel/expert_parallel.py) without this file knowing.

Dense gates (softmax, attentive) send each image once (dispatch without expert ids); every local expert runs on
it and combine returns expert-major (expert, sample) rows. The attentive gate reads every expert's hidden
layer, so the experts run before it (docs/paper-notes.md §2).
Sparse gates (topk, noisy_topk) run first; only each sample's k chosen experts run, y_hat = sum_k w_k f_k(x).

Shape legend: B samples, E experts, K experts per sample, P pairs, C classes, H expert hidden width,
Y = C + H expert output row (class probabilities, then hidden).
"""

from __future__ import annotations

import torch
from torch import nn

from raymoe.models.output import ModelOutput
from raymoe.moe.dispatch import LocalDispatcher
from raymoe.moe.expert_stack import ExpertStack


class ExpectationMoE(nn.Module):
    """Gate + stacked experts; forward(x_BZSS) -> ModelOutput with one GateResult (N = B)."""

    def __init__(self, experts: ExpertStack, gate: nn.Module, num_classes: int, log_eps: float = 1e-7,
                 output_softmax: bool = False):
        super().__init__()
        self.experts, self.gate = experts, gate
        self.num_experts, self.num_classes = experts.num_experts, num_classes
        self.log_eps, self.output_softmax = log_eps, output_softmax
        self.dispatcher = LocalDispatcher(experts.num_experts)

    def run_experts(self, x_PX: torch.Tensor, experts_P: torch.Tensor) -> torch.Tensor:
        """One output row (class probs, hidden) per (sample, expert) pair, in pair order."""
        x_RX, counts, meta = self.dispatcher.dispatch(x_PX, experts_P)
        return self.dispatcher.combine(self.experts.forward_grouped(x_RX, counts), meta)

    def forward(self, x_BZSS: torch.Tensor) -> ModelOutput:
        b, e, c = x_BZSS.shape[0], self.num_experts, self.num_classes
        if self.gate.dense:  # every expert on every image, sent once (no pair rows): expert-major (e, b) pairs
            x_GX, _, meta = self.dispatcher.dispatch(x_BZSS, None)
            y_EBY = self.dispatcher.combine(self.experts.forward_dense(x_GX), meta).view(e, b, -1)
            probs_EBC = y_EBY[..., :c]
            if self.gate.needs_expert_hidden:
                gate = self.gate(x_BZSS, y_EBY[..., c:].transpose(0, 1))
            else:
                gate = self.gate(x_BZSS)
            mixture_BC = torch.einsum("be,ebc->bc", gate.probs_NE, probs_EBC)
            with torch.no_grad():  # class predicted by each sample's argmax-gate expert (the paper's I(E;Y))
                selected_pred_B = probs_EBC[gate.top1_N, torch.arange(b, device=x_BZSS.device)].argmax(-1)
        else:
            gate = self.gate(x_BZSS)
            k = gate.experts_NK.shape[1]
            item_P = torch.arange(b, device=x_BZSS.device).repeat_interleave(k)  # sample-major pairs
            y_BKY = self.run_experts(x_BZSS[item_P], gate.experts_NK.reshape(-1)).view(b, k, -1)
            probs_BKC = y_BKY[..., :c]
            mixture_BC = torch.einsum("bk,bkc->bc", gate.weights_NK, probs_BKC)
            with torch.no_grad():  # top-k is sorted: slot 0 is the argmax-gate expert
                selected_pred_B = probs_BKC[:, 0].argmax(-1)
        if self.output_softmax:  # reference code from 2022-11-18 (CIFAR-100 runs): softmax over the mixture
            mixture_BC = torch.softmax(mixture_BC, dim=-1)
        return ModelOutput(log_probs_BC=torch.log(mixture_BC + self.log_eps), gates=[gate],
                           selected_pred_B=selected_pred_B)
