"""Token-level MoE layer: equivalence with dense references, capacity order, routers, bias balancing.

Shape legend: N tokens, D model dim, F expert hidden, E experts, K experts per token.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raymoe.moe.routing import GateResult, smooth_load
from raymoe.moe.token.capacity import token_capacity, within_capacity
from raymoe.moe.token.experts import TokenExperts
from raymoe.moe.token.grouped import grouped_linear, grouped_mm_applies
from raymoe.moe.token.layer import TokenMoE
from raymoe.moe.routers import AttentiveRouter, ExpertChoiceRouter, LinearRouter, NoisyRouter, Router
from raymoe.moe.token.shared import FeedForward
from raymoe.parallel.context import DistContext

D, FF = 16, 32


class FixedRouter(Router):
    """Stub router returning a given choice of experts (weights 1 / K) whatever the input."""

    def __init__(self, num_experts: int, experts_NK: torch.Tensor):
        super().__init__(num_experts, top_k=experts_NK.shape[1])
        self.experts_NK = experts_NK

    def forward(self, x_ND, expert_keys=None):
        n, k = self.experts_NK.shape
        probs = torch.full((n, self.num_experts), 1.0 / self.num_experts)
        return GateResult(probs_NE=probs, weights_NK=torch.full((n, k), 1.0 / k), experts_NK=self.experts_NK,
                          logits_NE=probs.log())


def _expert_ffn(experts: TokenExperts, e: int, x_ND: torch.Tensor) -> torch.Tensor:
    """Expert e as a plain dense FFN (the independent reference)."""
    return F.linear(F.gelu(F.linear(x_ND, experts.w1_EDF[e].t(), experts.b1_EF[e])), experts.w2_EFD[e].t(),
                    experts.b2_ED[e])


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_one_expert_equals_dense_ffn_forward_and_backward(impl):
    torch.manual_seed(0)
    if impl == "grouped_mm" and not grouped_mm_applies(torch.zeros(4, D), torch.zeros(1, D, FF)):
        pytest.skip("torch._grouped_mm not usable here")
    layer = TokenMoE(D, FF, 1, LinearRouter(D, 1, top_k=1), capacity_factor=None, impl=impl)
    dense = FeedForward(D, FF)
    with torch.no_grad():
        dense.fc1.weight.copy_(layer.experts.w1_EDF[0].t())
        dense.fc1.bias.copy_(layer.experts.b1_EF[0])
        dense.fc2.weight.copy_(layer.experts.w2_EFD[0].t())
        dense.fc2.bias.copy_(layer.experts.b2_ED[0])
    x = torch.randn(3, 7, D)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_moe, gate, stats = layer(x1)
    y_dense = dense(x2)
    torch.testing.assert_close(y_moe, y_dense)
    g = torch.randn_like(y_dense)
    y_moe.backward(g)
    y_dense.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(layer.experts.w1_EDF.grad[0], dense.fc1.weight.grad.t())
    torch.testing.assert_close(layer.experts.b1_EF.grad[0], dense.fc1.bias.grad)
    torch.testing.assert_close(layer.experts.w2_EFD.grad[0], dense.fc2.weight.grad.t())
    torch.testing.assert_close(layer.experts.b2_ED.grad[0], dense.fc2.bias.grad)
    assert gate.experts_NK.shape == (21, 1) and stats["load_E"].tolist() == [21.0]


def _dense_masked_reference(layer: TokenMoE, x_ND: torch.Tensor, top_k: int, renormalize: bool) -> torch.Tensor:
    """All experts on all tokens, masked by an independently computed top-k selection and weighted."""
    probs_NE = torch.softmax(x_ND @ layer.router.proj.weight.t(), dim=-1)
    top_NK = probs_NE.topk(top_k, dim=-1).indices
    mask_NE = torch.zeros_like(probs_NE).scatter(1, top_NK, 1.0)
    w_NE = probs_NE * mask_NE
    if renormalize:
        w_NE = w_NE / w_NE.sum(-1, keepdim=True)
    return sum(w_NE[:, e:e + 1] * _expert_ffn(layer.experts, e, x_ND) for e in range(layer.num_experts))


@pytest.mark.parametrize("top_k, renormalize, impl", [(1, False, "auto"), (2, True, "loop"), (2, True, "grouped_mm"),
                                                      (3, False, "auto")])
def test_topk_layer_equals_dense_masked_reference(top_k, renormalize, impl):
    torch.manual_seed(1)
    e = 4
    if impl == "grouped_mm" and not grouped_mm_applies(torch.zeros(4, D), torch.zeros(e, D, FF)):
        pytest.skip("torch._grouped_mm not usable here")
    layer = TokenMoE(D, FF, e, LinearRouter(D, e, top_k=top_k, renormalize=renormalize), impl=impl)
    x = torch.randn(40, D)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, gate, _ = layer(x1)
    params = [layer.router.proj.weight, layer.experts.w1_EDF, layer.experts.b2_ED]
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x1, *params], g)
    y_ref = _dense_masked_reference(layer, x2, top_k, renormalize)
    grads_ref = torch.autograd.grad(y_ref, [x2, *params], g)
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)
    assert gate.experts_NK.shape == (40, top_k)


def test_capacity_drop_order_hand_worked():
    # (token, choice) pairs are ranked per expert by (choice, position); capacity 2 per expert.
    experts_NK = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1], [2, 0]])
    # expert 0: t0/j0, t1/j0 kept; t3/j0, t2/j1, t4/j1 dropped. expert 1: t2/j0, t0/j1 kept; t3/j1 dropped.
    # expert 2: t4/j0, t1/j1 kept.
    expected = torch.tensor([[True, True], [True, True], [True, False], [False, False], [True, False]])
    assert torch.equal(within_capacity(experts_NK, 2, 3), expected)
    assert torch.equal(within_capacity(experts_NK, 10, 3), torch.ones(5, 2, dtype=torch.bool))
    assert token_capacity(1.25, 5, 2, 3) == math.ceil(1.25 * 5 * 2 / 3) == 5
    assert token_capacity(0.6, 5, 2, 3) == 2


def test_layer_drops_over_capacity_pairs_and_they_contribute_zero():
    torch.manual_seed(2)
    experts_NK = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1], [2, 0]])
    # cf such that ceil(cf * 5 * 2 / 3) == 2
    layer = TokenMoE(D, FF, 3, FixedRouter(3, experts_NK), capacity_factor=0.6)
    x = torch.randn(5, D)
    y, gate, stats = layer(x)
    expected_ids = torch.tensor([[0, 1], [0, 2], [1, -1], [-1, -1], [2, -1]])
    assert torch.equal(gate.experts_NK, expected_ids)
    assert torch.equal(gate.weights_NK == 0, expected_ids < 0)
    ref = torch.zeros_like(x)
    for n in range(5):
        for e in expected_ids[n].tolist():
            if e >= 0:
                ref[n] += 0.5 * _expert_ffn(layer.experts, e, x[n:n + 1])[0]
    torch.testing.assert_close(y, ref)
    assert torch.equal(y[3], torch.zeros(D))  # fully dropped token: only the block's residual carries it
    assert stats["dropped_frac"].item() == pytest.approx(4 / 10)
    assert stats["load_E"].tolist() == [2.0, 2.0, 2.0]


@pytest.mark.parametrize("cf", [None, 2.0])
def test_expert_choice_every_expert_takes_exactly_its_capacity(cf):
    torch.manual_seed(3)
    e, n = 8, 60
    router = ExpertChoiceRouter(D, e, capacity_factor=cf)
    layer = TokenMoE(D, FF, e, router)
    x = torch.randn(n, D, requires_grad=True)
    y, gate, stats = layer(x)
    c = math.ceil((cf or 1.0) * n / e)
    assert gate.experts_NK.shape == (n, e)
    assert stats["load_E"].tolist() == [float(c)] * e
    probs = torch.softmax(x @ router.proj.weight.t(), dim=-1)
    for j in range(e):  # expert j took exactly its top-c tokens by score
        taken = (gate.experts_NK[:, j] == j).nonzero().squeeze(1)
        assert set(taken.tolist()) == set(probs[:, j].topk(c).indices.tolist())
        assert torch.all(gate.experts_NK[:, j][gate.experts_NK[:, j] != j] == -1)
    chosen = gate.experts_NK >= 0
    torch.testing.assert_close(gate.weights_NK[chosen], probs[chosen])
    ref = sum((gate.weights_NK[:, j:j + 1] * _expert_ffn(layer.experts, j, x)) for j in range(e))
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    assert router.proj.weight.grad is not None and router.proj.weight.grad.abs().sum() > 0


def _skewed_router(e: int, rate: float) -> LinearRouter:
    router = LinearRouter(D, e, top_k=1, bias_balance_rate=rate)
    with torch.no_grad():
        router.proj.weight.mul_(0.1)
        router.proj.weight[0, 0] = 1.5  # feature 0 is constant 1 below: expert 0 wins most tokens
    return router


def _skewed_tokens(n: int) -> torch.Tensor:
    x = torch.randn(n, D)
    x[:, 0] = 1.0
    return x


def test_bias_balancing_moves_toward_balance_and_never_touches_weights():
    torch.manual_seed(4)
    e = 4
    router = _skewed_router(e, rate=0.005)
    layer = TokenMoE(D, FF, e, router).train()
    ctx = DistContext()
    assert [m for m in layer.modules() if hasattr(m, "post_step")] == [router.balancer]
    spreads = []
    for step in range(80):
        x = _skewed_tokens(256)
        y, gate, stats = layer(x)
        probs = torch.softmax(x @ router.proj.weight.t(), dim=-1)
        # weights are the UNBIASED softmax scores of the selected experts
        torch.testing.assert_close(gate.weights_NK, probs.gather(1, gate.experts_NK))
        torch.testing.assert_close(gate.probs_NE, probs)
        assert torch.equal(router.balancer.counts_E, stats["load_E"].long())  # counted this training step
        spreads.append((stats["load_E"].max() - stats["load_E"].min()).item())
        y.sum().backward()
        router.balancer.post_step(ctx)
        assert router.balancer.counts_E.sum() == 0  # zeroed after the update
    assert router.balancer.bias_E[0] < router.balancer.bias_E[1:].min() and not router.balancer.bias_E.requires_grad
    assert all("bias_E" not in name for name, _ in layer.named_parameters())  # a buffer: no gradient, ever
    assert "router.balancer.bias_E" in layer.state_dict()  # persistent: checkpoints keep the bias
    assert spreads[0] == 256  # all tokens on expert 0 at the start
    assert sum(spreads[-10:]) / 10 < 0.4 * spreads[0]


def test_bias_balancing_selection_uses_bias_and_eval_does_not_count():
    torch.manual_seed(5)
    router = _skewed_router(4, rate=0.1)
    layer = TokenMoE(D, FF, 4, router)
    x = _skewed_tokens(64)
    with torch.no_grad():
        router.balancer.bias_E.copy_(torch.tensor([-10.0, 10.0, 0.0, 0.0]))  # force expert 1
    layer.eval()
    _, gate, _ = layer(x)
    assert torch.all(gate.experts_NK == 1)
    probs = torch.softmax(x @ router.proj.weight.t(), dim=-1)
    torch.testing.assert_close(gate.weights_NK[:, 0], probs[:, 1])  # weight of the chosen expert, unbiased
    assert router.balancer.counts_E.sum() == 0  # eval forwards never accumulate
    layer.train()
    layer(x)
    assert router.balancer.counts_E.tolist() == [0, 64, 0, 0]


def test_noisy_topk_smooth_load_matches_resampling_one_experts_noise():
    torch.manual_seed(6)
    e, k = 5, 2
    router = NoisyRouter(D, e, top_k=k)
    with torch.no_grad():
        router.w_gate_IE.normal_(0, 0.3)
        router.w_noise_IE.normal_(0, 0.3)
    x = torch.randn(3, D)
    clean = x @ router.w_gate_IE
    std = F.softplus(x @ router.w_noise_IE) + router.noise_eps
    noisy = clean + torch.randn_like(clean) * std
    load = smooth_load(clean, noisy, std, k)  # the one smooth load of both levels (raymoe/moe/routing.py)
    # Shazeer eq. 9: P(e in top-k | the other experts' noisy values), estimated by redrawing e's noise only
    draws = 20000
    est = torch.zeros(e)
    for j in range(e):
        h = noisy.unsqueeze(0).repeat(draws, 1, 1)
        h[:, :, j] = clean[:, j] + torch.randn(draws, 3) * std[:, j]
        est[j] = (h.topk(k, dim=-1).indices == j).any(-1).float().mean(0).sum()
    torch.testing.assert_close(load, est, atol=0.03, rtol=0)
    router.train()
    gate = router(x, None)
    assert gate.load_E.requires_grad and gate.experts_NK.shape == (3, k)
    torch.testing.assert_close(gate.weights_NK.sum(-1), torch.ones(3))  # renormalised for k > 1


def test_attentive_router_keys_come_from_the_experts_hidden_layer():
    torch.manual_seed(7)
    e = 4
    router = AttentiveRouter(D, FF, e, top_k=2)
    experts = TokenExperts(e, D, FF)
    x = torch.randn(9, D)
    gate = router(x, lambda w_k: experts.hidden_keys(x, w_k))
    q = x @ router.w_q.weight.t()
    scores = torch.stack([(q * ((x @ experts.w1_EDF[j] + experts.b1_EF[j]) @ router.w_k.weight.t())).sum(-1)
                          for j in range(e)], dim=1) / math.sqrt(D)
    torch.testing.assert_close(gate.logits_NE, scores)
    torch.testing.assert_close(gate.probs_NE, torch.softmax(scores, -1))
    gate.weights_NK.sum().backward()
    assert experts.w1_EDF.grad.abs().sum() > 0  # the gate trains the experts' hidden layers through the keys
    with pytest.raises(RuntimeError, match="expert parallelism"):
        router(x, lambda w_k: experts.shard(0, 2).hidden_keys(x, w_k))


def test_switch_jitter_only_in_training():
    torch.manual_seed(8)
    router = LinearRouter(D, 4, top_k=1, jitter=0.5)
    x = torch.randn(20, D)
    router.eval()
    torch.testing.assert_close(router(x, None).logits_NE, x @ router.proj.weight.t())
    router.train()
    assert not torch.allclose(router(x, None).logits_NE, x @ router.proj.weight.t())


def test_shared_expert_is_added_to_every_token():
    torch.manual_seed(9)
    experts_NK = torch.tensor([[0], [1], [0], [1]])
    layer = TokenMoE(D, FF, 2, FixedRouter(2, experts_NK), capacity_factor=0.5, num_shared_experts=2)
    assert layer.shared.fc1.out_features == 2 * FF
    x = torch.randn(4, D)
    y, gate, _ = layer(x)
    routed = torch.stack([_expert_ffn(layer.experts, int(ei), x[n:n + 1])[0] if ei >= 0 else torch.zeros(D)
                          for n, ei in enumerate(gate.experts_NK[:, 0])])
    torch.testing.assert_close(y, routed + layer.shared(x))
    assert gate.experts_NK[:, 0].tolist() == [0, 1, -1, -1]  # capacity ceil(0.5*4/2) = 1 per expert


def test_grouped_mm_and_loop_give_identical_results():
    torch.manual_seed(10)
    counts = [5, 0, 17, 2]
    x = torch.randn(sum(counts), 16, requires_grad=True)
    w = torch.randn(4, 16, 8, requires_grad=True)
    b = torch.randn(4, 8, requires_grad=True)
    if not grouped_mm_applies(x, w):
        pytest.skip("torch._grouped_mm not usable here")
    g = torch.randn(sum(counts), 8)
    outs = {}
    for impl in ("grouped_mm", "loop"):
        y = grouped_linear(x, w, b, counts, impl)
        outs[impl] = (y, *torch.autograd.grad(y, [x, w, b], g))
    for a, c in zip(outs["grouped_mm"], outs["loop"]):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    start = 0
    for i, c in enumerate(counts):  # against an explicit per-group product
        torch.testing.assert_close(outs["loop"][0][start:start + c], x[start:start + c] @ w[i] + b[i])
        start += c
    y = grouped_linear(x, w, b, counts, "grouped_mm")
    y.sum().backward()  # an expanded (stride-0) gradient must not break the grouped kernel's backward


def test_misaligned_shapes_fall_back_to_the_loop():
    x, w = torch.randn(6, 7), torch.randn(3, 7, 5)  # 7 * 4 bytes is not a multiple of 16
    assert not grouped_mm_applies(x, w)
    y = grouped_linear(x, w, None, [2, 0, 4])  # auto -> loop
    torch.testing.assert_close(y, torch.cat([x[:2] @ w[0], x[2:] @ w[2]]))


def test_layer_runs_with_no_tokens_for_some_experts_and_bf16():
    torch.manual_seed(11)
    layer = TokenMoE(D, FF, 4, FixedRouter(4, torch.tensor([[2]] * 6)))
    x = torch.randn(6, D)
    y, _, stats = layer(x)
    assert stats["load_E"].tolist() == [0.0, 0.0, 6.0, 0.0]
    y.backward(torch.ones_like(y))
    for p in (layer.experts.w1_EDF, layer.experts.b1_EF, layer.experts.w2_EFD, layer.experts.b2_ED):
        assert p.grad[[0, 1, 3]].abs().sum() == 0 and p.grad[2].abs().sum() > 0  # experts without tokens: zero
    w1 = layer.experts.w1_EDF.detach().clone().requires_grad_()
    ref = torch.autograd.grad(F.linear(F.gelu(x @ w1[2] + layer.experts.b1_EF[2]), layer.experts.w2_EFD[2].t(),
                                       layer.experts.b2_ED[2]).sum(), w1)[0]
    torch.testing.assert_close(layer.experts.w1_EDF.grad, ref)
    y_bf16, _, _ = layer.to(torch.bfloat16)(torch.randn(6, D, dtype=torch.bfloat16))
    assert y_bf16.dtype == torch.bfloat16 and torch.isfinite(y_bf16.float()).all()


def test_layer_rejects_bad_combinations():
    with pytest.raises(ValueError):
        TokenMoE(D, FF, 4, ExpertChoiceRouter(D, 4), capacity_factor=1.0)
    with pytest.raises(ValueError):
        TokenMoE(D, FF, 4, LinearRouter(D, 4), capacity_factor=0.0)
    with pytest.raises(ValueError):
        LinearRouter(D, 4, top_k=5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_layer_auto_path_equals_the_loop(dtype):
    torch.manual_seed(12)
    dev = torch.device("cuda")
    auto = TokenMoE(64, 128, 8, LinearRouter(64, 8, top_k=2), capacity_factor=1.25).to(dev, dtype)
    loop = TokenMoE(64, 128, 8, auto.router, capacity_factor=1.25, impl="loop").to(dev, dtype)
    loop.experts.load_state_dict(auto.experts.state_dict())
    x = torch.randn(300, 64, device=dev, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = auto(x1)[0], loop(x2)[0]
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y1, y2, **tol)
    torch.testing.assert_close(x1.grad, x2.grad, **tol)
    torch.testing.assert_close(auto.experts.w1_EDF.grad, loop.experts.w1_EDF.grad, **tol)
