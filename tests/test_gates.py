"""The one router family at both levels: hand-computed attentive scores, distributions, top-k selection, the one
renormalisation rule, Shazeer's smooth load, and the sample-level gates built as routers over the gate trunk."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from raymoe.config.load import load_experiment
from raymoe.models.build import build_gate
from raymoe.moe.gates import TrunkGate
from raymoe.moe.router_build import build_router
from raymoe.moe.routers import AttentiveRouter, LinearRouter, NoisyRouter
from raymoe.moe.routing import smooth_load


class FlatTrunk(nn.Module):
    """h_g(x) = x itself, so the gate's own math can be checked by hand."""

    def __init__(self, width: int):
        super().__init__()
        self.out_features = width

    def forward(self, x):
        return x


def test_attentive_gate_equals_hand_computation():
    gate = TrunkGate(FlatTrunk(2), AttentiveRouter(2, 2, num_experts=2), relu_features=False)
    with torch.no_grad():
        gate.router.w_q.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        gate.router.w_k.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    h_g = torch.tensor([[1.0, 1.0]])  # q = (1, 2)
    hidden_BEH = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])  # k_0 = (0, 1), k_1 = (3, 0)
    result = gate(h_g, hidden_BEH)
    # a_0 = (1*0 + 2*1)/sqrt(2) = sqrt(2), a_1 = (1*3 + 2*0)/sqrt(2) = 3/sqrt(2)
    a = torch.tensor([[math.sqrt(2), 3 / math.sqrt(2)]])
    torch.testing.assert_close(result.logits_NE, a)
    e0 = 1 / (1 + math.exp(3 / math.sqrt(2) - math.sqrt(2)))
    torch.testing.assert_close(result.probs_NE, torch.tensor([[e0, 1 - e0]]))
    assert torch.equal(result.experts_NK, torch.tensor([[0, 1]]))
    assert result.weights_NK is result.probs_NE and result.load_E is None


def test_softmax_gate_temperature():
    gate = TrunkGate(FlatTrunk(3), LinearRouter(3, 2, None, temperature=2.0, bias=True), relu_features=True)
    with torch.no_grad():
        gate.router.proj.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        gate.router.proj.bias.zero_()
    result = gate(torch.tensor([[2.0, -1.0, 5.0]]))  # ReLU -> (2, 0, 5); logits (2, 0) / T = (1, 0)
    torch.testing.assert_close(result.probs_NE, torch.softmax(torch.tensor([[1.0, 0.0]]), 1))


@pytest.mark.parametrize("kind", ["softmax", "attentive", "topk", "noisy_topk"])
def test_gate_probabilities_are_distributions(kind):
    torch.manual_seed(0)
    cfg = load_experiment(raw={"name": "t", "data": {"name": "mnist"}, "model": {"num_experts": 4},
                               "gate": {"kind": kind, "top_k": 2}})
    gate = build_gate(cfg, 1, 28)
    x = torch.randn(6, 1, 28, 28)
    result = gate(x, torch.randn(6, 4, 32)) if kind == "attentive" else gate(x)
    torch.testing.assert_close(result.probs_NE.sum(1), torch.ones(6))
    assert (result.probs_NE >= 0).all()
    k = 4 if kind in ("softmax", "attentive") else 2
    assert result.experts_NK.shape == result.weights_NK.shape == (6, k)
    torch.testing.assert_close(result.weights_NK.sum(1), torch.ones(6))  # dense, or renormalised top-2
    if k == 2:  # sorted top-k: slot 0 is the argmax expert the metrics use
        assert torch.equal(result.experts_NK[:, 0], result.top1_N)


def test_noisy_topk_weights_are_softmax_of_kept_noisy_logits():
    torch.manual_seed(0)
    gate = TrunkGate(FlatTrunk(5), NoisyRouter(5, num_experts=4, top_k=2, noise_eps=0.5), relu_features=True)
    nn.init.normal_(gate.router.w_gate_IE)
    nn.init.normal_(gate.router.w_noise_IE)
    result = gate(torch.randn(7, 5))
    h = result.logits_NE  # H(x), noisy in training mode
    kept = h.gather(1, result.experts_NK)
    torch.testing.assert_close(result.weights_NK, torch.softmax(kept, 1))  # G = softmax(KeepTopK(H, k))
    assert result.load_E.requires_grad
    gate.eval()  # no noise at test time
    x = torch.randn(3, 5)
    clean = torch.relu(x) @ gate.router.w_gate_IE
    torch.testing.assert_close(gate(x).logits_NE, clean)
    # the one noisy router reports the same smooth load in eval, with the noise it would draw (eq. 8-10)
    std = torch.nn.functional.softplus(torch.relu(x) @ gate.router.w_noise_IE) + 0.5
    torch.testing.assert_close(gate(x).load_E, smooth_load(clean, clean, std, 2))


def router_of(gate: nn.Module) -> nn.Module:
    return gate.router if isinstance(gate, TrunkGate) else gate


def test_noisy_gates_draw_their_noise_from_an_injected_generator():
    torch.manual_seed(0)
    x = torch.randn(6, 5)
    for make, call in ((lambda g: TrunkGate(FlatTrunk(5), NoisyRouter(5, 4, 1, generator=g), True), lambda m: m(x)),
                       (lambda g: NoisyRouter(5, 4, top_k=1, generator=g), lambda m: m(x, None))):
        gate = router_of(make(torch.Generator().manual_seed(3)))
        noise = gate.draw_noise(torch.zeros(6, 4))
        assert torch.equal(noise, torch.randn(6, 4, generator=torch.Generator().manual_seed(3)))
        # two gates with equally seeded generators route a training batch identically, whatever torch's own RNG
        twin = make(torch.Generator().manual_seed(11))
        other = make(torch.Generator().manual_seed(11))
        other.load_state_dict(twin.state_dict())
        torch.manual_seed(1)
        first = call(twin.train())
        torch.manual_seed(2)
        second = call(other.train())
        assert torch.equal(first.logits_NE, second.logits_NE)
        # without a generator the noise is torch's default stream, exactly what randn_like gave before
        plain = router_of(make(None))
        torch.manual_seed(7)
        drawn = plain.draw_noise(torch.zeros(6, 4))
        torch.manual_seed(7)
        assert torch.equal(drawn, torch.randn_like(torch.zeros(6, 4)))


def test_smooth_load_equals_brute_force():
    torch.manual_seed(0)
    n, e, k = 6, 5, 2
    clean = torch.randn(n, e)
    std = torch.rand(n, e) + 0.1
    noisy = clean + torch.randn(n, e) * std
    normal = torch.distributions.Normal(0.0, 1.0)
    expected = torch.zeros(e)
    for i in range(n):
        for j in range(e):
            others = torch.cat([noisy[i, :j], noisy[i, j + 1:]])
            kth_excluding = others.sort(descending=True).values[k - 1]
            expected[j] += normal.cdf((clean[i, j] - kth_excluding) / std[i, j])
    torch.testing.assert_close(smooth_load(clean, noisy, std, k), expected)
    torch.testing.assert_close(smooth_load(clean, noisy, std, e), torch.full((e,), float(n)))


def test_one_renormalisation_rule_for_every_sparse_gate_and_router():
    """renormalize null: renormalised over the kept experts only when k > 1, for the sample-level gates and the
    token routers alike; an explicit value wins (docs/hypermoe-notes.md §1.3(3))."""
    torch.manual_seed(1)
    x = torch.randn(5, 6)
    makers = (lambda k, r: TrunkGate(FlatTrunk(6), NoisyRouter(6, 4, top_k=k, renormalize=r), True),
              lambda k, r: TrunkGate(FlatTrunk(6), LinearRouter(6, 4, k, r, bias=True), True),
              lambda k, r: NoisyRouter(6, 4, top_k=k, renormalize=r),
              lambda k, r: LinearRouter(6, 4, top_k=k, renormalize=r))
    for make in makers:
        for k, renormalize, sums_to_one in ((1, None, False), (2, None, True), (1, True, True), (2, False, False)):
            gate = make(k, renormalize).eval()
            with torch.no_grad():
                for p in gate.parameters():
                    p.normal_()
            result = gate(x)
            total_N = result.weights_NK.sum(-1)
            assert torch.allclose(total_N, torch.ones(5)) == sums_to_one, (make, k, renormalize)
            torch.testing.assert_close(result.weights_NK, result.probs_NE.gather(-1, result.experts_NK) / (
                total_N.new_ones(5) if not sums_to_one else result.probs_NE.gather(-1, result.experts_NK).sum(-1)
            ).unsqueeze(-1))


@pytest.mark.parametrize("kind", ["softmax", "topk", "noisy_topk", "attentive"])
def test_sample_gates_are_the_token_routers_over_trunk_features(kind):
    """One family: the sample-level gate of each kind is build_router's router applied to the gate trunk's output
    (ReLU'd for every gate but the attentive one on MNIST, docs/paper-notes.md §1.2), the same class the token
    level builds for that kind."""
    torch.manual_seed(0)
    cfg = load_experiment(raw={"name": "t", "data": {"name": "mnist"}, "model": {"num_experts": 4},
                               "gate": {"kind": kind, "top_k": 2}})
    gate = build_gate(cfg, 1, 28).eval()
    if kind != "softmax":  # the original gate is sample-level only (token layers need a sparse router)
        assert type(gate.router) is type(build_router(cfg.gate, "token", 16, 32, 4))
    x = torch.randn(6, 1, 28, 28)
    hidden_BEH = torch.randn(6, 4, 32)
    feats = gate.trunk(x)
    feats = feats if kind == "attentive" else torch.relu(feats)
    keys = (lambda w: hidden_BEH @ w) if kind == "attentive" else None
    expected = gate.router(feats, keys)
    got = gate(x, hidden_BEH if kind == "attentive" else None)
    torch.testing.assert_close(got.probs_NE, expected.probs_NE)
    assert torch.equal(got.experts_NK, expected.experts_NK)
    assert gate.dense == (kind in ("softmax", "attentive"))


def test_short_row_softmax_equals_the_float64_softmax_and_its_gradient():
    """The routers' CPU softmax over E < 16 experts (raymoe/moe/short_softmax.py) is torch's softmax: values to
    float32 rounding of the float64 softmax, -inf logits get probability 0, and the gradient equals the one of
    torch.softmax in float64 (gradcheck)."""
    from raymoe.moe.short_softmax import softmax_last

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 8, generator=gen) * 6
    logits[0, 3] = float("-inf")
    probs = softmax_last(logits)
    exact = torch.softmax(logits.double(), dim=-1)
    assert (probs.double() - exact).abs().max() <= 4 * torch.finfo(torch.float32).eps
    assert probs[0, 3] == 0 and torch.allclose(probs.sum(-1), torch.ones(300))
    x64 = (torch.randn(12, 5, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    out = softmax_last(x64)
    assert "ShortSoftmax" in type(out.grad_fn).__name__  # the short path, not torch.softmax
    assert torch.autograd.gradcheck(softmax_last, (x64,))
    grad = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    mine, = torch.autograd.grad(out, x64, grad)
    ref, = torch.autograd.grad(torch.softmax(x64, -1), x64, grad)
    assert torch.allclose(mine, ref, rtol=0, atol=1e-14)
    wide = torch.randn(4, 16, requires_grad=True)
    assert "ShortSoftmax" not in type(softmax_last(wide).grad_fn).__name__  # long rows keep torch's kernel
