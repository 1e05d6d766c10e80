"""The paper's sample-level MoE against independent references built from plain torch layers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raymoe.config.load import load_experiment
from raymoe.kernels.fast_paths import swap_convs
from raymoe.models.build import build_model
from raymoe.models.distill import build_distilled
from raymoe.models.moe import ExpectationMoE
from raymoe.models.paper_experts import ConvNetSpec, PaperExperts, expert_spec
from raymoe.models.paper_gate_nets import GateTrunk, gate_trunk_spec
from raymoe.moe.routers import LinearRouter

# 8x8 RGB, two conv stages (8 -> 4 -> 2), BatchNorm on the second: the CIFAR layout in miniature
TINY_BN = ConvNetSpec(in_channels=3, image_size=8, channels=(2, 3), batchnorm=(False, True), padding=1, fc1=6,
                      hidden=4)
FMNIST = expert_spec("fashion_mnist", 1, 28)


class RefExpert(nn.Module):
    """Reference expert written from the spec text: conv -> (BN) -> ReLU -> pool ..., fc1, fc2 = hidden."""

    def __init__(self, spec: ConvNetSpec, num_classes: int):
        super().__init__()
        cins = (spec.in_channels, *spec.channels[:-1])
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=spec.padding, bias=not bn)
                                   for a, b, bn in zip(cins, spec.channels, spec.batchnorm))
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) if bn else nn.Identity()
                                 for c, bn in zip(spec.channels, spec.batchnorm))
        self.fc1 = nn.Linear(spec.flat_features, spec.fc1)
        self.fc2 = nn.Linear(spec.fc1, spec.hidden)
        self.out = nn.Linear(spec.hidden, num_classes)

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = F.max_pool2d(F.relu(bn(conv(x))), 2)
        x = F.relu(self.fc1(x.reshape(x.shape[0], -1)))
        hidden = self.fc2(x)
        return torch.cat([torch.softmax(self.out(F.relu(hidden)), dim=1), hidden], dim=1)


def ref_experts(stack: PaperExperts) -> list[RefExpert]:
    """One RefExpert per local expert, loaded with that expert's slice of the stacked weights."""
    refs = []
    for i in range(stack.num_local):
        ref = RefExpert(stack.spec, stack.num_classes)
        with torch.no_grad():
            for j, conv in enumerate(ref.convs):
                conv.weight.copy_(stack.convs[j].weight[i])
                if conv.bias is not None:
                    conv.bias.copy_(stack.convs[j].bias[i])
            for j, bn in enumerate(ref.bns):
                if isinstance(bn, nn.BatchNorm2d):
                    for name in ("weight", "bias", "running_mean", "running_var"):
                        getattr(bn, name).copy_(getattr(stack.bns[j], name)[i])
            for name in ("fc1", "fc2", "out"):
                getattr(ref, name).weight.copy_(getattr(stack, name).weight[i])
                getattr(ref, name).bias.copy_(getattr(stack, name).bias[i])
        refs.append(ref)
    return refs


def stacked_grad(stack: PaperExperts, i: int) -> list[torch.Tensor]:
    grads = []
    for conv in stack.convs:
        grads += [conv.weight.grad[i]] + ([conv.bias.grad[i]] if conv.bias is not None else [])
    for bn in stack.bns:
        if hasattr(bn, "running_mean"):
            grads += [bn.weight.grad[i], bn.bias.grad[i]]
    for name in ("fc1", "fc2", "out"):
        grads += [getattr(stack, name).weight.grad[i], getattr(stack, name).bias.grad[i]]
    return grads


def ref_grad(ref: RefExpert) -> list[torch.Tensor]:
    grads = []
    for conv in ref.convs:
        grads += [conv.weight.grad] + ([conv.bias.grad] if conv.bias is not None else [])
    for bn in ref.bns:
        if isinstance(bn, nn.BatchNorm2d):
            grads += [bn.weight.grad, bn.bias.grad]
    for name in ("fc1", "fc2", "out"):
        grads += [getattr(ref, name).weight.grad, getattr(ref, name).bias.grad]
    return grads


def assert_running_stats_per_expert(stack: PaperExperts, refs: list) -> None:
    """Stacked BatchNorm running statistics of expert i equal reference expert i's own."""
    for j, bn in enumerate(stack.bns):
        if hasattr(bn, "running_mean"):
            for i, ref in enumerate(refs):
                torch.testing.assert_close(bn.running_mean[i], ref.bns[j].running_mean)
                torch.testing.assert_close(bn.running_var[i], ref.bns[j].running_var)


@pytest.mark.parametrize("spec,counts", [(TINY_BN, [5, 5, 5]), (TINY_BN, [4, 0, 7]), (FMNIST, [6, 6, 6]),
                                         (FMNIST, [1, 9, 3])])
def test_stacked_experts_equal_separate_plain_experts(spec, counts):
    torch.manual_seed(0)
    stack = PaperExperts(len(counts), spec, num_classes=7)
    refs = ref_experts(stack)
    x = torch.randn(sum(counts), spec.in_channels, spec.image_size, spec.image_size)
    y = stack.forward_grouped(x, counts)
    assert y.shape == (sum(counts), 7 + spec.hidden)
    y_ref = torch.cat([ref(xi) for ref, xi, n in zip(refs, x.split(counts), counts) if n > 0])
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    # backward of the same loss: gradients of expert i's slice equal expert i's own gradients
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    for i, ref in enumerate(refs):
        if counts[i] == 0:
            assert all(g.abs().sum() == 0 for g in stacked_grad(stack, i))
            continue
        for g, g_ref in zip(stacked_grad(stack, i), ref_grad(ref)):
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
    assert_running_stats_per_expert(stack, refs)


@pytest.mark.parametrize("spec", [TINY_BN, FMNIST])
def test_dense_forward_equals_each_separate_expert_on_the_same_images(spec):
    """forward_dense (one conv with the experts' filters stacked, no copies of the images) == every reference
    expert on the same images, forward and backward, and BatchNorm statistics per expert."""
    torch.manual_seed(0)
    stack = PaperExperts(3, spec, num_classes=7)
    refs = ref_experts(stack)
    x = torch.randn(6, spec.in_channels, spec.image_size, spec.image_size)
    y_eGY = stack.forward_dense(x)
    y_ref = torch.stack([ref(x) for ref in refs])
    torch.testing.assert_close(y_eGY, y_ref, rtol=1e-5, atol=1e-6)
    w = torch.randn_like(y_eGY)
    (y_eGY * w).sum().backward()
    (y_ref * w).sum().backward()
    for i, ref in enumerate(refs):
        for g, g_ref in zip(stacked_grad(stack, i), ref_grad(ref)):
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
    assert_running_stats_per_expert(stack, refs)


def test_stacked_experts_eval_mode_uses_running_stats():
    torch.manual_seed(1)
    stack = PaperExperts(2, TINY_BN, num_classes=3)
    stack.forward_grouped(torch.randn(8, 3, 8, 8), [4, 4])  # move the running stats away from 0/1
    refs = ref_experts(stack)
    stack.eval()
    x = torch.randn(6, 3, 8, 8)
    for counts in ([3, 3], [1, 5]):
        y = stack.forward_grouped(x, counts)
        y_ref = torch.cat([ref.eval()(xi) for ref, xi in zip(refs, x.split(counts))])
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)


def test_stacked_init_matches_nn_default_distribution():
    torch.manual_seed(0)
    stack = PaperExperts(5, FMNIST, num_classes=10)
    for w, fan_in in ((stack.fc1.weight, 169), (stack.fc1.bias, 169), (stack.fc2.weight, 64),
                      (stack.convs[0].weight, 9)):
        bound = 1 / math.sqrt(fan_in)  # nn.Linear / nn.Conv2d: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))
        assert w.abs().max() <= bound
        if w.numel() > 1000:
            assert abs(w.std().item() - bound / math.sqrt(3)) < 0.03 * bound
    # the experts are independent draws
    assert not torch.equal(stack.fc1.weight[0], stack.fc1.weight[1])


def test_shard_keeps_the_right_slices():
    torch.manual_seed(0)
    stack = PaperExperts(4, TINY_BN, num_classes=3)
    stack.forward_grouped(torch.randn(8, 3, 8, 8), [2, 2, 2, 2])  # non-trivial running stats
    shard = stack.shard(1, 2)
    assert (shard.num_local, shard.first_expert, list(shard.local_ids)) == (2, 2, [2, 3])
    full = dict(stack.state_dict())
    for name, t in shard.state_dict().items():
        assert t.shape[0] == 2, name
        torch.testing.assert_close(t, full[name][2:4], msg=name)
    assert shard.bns[1].running_mean.shape == (2, 3)
    stack.eval(), shard.eval()
    x = torch.randn(8, 3, 8, 8)
    torch.testing.assert_close(shard.forward_grouped(x[4:], [2, 2]), stack.forward_grouped(x, [2, 2, 2, 2])[4:])


def cfg_for(**over):
    raw = {"name": "t", "data": {"name": "fashion_mnist"}, "model": {"num_experts": 3}}
    return load_experiment(raw=raw, overrides=over)


def test_moe_with_one_expert_equals_that_expert():
    torch.manual_seed(0)
    model = build_model(cfg_for(**{"model.num_experts": 1}), 10, 1, 28)
    ref = ref_experts(model.experts)[0]
    x, y = torch.randn(12, 1, 28, 28), torch.randint(0, 10, (12,))
    out = model(x)
    probs_ref = ref(x)[:, :10]
    torch.testing.assert_close(out.log_probs_BC, torch.log(probs_ref + 1e-7), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.gates[0].probs_NE, torch.ones(12, 1))
    F.nll_loss(out.log_probs_BC, y).backward()
    F.nll_loss(torch.log(probs_ref + 1e-7), y).backward()
    for g, g_ref in zip(stacked_grad(model.experts, 0), ref_grad(ref)):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-7)
    assert torch.equal(out.selected_pred_B, probs_ref.argmax(1))


def test_dense_moe_is_the_gate_weighted_expectation_and_output_softmax():
    torch.manual_seed(0)
    for kind in ("softmax", "attentive"):
        model = build_model(cfg_for(**{"gate.kind": kind, "model.output_softmax": True}), 10, 1, 28)
        x = torch.randn(5, 1, 28, 28)
        out = model(x)
        refs = ref_experts(model.experts)
        f_EBY = torch.stack([r(x) for r in refs])
        g = out.gates[0].probs_NE
        mix = torch.einsum("be,ebc->bc", g, f_EBY[..., :10])
        torch.testing.assert_close(out.log_probs_BC, torch.log(torch.softmax(mix, 1) + 1e-7), rtol=1e-5, atol=1e-6)
        top = g.argmax(1)
        assert torch.equal(out.selected_pred_B, f_EBY[top, torch.arange(5), :10].argmax(1))
        if kind == "attentive":  # docs/paper-notes.md §2 by hand from the reference experts' hidden layers
            gate = model.gate
            q = F.relu(gate.trunk(x)) @ gate.router.w_q.weight.t()  # FMNIST: the attentive query has ReLU
            k = f_EBY[..., 10:] @ gate.router.w_k.weight.t()
            a = torch.einsum("bh,ebh->be", q, k) / math.sqrt(32)
            torch.testing.assert_close(g, torch.softmax(a, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k,renorm", [(2, None), (1, None), (1, True), (3, False)])
def test_topk_equals_dense_masked_and_renormalised(k, renorm):
    torch.manual_seed(0)
    over = {"gate.kind": "topk", "gate.top_k": k, "model.num_experts": 4, "gate.renormalize": renorm}
    model = build_model(cfg_for(**over), 10, 1, 28)
    x = torch.randn(9, 1, 28, 28)
    out = model(x)
    loss = -out.log_probs_BC[:, 3].sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # reference: all experts on all samples, gate probabilities masked to the top k
    logits = model.gate.router.proj(F.relu(model.gate.trunk(x)))
    p = torch.softmax(logits, 1)
    mask = torch.zeros_like(p).scatter(1, p.topk(k, 1).indices, 1.0)
    w = p * mask
    if (k > 1) if renorm is None else renorm:
        w = w / w.sum(1, keepdim=True)
    f = model.experts.forward_grouped(x.repeat(4, 1, 1, 1), [9] * 4).view(4, 9, -1)[..., :10]
    ref = torch.log(torch.einsum("be,ebc->bc", w, f) + 1e-7)
    torch.testing.assert_close(out.log_probs_BC, ref, rtol=1e-5, atol=1e-6)
    (-ref[:, 3].sum()).backward()
    for n, prm in model.named_parameters():
        g_ref = prm.grad if prm.grad is not None else torch.zeros_like(prm)
        torch.testing.assert_close(grads.get(n, torch.zeros_like(prm)), g_ref, rtol=1e-4, atol=1e-6, msg=n)
    if k == 1 and renorm:
        assert torch.equal(out.gates[0].weights_NK, torch.ones(9, 1))  # documented: weight 1, no task gradient
        assert model.gate.router.proj.weight.grad.abs().max() < 1e-6  # p / p: zero up to rounding


def test_sparse_moe_runs_only_chosen_experts():
    torch.manual_seed(0)
    model = build_model(cfg_for(**{"gate.kind": "topk", "gate.top_k": 1, "model.num_experts": 3}), 10, 1, 28)
    seen = []
    inner = model.experts.forward_grouped
    model.experts.forward_grouped = lambda x, counts: seen.append(list(counts)) or inner(x, counts)
    out = model(torch.randn(10, 1, 28, 28))
    chosen = torch.bincount(out.gates[0].experts_NK[:, 0], minlength=3).tolist()
    assert seen == [chosen] and sum(chosen) == 10


def test_single_model_is_one_expert_network():
    torch.manual_seed(0)
    model = build_model(cfg_for(**{"model.arch": "single"}), 10, 1, 28)
    x = torch.randn(4, 1, 28, 28)
    out = model(x)
    assert out.gates == [] and out.selected_pred_B is None
    net = model.net
    t = F.max_pool2d(F.relu(net.convs[0](x)), 2)
    probs = torch.softmax(net.out(F.relu(net.fc2(F.relu(net.fc1(t.flatten(1)))))), 1)
    torch.testing.assert_close(out.log_probs_BC, torch.log(probs + 1e-7))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in RefExpert(FMNIST, 10).parameters())


def test_paper_architecture_shapes():
    # docs/paper-notes.md §1.2 table: fc1 inputs and widths
    assert (expert_spec("mnist", 1, 28).flat_features, expert_spec("mnist", 1, 28).fc1) == (169, 5)
    assert expert_spec("cifar10", 3, 32).flat_features == 48
    assert (expert_spec("cifar100", 3, 32).flat_features, expert_spec("cifar100", 3, 32).hidden) == (256, 64)
    assert gate_trunk_spec("fashion_mnist", 1, 28)[0].flat_features == 1352
    assert gate_trunk_spec("cifar10", 3, 32)[0].flat_features == 1024
    assert gate_trunk_spec("cifar100", 3, 32)[0].flat_features == 2048
    assert expert_spec("cifar100", 3, 32, hidden=128).hidden == 128


def test_distillation_freezes_experts_and_copies_the_trunk():
    torch.manual_seed(0)
    attentive = build_model(cfg_for(**{"gate.kind": "attentive"}), 10, 1, 28)
    attentive(torch.randn(8, 1, 28, 28))  # BatchNorm running stats of the trunk move
    state = attentive.state_dict()
    model = build_distilled(cfg_for(), state, 10, 1, 28)
    assert isinstance(model, ExpectationMoE) and isinstance(model.gate.router, LinearRouter) and model.gate.dense
    for name, t in model.experts.state_dict().items():
        assert torch.equal(t, state[f"experts.{name}"]), name
    assert all(not p.requires_grad for p in model.experts.parameters())
    for name, t in model.gate.trunk.state_dict().items():
        assert torch.equal(t, state[f"gate.trunk.{name}"]), name
    assert all(p.requires_grad for p in model.gate.parameters())
    out = model(torch.randn(6, 1, 28, 28))
    F.nll_loss(out.log_probs_BC, torch.zeros(6, dtype=torch.long)).backward()
    assert model.gate.router.proj.weight.grad is not None
    assert all(p.grad is None for p in model.experts.parameters())
    with pytest.raises(KeyError):  # an original-gate checkpoint has no attentive gate
        build_distilled(cfg_for(), model.state_dict(), 10, 1, 28)


def test_gate_trunks_share_names_between_original_and_attentive():
    spec, relu = gate_trunk_spec("fashion_mnist", 1, 28)
    assert relu  # FMNIST attentive trunk returns ReLU(fc2), the others plain fc2 (docs/paper-notes.md §1.2)
    assert not gate_trunk_spec("mnist", 1, 28)[1]
    original = build_model(cfg_for(), 10, 1, 28).gate
    attentive = build_model(cfg_for(**{"gate.kind": "attentive"}), 10, 1, 28).gate
    assert original.trunk.state_dict().keys() == attentive.trunk.state_dict().keys()
    assert original.relu_features and attentive.relu_features  # FMNIST: both read ReLU(fc2)
    assert isinstance(original.trunk, GateTrunk)
    assert LinearRouter(32, 3, top_k=2).renormalize  # auto: renormalise when k > 1


class SubclassedBN(nn.BatchNorm2d):
    """Stands for GlobalBatchNorm: any BatchNorm subclass must keep its own forward (no folding)."""

    calls = 0

    def forward(self, x):
        SubclassedBN.calls += 1
        return super().forward(x)


class Stage(nn.Module):
    """One conv stage as the paper nets hold theirs (convs[i] then bns[i]), called as the model calls it."""

    def __init__(self, conv: nn.Module, bn: nn.Module):
        super().__init__()
        self.convs, self.bns = nn.ModuleList([conv]), nn.ModuleList([bn])

    def forward(self, x):
        return self.bns[0](self.convs[0](x))


@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("with_bn", [True, False])
def test_patch_conv_swap_equals_conv_then_batchnorm(padding, with_bn):
    torch.manual_seed(0)
    conv, ref_conv = nn.Conv2d(1, 8, 3, padding=padding), nn.Conv2d(1, 8, 3, padding=padding)
    ref_conv.load_state_dict(conv.state_dict())
    bn, ref_bn = (nn.BatchNorm2d(8), nn.BatchNorm2d(8)) if with_bn else (nn.Identity(), nn.Identity())
    if with_bn:
        with torch.no_grad():
            bn.weight.uniform_(-2, 2)
            bn.bias.normal_()
        ref_bn.load_state_dict(bn.state_dict())
    stage, ref = Stage(conv, bn), Stage(ref_conv, ref_bn)
    keys = list(stage.state_dict())
    assert swap_convs(stage) == 1 and list(stage.state_dict()) == keys  # only classes change
    assert type(stage.convs[0]).__name__ == "PatchConv2d"
    x = torch.randn(16, 1, 12, 12) * 3 + 2  # far from zero mean: the variance must still be right
    for training in (True, False, True):
        stage.train(training), ref.train(training)
        y, y_ref = stage(x), ref(x)
        assert y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
        g = torch.randn_like(y_ref)
        (y * g).sum().backward()
        (y_ref * g).sum().backward()
        for p, p_ref in zip(stage.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-3, atol=1e-3)  # conv bias under BN: ~0
            p.grad = p_ref.grad = None
    if with_bn:
        torch.testing.assert_close(stage.bns[0].running_mean, ref_bn.running_mean)
        torch.testing.assert_close(stage.bns[0].running_var, ref_bn.running_var)
        assert stage.bns[0].num_batches_tracked.item() == ref_bn.num_batches_tracked.item() == 2
        # a BatchNorm replaced after the swap (as data parallelism does) ends the fold: it runs itself, once
        stage.bns[0] = SubclassedBN(8)
        ref.bns[0] = nn.BatchNorm2d(8)
        SubclassedBN.calls = 0
        torch.testing.assert_close(stage(x), ref(x), rtol=1e-4, atol=1e-4)
        assert SubclassedBN.calls == 1
    # a BatchNorm subclass in place at swap time is not folded either
    other = Stage(nn.Conv2d(1, 8, 3, padding=padding), SubclassedBN(8))
    swap_convs(other)
    SubclassedBN.calls = 0
    other(x)
    assert SubclassedBN.calls == 1
