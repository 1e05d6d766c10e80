"""HyperMoE: per-set generation equals the reference per-token computation; the adapter depends only on the
unselected set; it starts near zero; dropped tokens still get it; one hypernetwork is shared across layers.

Shape legend: N tokens, D model dim, E experts, K experts per token.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raymoe.config.load import load_experiment
from raymoe.models.vit import build_vit
from raymoe.moe.routing import GateResult
from raymoe.moe.token.hypermoe import HyperMoE, HyperNetwork
from raymoe.moe.token.layer import TokenMoE
from raymoe.moe.routers import LinearRouter, Router

D, FF, E = 16, 32, 6


def _hyper(adapter_dim: int = 8, num_layers: int = 3, big_heads: bool = True) -> HyperMoE:
    hypernet = HyperNetwork(num_layers, D, input_dim=12, bottleneck=10, layer_embed_dim=3, adapter_dim=adapter_dim)
    if big_heads:  # the hyperfan-in init is ~0; make the generated adapter non-trivial for comparisons
        with torch.no_grad():
            for p in hypernet.parameters():
                p.normal_(0, 0.3)
    return HyperMoE(E, hypernet, expert_embed_dim=7, process_dim=9)


def _params(hm: HyperMoE) -> list[torch.Tensor]:
    return list(hm.parameters()) + list(hm.hypernet.parameters())


def _naive_per_token(hm: HyperMoE, x_ND: torch.Tensor, experts_NK: torch.Tensor, layer: int) -> torch.Tensor:
    """The released code's computation, one token at a time: gather + SUM of the unselected embeddings."""
    outs = []
    for n in range(x_ND.shape[0]):
        chosen = set(experts_NK[n].tolist())
        unselected = [j for j in range(hm.num_experts) if j not in chosen]
        s = hm.expert_embed.weight[unselected].sum(0, keepdim=True)
        w = hm.hypernet(hm.embedding_process(s), layer)
        h = F.relu(x_ND[n:n + 1] @ w.w_down_UDA[0] + w.b_down_UA[0])
        outs.append(h @ w.w_up_UAD[0] + w.b_up_UD[0])
    return torch.cat(outs)


@pytest.mark.parametrize("top_k, adapter_dim", [(1, 8), (2, 8), (2, 5)])  # 5: misaligned -> loop path
def test_per_set_generation_equals_per_token_generation(top_k, adapter_dim):
    torch.manual_seed(0)
    hm = _hyper(adapter_dim)
    x = torch.randn(30, D)
    experts_NK = torch.stack([torch.randperm(E)[:top_k] for _ in range(30)])
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = hm(x1, experts_NK, layer_index=2)
    y_ref = _naive_per_token(hm, x2, experts_NK, layer=2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert y.abs().mean() > 0.1  # a non-trivial adapter, so the comparison means something
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x1, *_params(hm)], g, allow_unused=True)
    grads_ref = torch.autograd.grad(y_ref, [x2, *_params(hm)], g, allow_unused=True)
    for a, b in zip(grads, grads_ref):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    sets_needed = len({tuple(sorted(r)) for r in experts_NK.tolist()})
    assert hm.unselected_sets(experts_NK)[0].shape[0] == sets_needed <= math.comb(E, top_k)


@pytest.mark.parametrize("local_rows", [True, False])
def test_top1_layer_with_hyperexpert_equals_the_per_token_reference(local_rows):
    """w * Expert_e(x) + HyperExpert(x), token by token, gradients included. local_rows: the HyperExpert runs on the
    experts' dispatched rows and returns through their combine (top-1, dropless, one worker); else on its own
    gather. Expert 0 is never chosen, so its set has no tokens."""
    torch.manual_seed(6)
    hm = _hyper()
    router = LinearRouter(D, E, top_k=1, bias=True)
    with torch.no_grad():
        router.proj.bias[0] = -100.0
    layer = TokenMoE(D, FF, E, router, hypermoe=hm, layer_index=2)
    layer.dispatcher.local_rows = local_rows
    x = torch.randn(40, D)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, gate, _ = layer(x1)
    assert layer._hypermoe_in_dispatched_rows(gate.experts_NK) == local_rows
    assert 0 not in gate.experts_NK.tolist() and len(set(gate.experts_NK.flatten().tolist())) == E - 1
    ref_gate, ex = layer.router(x2), layer.experts
    rows = []
    for n in range(x2.shape[0]):
        e = int(ref_gate.experts_NK[n, 0])
        h = F.gelu(x2[n:n + 1] @ ex.w1_EDF[e] + ex.b1_EF[e])
        rows.append(ref_gate.weights_NK[n:n + 1] * (h @ ex.w2_EFD[e] + ex.b2_ED[e]))
    y_ref = torch.cat(rows) + _naive_per_token(hm, x2, ref_gate.experts_NK, layer=2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    params = [*router.parameters(), *ex.parameters(), *_params(hm)]
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x1, *params], g, allow_unused=True)
    grads_ref = torch.autograd.grad(y_ref, [x2, *params], g, allow_unused=True)
    for a, b in zip(grads, grads_ref):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert grads[1].abs().sum() > 0  # the router's weight gets the gradient of the combine weights


def test_adapter_depends_only_on_the_unselected_set():
    torch.manual_seed(1)
    hm = _hyper()
    experts_NK = torch.tensor([[1, 3], [3, 1], [1, 4], [0, 5]])
    unselected_UE, set_N, order_R, counts = hm.unselected_sets(experts_NK)
    assert set_N[0] == set_N[1] and len(set(set_N.tolist())) == 3  # order within the selection is irrelevant
    assert unselected_UE[set_N[0]].tolist() == [1, 0, 1, 0, 1, 1]
    assert torch.equal(set_N[order_R], torch.tensor([0, 0, 1, 2])) and counts == [2, 1, 1]  # grouped by set
    x = torch.randn(1, D).expand(4, D)  # the same token four times
    y = hm(x, experts_NK, layer_index=0)
    torch.testing.assert_close(y[0], y[1])
    assert not torch.allclose(y[0], y[2])
    assert not torch.allclose(hm(x, experts_NK, layer_index=0), hm(x, experts_NK, layer_index=1))  # layer embed


def test_router_probabilities_do_not_enter_the_hyperexpert():
    torch.manual_seed(2)
    hm = _hyper()
    router = LinearRouter(D, E, top_k=2)
    x = torch.randn(25, D)
    gate = router(x, None)
    y = hm(x, gate.experts_NK, layer_index=1)
    with torch.no_grad():
        router.proj.weight.mul_(1.7)  # sharper probabilities, same ranking -> same selection
    gate2 = router(x, None)
    assert torch.equal(gate.experts_NK, gate2.experts_NK) and not torch.allclose(gate.probs_NE, gate2.probs_NE)
    torch.testing.assert_close(hm(x, gate2.experts_NK, layer_index=1), y)
    y.sum().backward()
    assert router.proj.weight.grad is None  # the router gets no gradient through the HyperExpert


def test_hyperexpert_starts_near_zero():
    torch.manual_seed(3)
    hypernet = HyperNetwork(2, D, adapter_dim=8)  # hyperfan-in init, code defaults elsewhere
    layer = TokenMoE(D, FF, E, LinearRouter(D, E, top_k=1), hypermoe=HyperMoE(E, hypernet), layer_index=1)
    x = torch.randn(64, D)
    y, gate, _ = layer(x)
    y_hyper = layer.hypermoe(x, gate.experts_NK, 1)
    assert y_hyper.abs().mean() < 0.02 * (y - y_hyper).abs().mean()  # reference init: ~0.6% of the MoE output
    assert y_hyper.abs().max() > 0


class _DropRouter(Router):
    def __init__(self):
        super().__init__(E, top_k=1)

    def forward(self, x_ND, expert_keys=None):
        n = x_ND.shape[0]
        ids = torch.zeros(n, 1, dtype=torch.long)  # everyone picks expert 0
        probs = torch.full((n, E), 1.0 / E)
        return GateResult(probs_NE=probs, weights_NK=torch.ones(n, 1), experts_NK=ids, logits_NE=probs.log())


def test_dropped_tokens_still_receive_the_hyperexpert():
    torch.manual_seed(4)
    hm = _hyper()
    layer = TokenMoE(D, FF, E, _DropRouter(), capacity_factor=1.0, hypermoe=hm, layer_index=0)
    x = torch.randn(12, D)
    y, gate, stats = layer(x)
    # capacity ceil(12 / 6) = 2: tokens 2.. are dropped by the router's capacity, yet get the adapter of the
    # pre-capacity selection {0}
    assert (gate.experts_NK[:, 0] >= 0).tolist() == [True, True] + [False] * 10
    y_hyper = hm(x, torch.zeros(12, 1, dtype=torch.long), 0)
    torch.testing.assert_close(y[2:], y_hyper[2:])
    assert y_hyper[2:].abs().mean() > 0.1
    assert stats["dropped_frac"].item() == pytest.approx(10 / 12)


def test_one_hypernetwork_is_shared_by_all_moe_layers_of_the_vit():
    cfg = load_experiment(raw={"name": "h", "model": {"arch": "vit_moe", "num_experts": 4, "vit": {
        "dim": 16, "depth": 4, "heads": 2, "mlp_dim": 16, "moe_every": 2, "patch_size": 7}},
        "gate": {"kind": "topk", "top_k": 2, "hypermoe": {"enabled": True, "adapter_dim": 4, "expert_embed_dim": 8,
                                                          "process_dim": 8, "hypernet_input": 8,
                                                          "hypernet_bottleneck": 8}}})
    model = build_vit(cfg, num_classes=10, in_channels=1, image_size=28)
    moe_layers = [b.ffn for b in model.blocks if isinstance(b.ffn, TokenMoE)]
    assert [m.layer_index for m in moe_layers] == [1, 3]
    assert all(m.hypermoe.hypernet is model.hypernet for m in moe_layers)
    names = [n for n, _ in model.named_parameters() if "head" in n and "hypernet" in n]
    assert names and all(n.startswith("hypernet.") for n in names)  # listed once, under the model
    assert len(model.state_dict()) == len(dict(model.named_parameters())) + len(dict(model.named_buffers()))
    out = model(torch.randn(2, 1, 28, 28))
    out.log_probs_BC.sum().backward()
    rows = model.hypernet.layer_embed.weight.grad.abs().sum(1)
    assert rows[1] > 0 and rows[3] > 0 and rows[0] == 0 and rows[2] == 0  # both layers train the one generator
    assert isinstance(model.hypernet, nn.Module)


def test_more_than_62_experts_use_the_row_unique_path():
    torch.manual_seed(5)
    hypernet = HyperNetwork(1, D, input_dim=12, bottleneck=10, layer_embed_dim=3, adapter_dim=8)
    with torch.no_grad():
        for p in hypernet.parameters():
            p.normal_(0, 0.3)
    hm = HyperMoE(70, hypernet, expert_embed_dim=7, process_dim=9)
    x = torch.randn(20, D)
    experts_NK = torch.stack([torch.randperm(70)[:2] for _ in range(10)]).repeat(2, 1)  # every set twice
    sets = hm.unselected_sets(experts_NK)
    assert sets.unselected_UE.shape == (10, 70) and sets.counts == [2] * 10
    torch.testing.assert_close(hm(x, experts_NK, 0), _naive_per_token(hm, x, experts_NK, 0), rtol=1e-5, atol=1e-5)


def test_zero_tokens_give_an_empty_hyperexpert_output():
    """An empty call (no tokens) takes no grouped GEMM: empty output, and backward runs."""
    hm = _hyper()
    x = torch.randn(0, D, requires_grad=True)
    y = hm(x, torch.zeros(0, 1, dtype=torch.long), layer_index=0)
    assert y.shape == (0, D)
    y.sum().backward()
    assert x.grad.shape == (0, D)
