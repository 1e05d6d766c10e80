"""Token MoE under expert parallelism (2 real Ray Train workers, gloo, EP = 2) equals one process.

Each rank routes its own tokens (different batches, different sizes); the single-process reference runs the same
unsharded layer on each rank's batch and sums the losses. Outputs, routing, input gradients, replicated-parameter
gradients (summed over ranks) and each rank's expert-shard gradients must match, and the aux-loss-free bias after
post_step(ctx) must equal the reference update from the summed token counts.

Shape legend: N tokens on a rank, D model dim, E experts.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ep_harness import ATOL, run_on_workers
from raymoe.moe.token.hypermoe import HyperMoE, HyperNetwork
from raymoe.moe.token.layer import TokenMoE
from raymoe.moe.routers import ExpertChoiceRouter, LinearRouter
from raymoe.parallel.context import DistContext

D, FF, E = 8, 16, 4
TOKENS_PER_RANK = (10, 7)
# switch_dropless_hyper: one process runs the HyperExpert on the experts' dispatched rows, the EP ranks gather by
# set themselves (TokenMoE._hypermoe_in_dispatched_rows); both must give the same numbers
CASES = ("gshard_capacity_hyper_bias_shared", "switch_capacity", "expert_choice", "switch_dropless_hyper")


class _Model(nn.Module):
    """Owns the shared HyperNetwork (as the ViT does) and one MoE layer."""

    def __init__(self, case: str):
        super().__init__()
        self.hypernet = None
        if case == "gshard_capacity_hyper_bias_shared":
            self.hypernet = HyperNetwork(2, D, input_dim=6, bottleneck=6, layer_embed_dim=2, adapter_dim=4)
            router = LinearRouter(D, E, top_k=2, bias_balance_rate=0.01)
            self.moe = TokenMoE(D, FF, E, router, capacity_factor=1.0, hypermoe=HyperMoE(E, self.hypernet, 5, 5),
                                num_shared_experts=1, layer_index=1)
        elif case == "switch_dropless_hyper":
            self.hypernet = HyperNetwork(1, D, input_dim=6, bottleneck=6, layer_embed_dim=2, adapter_dim=4)
            self.moe = TokenMoE(D, FF, E, LinearRouter(D, E, top_k=1), hypermoe=HyperMoE(E, self.hypernet, 5, 5))
        elif case == "switch_capacity":
            self.moe = TokenMoE(D, FF, E, LinearRouter(D, E, top_k=1), capacity_factor=1.25)
        else:
            self.moe = TokenMoE(D, FF, E, ExpertChoiceRouter(D, E, capacity_factor=1.0))


def _run_case(model: _Model, x_ND: torch.Tensor, g_ND: torch.Tensor) -> dict:
    x_ND = x_ND.clone().requires_grad_()
    y_ND, gate, stats = model.moe(x_ND)
    (y_ND * g_ND).sum().backward()
    return {"y": y_ND.detach(), "experts": gate.experts_NK, "grad_x": x_ND.grad, "load": stats["load_E"]}


def _on_workers(ctx: DistContext, config: dict) -> dict:
    from raymoe.parallel.expert_parallel import apply_expert_parallel, sync_gradients

    out = {}
    for case in CASES:
        model = _Model(case)
        model.load_state_dict(config["state"][case])
        model = apply_expert_parallel(model, ctx)
        res = _run_case(model, config["x"][case][ctx.rank], config["g"][case][ctx.rank])
        sync_gradients(model, ctx)
        for module in model.modules():
            if callable(getattr(module, "post_step", None)):
                module.post_step(ctx)
        res["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        res["buffers"] = {n: b.clone() for n, b in model.named_buffers()}
        res["local_experts"] = (model.moe.experts.first_expert, model.moe.experts.num_local)
        res["dispatcher"] = type(model.moe.dispatcher).__name__
        out[case] = res
    return out


@pytest.fixture(scope="module")
def ep_runs(tmp_path_factory):
    torch.manual_seed(0)
    config = {"state": {}, "x": {}, "g": {}}
    for case in CASES:
        model = _Model(case)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "hypernet" in name:  # a non-trivial HyperExpert (its own init is ~0)
                    p.normal_(0, 0.3)
        config["state"][case] = model.state_dict()
        config["x"][case] = [torch.randn(n, D) for n in TOKENS_PER_RANK]
        config["g"][case] = [torch.randn(n, D) for n in TOKENS_PER_RANK]
    return config, run_on_workers(_on_workers, tmp_path_factory.mktemp("token_ep"), config=config, ep_size=2)


@pytest.mark.parametrize("case", CASES)
def test_ep2_matches_one_process(ep_runs, case):
    config, results = ep_runs
    reference = _Model(case)
    reference.load_state_dict(config["state"][case])
    per_rank = [_run_case(reference, x, g) for x, g in zip(config["x"][case], config["g"][case])]
    for module in reference.modules():
        if callable(getattr(module, "post_step", None)):
            module.post_step(DistContext())
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    one_token_top1 = torch.zeros(1, 1, dtype=torch.long)
    assert reference.moe._hypermoe_in_dispatched_rows(one_token_top1) == (case == "switch_dropless_hyper")
    for rank in (0, 1):
        got, want = results[rank][case], per_rank[rank]
        assert got["dispatcher"] == "AllToAllDispatcher"
        assert torch.equal(got["experts"], want["experts"])
        torch.testing.assert_close(got["y"], want["y"], atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(got["grad_x"], want["grad_x"], atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(got["load"], want["load"])
        first, num_local = got["local_experts"]
        assert (first, num_local) == (rank * E // 2, E // 2)
        assert set(got["grads"]) == set(grads)
        for name, grad in grads.items():
            expected = grad[first:first + num_local] if name.startswith("moe.experts.") else grad
            torch.testing.assert_close(got["grads"][name], expected, atol=ATOL, rtol=1e-5, msg=name)
        for name, buf in reference.named_buffers():
            torch.testing.assert_close(got["buffers"][name], buf, msg=name)
    if case.startswith("gshard"):
        bias = reference.moe.router.balancer.bias_E
        assert bias.abs().sum() > 0  # the update happened, from counts summed over both ranks
