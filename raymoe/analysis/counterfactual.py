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
def expert_probs_and_gate(model: ExpectationMoE, x_BZSS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs_EBC of every expert, gate probs_BE) of the paper MoE on a batch (dense: every expert runs)."""
    b, e, c = x_BZSS.shape[0], model.num_experts, model.num_classes
    y_EBY = model.experts.forward_dense(x_BZSS).view(e, b, -1)
    gate = model.gate(x_BZSS, y_EBY[..., c:].transpose(0, 1)) if model.gate.needs_expert_hidden else model.gate(x_BZSS)
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
    for x_BZSS, y_B in batches:
        probs_EBC, gate_BE = expert_probs_and_gate(model, x_BZSS)
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
            mixtures["early gate"] = torch.einsum("be,ebc->bc", expert_probs_and_gate(early, x_BZSS)[1], probs_EBC)
        for name in routings:
            err, nll = _scores(mixtures[name], y_B, model.log_eps)
            totals[name][0] += err
            totals[name][1] += nll
        n += b
    return [{"routing": name, "test_error": totals[name][0] / n, "test_loss": totals[name][1] / n}
            for name in routings]


class CounterfactualRouter(torch.nn.Module):
    """Wraps a token router and replaces its choices (one MoE layer of a ViT-MoE or GPT-MoE):
    random expert: the same weights, on uniformly random distinct experts; load-matched random: each token takes
    another token's choices and weights (a permutation: every expert keeps its count); uniform mixture: every
    expert with weight 1/E; early gate: another router (an earlier checkpoint's) decides."""

    def __init__(self, router: torch.nn.Module, mode: str, generator: torch.Generator,
                 early: torch.nn.Module | None = None):
        super().__init__()
        self.inner, self.mode, self.generator, self.early = router, mode, generator, early
        self.token_choice, self.num_experts = router.token_choice, router.num_experts
        self.needs_expert_hidden = router.needs_expert_hidden

    def forward(self, x_ND: torch.Tensor, expert_keys=None):
        import dataclasses

        if self.mode == "early gate":
            return self.early(x_ND, expert_keys)
        gate = self.inner(x_ND, expert_keys)
        n, k = gate.experts_NK.shape
        e = self.num_experts
        if self.mode == "random expert":
            picks_NK = torch.rand(n, e, generator=self.generator).argsort(-1)[:, :k].to(gate.experts_NK.device)
            return dataclasses.replace(gate, experts_NK=picks_NK)
        if self.mode == "load-matched random":
            perm = torch.randperm(n, generator=self.generator).to(gate.experts_NK.device)
            return dataclasses.replace(gate, experts_NK=gate.experts_NK[perm], weights_NK=gate.weights_NK[perm])
        if self.mode == "uniform mixture":
            all_NE = torch.arange(e, device=x_ND.device).expand(n, e)
            return dataclasses.replace(gate, experts_NK=all_NE, weights_NK=torch.full((n, e), 1.0 / e,
                                                                                      device=x_ND.device))
        raise ValueError(f"unknown counterfactual routing {self.mode!r}")


@torch.no_grad()
def token_counterfactual_table(model: torch.nn.Module, batches: list, seed: int = 0,
                               early: torch.nn.Module | None = None) -> list[dict]:
    """Per MoE layer of a token-level model (ViT-MoE, GPT-MoE), the test error and loss with that layer's routing
    replaced (the other layers as learned), after a row for the learned routing. `batches` is a list of (inputs,
    targets) (walked once per row); a language model's error is its next-token error and its loss the NLL per
    token."""
    from raymoe.moe.token.layer import TokenMoE

    model.eval()
    layers = [m for m in model.modules() if isinstance(m, TokenMoE)]
    early_layers = [m for m in early.modules() if isinstance(m, TokenMoE)] if early is not None else []
    generator = torch.Generator().manual_seed(seed)

    def score(layer: str, routing: str) -> dict:
        errors = nll = n = 0.0
        for x, y in batches:
            log_probs = model(x).log_probs_BC
            y = y.reshape(-1)  # a language model's targets are (B, T); its log-probs (B * T, V)
            errors += float((log_probs.argmax(-1) != y).sum())
            nll += float(F.nll_loss(log_probs, y, reduction="sum"))
            n += y.shape[0]
        return {"layer": layer, "routing": routing, "test_error": errors / n, "test_loss": nll / n}

    rows = [score("all", "learned")]
    modes = ["uniform mixture", "random expert", "load-matched random"] + (["early gate"] if early_layers else [])
    for i, layer in enumerate(layers):
        original = layer.router
        for mode in modes:
            layer.router = CounterfactualRouter(original, mode, generator,
                                                early_layers[i].router if early_layers else None)
            try:
                rows.append(score(str(i), mode))
            finally:
                layer.router = original
    return rows
