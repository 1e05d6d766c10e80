"""How much does routing matter? The trained paper MoE re-evaluated with its routing replaced (docs/observatory.md).

Every expert runs on every test image once; each routing is then a mixture of the same expert outputs:
    learned          y = sum_e g_e(x) p_e(x)                 the model as trained (the gate's probabilities)
    learned top-1    y = p_{argmax g(x)}(x)                   hard routing to the gate's choice
    uniform mixture  y = (1/E) sum_e p_e(x)                   no routing at all
    random expert    y = p_{r(x)}(x), r uniform               routing with no information
    load-matched     y = p_{pi(argmax g)(x)}(x)               the learned top-1 choices shuffled over the images:
                                                              exactly the learned per-expert load, no information
    early gate       y = sum_e g^early_e(x) p_e(x)            the gate of an earlier checkpoint, today's experts
Shape legend: B images, E experts, C classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raymoe.models.moe import ExpectationMoE


@torch.no_grad()
def expert_probs_and_gate(model: ExpectationMoE, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs_EBC of every expert, gate probs_BE) of the paper MoE on a batch (dense: every expert runs)."""
    b, e, c = x_BCHW.shape[0], model.num_experts, model.num_classes
    y_EBY = model.experts.forward_dense(x_BCHW).view(e, b, -1)
    gate = model.gate(x_BCHW, y_EBY[..., c:].transpose(0, 1)) if model.gate.needs_expert_hidden else model.gate(x_BCHW)
    return y_EBY[..., :c], gate.probs_NE


def load_matched(top1_B: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The learned top-1 choices shuffled over the items: every expert keeps exactly its learned count."""
    return top1_B[torch.randperm(top1_B.shape[0], generator=generator)]


def _scores(mixture_BC: torch.Tensor, y_B: torch.Tensor, log_eps: float) -> tuple[float, float]:
    """(errors, summed NLL) of a mixture of class probabilities."""
    errors = float((mixture_BC.argmax(-1) != y_B).sum())
    return errors, float(F.nll_loss(torch.log(mixture_BC + log_eps), y_B, reduction="sum"))


@torch.no_grad()
def counterfactual_table(model: ExpectationMoE, batches, seed: int = 0,
                         early: ExpectationMoE | None = None) -> list[dict]:
    """One row per routing: test error and loss over all batches (see the module docstring)."""
    model.eval()
    if early is not None:
        early.eval()
    generator = torch.Generator().manual_seed(seed)
    routings = ["learned", "learned top-1", "uniform mixture", "random expert", "load-matched random"]
    if early is not None:
        routings.append("early gate")
    totals = {name: [0.0, 0.0] for name in routings}
    n = 0
    for x_BCHW, y_B in batches:
        probs_EBC, gate_BE = expert_probs_and_gate(model, x_BCHW)
        e, b, _ = probs_EBC.shape
        rows = torch.arange(b)
        top1_B = gate_BE.argmax(-1)
        mixtures = {
            "learned": torch.einsum("be,ebc->bc", gate_BE, probs_EBC),
            "learned top-1": probs_EBC[top1_B, rows],
            "uniform mixture": probs_EBC.mean(0),
            "random expert": probs_EBC[torch.randint(0, e, (b,), generator=generator), rows],
            "load-matched random": probs_EBC[load_matched(top1_B, generator), rows],
        }
        if early is not None:
            mixtures["early gate"] = torch.einsum("be,ebc->bc", expert_probs_and_gate(early, x_BCHW)[1], probs_EBC)
        for name in routings:
            err, nll = _scores(mixtures[name], y_B, model.log_eps)
            totals[name][0] += err
            totals[name][1] += nll
        n += b
    return [{"routing": name, "test_error": totals[name][0] / n, "test_loss": totals[name][1] / n}
            for name in routings]
