"""Regularisers against hand-worked numbers and brute-force loops written from the spec formulas."""

from __future__ import annotations

import math

import pytest
import torch

from raymoe.config.schema import RegularizerConfig, SampleSimilarityConfig
from raymoe.models.output import ModelOutput
from raymoe.moe.routing import dense_result
from raymoe.moe.routing import GateResult
from raymoe.regularizers.combine import regularize
from raymoe.regularizers.importance import importance_loss
from raymoe.regularizers.load import load_loss
from raymoe.regularizers.sample_similarity import pixel_distance_NN, sample_similarity
from raymoe.regularizers.switch_balance import switch_balance_loss
from raymoe.regularizers.z_loss import router_z_loss


def brute_force_ls(g, x, beta_s, beta_d, normalization, channel_sum=False):
    """docs/paper-notes.md §3.1 with python loops: S over same-expert pairs / E, D over different experts / (E^2 - E)."""
    n, e = g.shape
    imgs = (x.sum(1) if channel_sum else x).reshape(n, -1).double()
    d = [[math.sqrt(((imgs[i] - imgs[j]) ** 2).sum().item()) for j in range(n)] for i in range(n)]
    top = max(max(row) for row in d)
    d = [[v / top for v in row] for row in d]
    same = diff = 0.0
    for a in range(e):
        for b in range(e):
            total = sum(g[i, a].item() * g[j, b].item() * d[i][j] for i in range(n) for j in range(n))
            if a == b:
                same += total / e
            else:
                diff += total / (e * e - e)
    if normalization == "reference":
        return beta_s * same - beta_d * diff / n ** 2, same, diff
    return (beta_s * same - beta_d * diff) / n ** 2, same, diff


@pytest.mark.parametrize("normalization", ["reference", "normalized"])
@pytest.mark.parametrize("channel_sum", [False, True])
def test_sample_similarity_equals_brute_force(normalization, channel_sum):
    torch.manual_seed(0)
    g = torch.softmax(torch.randn(7, 3), 1)
    x = torch.randn(7, 2, 4, 4)
    got = sample_similarity(g, x, 0.3, 0.7, normalization, "raw_channel_sum" if channel_sum else "raw")
    value, same, diff = brute_force_ls(g, x, 0.3, 0.7, normalization, channel_sum)
    assert got.value.item() == pytest.approx(value, rel=1e-5)
    assert got.same.item() == pytest.approx(same, rel=1e-5)
    assert got.diff.item() == pytest.approx(diff, rel=1e-5)


def test_pixel_distance_is_as_exact_as_the_reference_direct_cdist():
    """A paper-sized batch (512 normalised 28 x 28 images) with an exact and a near duplicate: the float64 Gram
    distance is within float32 rounding of the exact distance, no further from it than the reference's direct
    float32 cdist, and exactly 0 for equal images."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(512, 1, 28, 28, generator=g) - 0.286) / 0.353
    x[1] = x[0] + 1e-4 * torch.randn(1, 28, 28, generator=g)
    x[3] = x[2]
    flat = x.reshape(512, -1)
    exact = torch.cdist(flat.double(), flat.double(), compute_mode="donot_use_mm_for_euclid_dist")
    exact = exact / exact.max()
    reference = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist")
    reference = reference / reference.max()
    got = pixel_distance_NN(x)
    assert got.dtype == torch.float32
    gap, reference_gap = (got.double() - exact).abs().max().item(), (reference.double() - exact).abs().max().item()
    assert gap <= max(reference_gap, 1.2e-7)
    assert got[2, 3] == 0 and got[3, 2] == 0 and (got.diagonal() == 0).all()
    assert got[0, 1].item() == pytest.approx(exact[0, 1].item(), rel=1e-5)  # the near duplicate, to 5 digits


def test_sample_similarity_prefers_similar_samples_on_one_expert():
    # two identical images and one far away (d = 0, 1, 1 after the max-normalisation)
    x = torch.tensor([0.0, 0.0, 10.0]).view(3, 1, 1, 1)
    together = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    apart = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # S(together) = 0; S(apart) = (1/2)(d_02 + d_20) = 1;  D(together) = (1/2)(2 + 2) = 2, D(apart) = (1/2)(1 + 1) = 1
    assert sample_similarity(together, x, 1.0, 0.0).same.item() == pytest.approx(0.0)
    assert sample_similarity(apart, x, 1.0, 0.0).same.item() == pytest.approx(1.0)
    assert sample_similarity(together, x, 0.0, 1.0).diff.item() == pytest.approx(2.0)
    assert sample_similarity(apart, x, 0.0, 1.0).diff.item() == pytest.approx(1.0)
    # identical batch: all distances 0 and no division by zero
    zero = sample_similarity(torch.full((2, 2), 0.5), torch.ones(2, 1, 2, 2), 1.0, 1.0)
    assert zero.value.item() == 0.0


def test_importance_cv_squared_by_hand():
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.3, 0.3, 0.4], [0.2, 0.2, 0.6]])
    # Imp = (1.0, 1.0, 1.0) -> CV 0
    assert importance_loss(dense_result(probs, probs.log())).item() == pytest.approx(0.0, abs=1e-12)
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5]])
    # Imp = (2.5, 0.5): mean 1.5, unbiased std = sqrt(((1)^2 + (1)^2) / 1) = sqrt(2) -> CV^2 = 2 / 2.25
    assert importance_loss(dense_result(probs, probs)).item() == pytest.approx(2 / 2.25)


def test_importance_of_a_sparse_gate_uses_the_kept_weights():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    gate = GateResult(probs_NE=probs, weights_NK=torch.tensor([[1.0], [1.0]]), experts_NK=torch.tensor([[0], [1]]),
                      logits_NE=probs.log())
    # Imp = (1, 1, 0): mean 2/3, std = sqrt(((1/3)^2 * 2 + (2/3)^2) / 2) = sqrt(1/3)
    assert importance_loss(gate).item() == pytest.approx((1 / 3) / (4 / 9))


def test_switch_balance_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.5, 0.4, 0.1]])
    gate = GateResult(probs_NE=probs, weights_NK=probs.max(1, keepdim=True).values,
                      experts_NK=probs.argmax(1, keepdim=True), logits_NE=probs.log())
    # f = (3/4, 0, 1/4), P = (1.9/4, 1.0/4, 1.1/4): E * sum f P = 3 * (0.75*0.475 + 0.25*0.275)
    assert switch_balance_loss(gate).item() == pytest.approx(3 * (0.75 * 0.475 + 0.25 * 0.275))
    uniform = torch.full((3, 3), 1 / 3)
    gate = GateResult(uniform, uniform[:, :1], torch.tensor([[0], [1], [2]]), uniform.log())
    assert switch_balance_loss(gate).item() == pytest.approx(1.0)


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    gate = dense_result(torch.softmax(logits, 1), logits)
    # logsumexp: log 2 and log 4
    assert router_z_loss(gate).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)


def test_load_loss_by_hand_and_requires_a_load():
    probs = torch.full((2, 2), 0.5)
    gate = GateResult(probs, probs[:, :1], torch.zeros(2, 1, dtype=torch.long), probs, load_E=torch.tensor([3.0, 1.0]))
    # mean 2, unbiased std sqrt(2) -> CV^2 = 0.5
    assert load_loss(gate).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="noisy_topk"):
        load_loss(dense_result(probs, probs))


def test_regularize_total_is_the_weighted_sum_and_parts_are_unweighted():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, requires_grad=True)
    gate = dense_result(torch.softmax(logits, 1), logits)
    out = ModelOutput(log_probs_BC=torch.zeros(5, 10), gates=[gate])
    x = torch.randn(5, 1, 4, 4)
    cfg = RegularizerConfig(importance=0.4, load_balance=0.2, z_loss=0.1,
                            sample_similarity=SampleSimilarityConfig(beta_s=1e-2, beta_d=1e-3))
    terms = regularize(cfg, out, x)
    ls = sample_similarity(gate.probs_NE, x, 1e-2, 1e-3)
    expected = (0.4 * importance_loss(gate) + 0.2 * switch_balance_loss(gate) + 0.1 * router_z_loss(gate)
                + ls.value)
    torch.testing.assert_close(terms.total, expected)
    assert set(terms.parts) == {"importance", "load_balance", "z_loss", "sample_similarity", "ls_same", "ls_diff"}
    torch.testing.assert_close(terms.parts["importance"], importance_loss(gate).detach())
    torch.testing.assert_close(terms.parts["ls_same"], ls.same.detach())
    assert not any(v.requires_grad for v in terms.parts.values())
    terms.total.backward()
    assert logits.grad.abs().sum() > 0
    # only weighted terms enter the total; importance and z-loss are still logged
    light = regularize(RegularizerConfig(), out, x)
    assert light.total.item() == 0.0 and set(light.parts) == {"importance", "z_loss"}


def test_regularize_sums_layers_and_skips_sample_similarity_for_tokens():
    torch.manual_seed(0)
    gates = [dense_result(torch.softmax(torch.randn(8, 3), 1), torch.randn(8, 3)) for _ in range(2)]
    out = ModelOutput(log_probs_BC=torch.zeros(4, 10), gates=gates, items_per_sample=2)
    cfg = RegularizerConfig(importance=1.0, sample_similarity=SampleSimilarityConfig(beta_s=1.0))
    terms = regularize(cfg, out, torch.randn(4, 1, 2, 2))
    torch.testing.assert_close(terms.total, importance_loss(gates[0]) + importance_loss(gates[1]))
    assert "sample_similarity" not in terms.parts
    single = regularize(cfg, ModelOutput(log_probs_BC=torch.zeros(2, 10)), torch.randn(2, 1, 2, 2))
    assert single.total.item() == 0.0 and single.parts == {}
