"""Decoder-only GPT (arch gpt / gpt_moe): causality, tied head, dense = MoE active expert parameters, positions,
every token-choice router, init, and the refusal of routing that looks at later tokens.

Shape legend: B sequences, T positions, V vocabulary, N = B * T tokens, D model dim, F expert hidden, E experts.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raymoe.config.load import apply_overrides, from_dict, load_experiment
from raymoe.config.schema import ExperimentConfig
from raymoe.errors import ConfigError
from raymoe.models.build import build_lm, build_model
from raymoe.models.gpt import GPT, build_gpt
from raymoe.models.rope import Rotary
from raymoe.moe.token.capacity import within_capacity
from raymoe.moe.token.layer import TokenMoE
from raymoe.moe.token.shared import FeedForward

V, T, B = 37, 16, 3
TINY = {"dim": 32, "depth": 4, "heads": 4, "mlp_dim": 24, "block_size": T}
HYPER = {"enabled": True, "expert_embed_dim": 8, "process_dim": 8, "hypernet_input": 8, "hypernet_bottleneck": 8,
         "layer_embed_dim": 4, "adapter_dim": 4}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text("".join(f"line {i} of a tiny text\n" for i in range(200)))
    return str(path)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors run faster on one thread


def _raw(text_file, arch="gpt_moe", gate=None, gpt=None, experts=4) -> dict:
    return {"name": "g", "data": {"name": "text", "text": {"source": "file", "path": text_file, "block_size": T,
                                                           "val_tokens": 4 * T}},
            "model": {"arch": arch, "num_experts": experts, "gpt": {**TINY, **(gpt or {})}},
            "gate": {"kind": "topk", "top_k": 2} if gate is None else gate, "train": {"max_steps": 10}}


def _cfg(text_file, **kw) -> ExperimentConfig:
    return load_experiment(raw=_raw(text_file, **kw))


def _model(cfg, seed=0) -> GPT:
    torch.manual_seed(seed)
    return build_gpt(cfg, V)


CAUSAL_CASES = [  # (id, arch, gate, gpt overrides, train mode: noise/jitter drawn after a reseed)
    ("dense-rope", "gpt", None, {}, False),
    ("dense-learned", "gpt", None, {"positions": "learned"}, False),
    ("gshard-top2", "gpt_moe", {"kind": "topk", "top_k": 2}, {}, False),
    ("switch-jitter-train", "gpt_moe", {"kind": "topk", "top_k": 1, "jitter": 0.1}, {"positions": "learned"}, True),
    ("noisy-top2-train", "gpt_moe", {"kind": "noisy_topk", "top_k": 2}, {}, True),
    ("hypermoe-top1", "gpt_moe", {"kind": "topk", "top_k": 1, "hypermoe": HYPER}, {}, False),
    ("hypermoe-shared-auxfree-train", "gpt_moe",
     {"kind": "topk", "top_k": 2, "bias_balance_rate": 0.1, "hypermoe": HYPER}, {"num_shared_experts": 1}, True),
    ("attentive", "gpt_moe", {"kind": "attentive", "top_k": 1}, {}, False),
]


@pytest.mark.parametrize("arch, gate, gpt, train", [c[1:] for c in CAUSAL_CASES], ids=[c[0] for c in CAUSAL_CASES])
def test_a_later_token_never_changes_earlier_log_probs(text_file, arch, gate, gpt, train):
    model = _model(_cfg(text_file, arch=arch, gate=gate, gpt=gpt)).train(train)
    if arch == "gpt_moe":  # routers that start at zero (noisy top-k) would route every token alike
        for layer in (m for m in model.modules() if isinstance(m, TokenMoE)):
            for p in layer.router.parameters():
                torch.nn.init.normal_(p, std=0.5)
    idx_BT = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))

    def run(idx):
        torch.manual_seed(7)  # same noise / jitter draws in both runs
        with torch.no_grad():
            return model(idx).log_probs_BC.view(B, T, V)

    base_BTV = run(idx_BT)
    for t in (3, 9, T - 1):
        changed = idx_BT.clone()
        changed[:, t] = (changed[:, t] + 1 + torch.arange(B)) % V
        out_BTV = run(changed)
        torch.testing.assert_close(out_BTV[:, :t], base_BTV[:, :t], atol=1e-5, rtol=1e-5)
        assert (out_BTV[:, t] - base_BTV[:, t]).abs().max() > 1e-3  # the change itself is seen at t


def test_output_head_is_tied_to_the_token_embedding(text_file):
    model = _model(_cfg(text_file))
    assert model.head.weight is model.tok_embed.weight
    assert sum(p is model.tok_embed.weight for p in model.parameters()) == 1  # listed once for the optimizer
    untied = _model(_cfg(text_file))
    untied.head.weight = torch.nn.Parameter(untied.tok_embed.weight.detach().clone())
    idx_BT, y_N = torch.randint(0, V, (B, T)), torch.randint(0, V, (B * T,))
    for m in (model, untied):
        F.nll_loss(m.eval()(idx_BT).log_probs_BC, y_N).backward()
    # the one shared matrix gets the input embedding's gradient plus the output head's
    torch.testing.assert_close(model.tok_embed.weight.grad, untied.tok_embed.weight.grad + untied.head.weight.grad)
    assert untied.tok_embed.weight.grad.abs().sum() > 0 and untied.head.weight.grad.abs().sum() > 0


def test_log_probs_are_normalised_over_the_vocabulary_and_flattened_b_major(text_file):
    model = _model(_cfg(text_file)).eval()
    idx_BT = torch.randint(0, V, (B, T))
    out = model(idx_BT)
    assert out.log_probs_BC.shape == (B * T, V) and out.items_per_sample == T and out.selected_pred_B is None
    torch.testing.assert_close(out.log_probs_BC.logsumexp(-1), torch.zeros(B * T), atol=1e-5, rtol=0)
    single = model(idx_BT[1:2]).log_probs_BC  # row b * T + t is sequence b, position t
    torch.testing.assert_close(out.log_probs_BC[T:2 * T], single, atol=1e-5, rtol=1e-5)


def _nonzero_grads(model, idx_BT) -> dict[str, int]:
    """Parameter elements that one forward/backward touches, per parameter name (the brute-force count). A gradient
    that is zero in exact arithmetic may come out as rounding noise (attention's q/k for a single token: ~1e-11 in
    float32 on an Intel Xeon, exactly 0 on an AMD EPYC), so the count runs in float64 and "touched" means above
    1e-13, far below any real gradient element and far above float64 noise."""
    model = model.double()
    model.zero_grad(set_to_none=True)
    out = model(idx_BT)
    w = torch.rand(out.log_probs_BC.shape, generator=torch.Generator().manual_seed(3))
    (out.log_probs_BC * w).sum().backward()
    return {n: int((p.grad.abs() > 1e-13).sum()) for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("top_k, shared", [(1, 0), (2, 0), (2, 1)])
def test_dense_gpt_runs_the_same_expert_parameters_per_token_as_gpt_moe(text_file, top_k, shared):
    gpt = {"depth": 4, "moe_every": 2, "num_shared_experts": shared}
    raw = _raw(text_file, gate={"kind": "topk", "top_k": top_k}, gpt=gpt)
    moe_cfg = load_experiment(raw=raw)
    dense_cfg = load_experiment(raw=apply_overrides(raw, ["model.arch=gpt"]))  # one --set apart
    moe, dense = _model(moe_cfg).eval(), _model(dense_cfg).eval()
    one_token = torch.tensor([[5]])
    counts_moe, counts_dense = _nonzero_grads(moe, one_token), _nonzero_grads(dense, one_token)

    def ffn_matrices(counts):  # the FFN's weight matrices (dense fc*.weight, expert w1_EDF / w2_EFD), no router
        biases = (".bias", ".b1_EF", ".b2_ED")
        return sum(c for n, c in counts.items() if ".ffn." in n and ".router." not in n and not n.endswith(biases))

    d, f, moe_layers = TINY["dim"], TINY["mlp_dim"], 2
    expected = moe_layers * 2 * d * (top_k + shared) * f + (4 - moe_layers) * 2 * d * f
    assert ffn_matrices(counts_moe) == ffn_matrices(counts_dense) == expected
    # everything else is identical except the router and the MoE's extra output biases (one per expert run)
    router = sum(c for n, c in counts_moe.items() if ".router." in n)
    rest_moe = sum(counts_moe.values()) - router
    extra_bias = moe_layers * (top_k + (1 if shared else 0) - 1) * d
    assert rest_moe == sum(counts_dense.values()) + extra_bias
    assert 0 < router <= moe_layers * d * 4


def test_moe_blocks_follow_moe_every_and_dense_blocks_widen_in_their_place(text_file):
    gpt = {"depth": 6, "moe_every": 3, "num_shared_experts": 1}
    moe = _model(_cfg(text_file, gpt=gpt))
    dense = _model(_cfg(text_file, arch="gpt", gpt=gpt))
    assert [isinstance(b.ffn, TokenMoE) for b in moe.blocks] == [False, False, True, False, False, True]
    widths = [b.ffn.fc1.out_features for b in dense.blocks]
    f = TINY["mlp_dim"]
    assert widths == [f, f, 3 * f, f, f, 3 * f]  # (top_k 2 + 1 shared) experts side by side
    assert not any(isinstance(m, TokenMoE) for m in dense.modules()) and dense.hypernet is None


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_both_position_kinds_learn_a_repeated_sequence(text_file, positions):
    cfg = _cfg(text_file, gpt={"positions": positions, "depth": 2})
    model = _model(cfg)
    assert (model.pos_embed is not None) == (positions == "learned")
    period_P = torch.randperm(V, generator=torch.Generator().manual_seed(0))[:7]
    stream = period_P.repeat(20)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(40):
        starts = torch.randint(0, stream.numel() - T - 1, (8,), generator=torch.Generator().manual_seed(step))
        w = torch.stack([stream[s:s + T + 1] for s in starts])
        out = model(w[:, :-1])
        loss = F.nll_loss(out.log_probs_BC, w[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.8 * math.log(V)  # starts near uniform
    assert sum(losses[-5:]) / 5 < 0.2 * losses[0], losses[::5]


def test_rotary_scores_depend_only_on_the_offset():
    rot = Rotary(head_dim=8, max_len=32)
    q_d, k_d = torch.randn(8), torch.randn(8)

    def score(m, n):
        q = rot(q_d.expand(1, 1, 32, 8))[0, 0, m]
        k = rot(k_d.expand(1, 1, 32, 8))[0, 0, n]
        return float(q @ k)

    assert score(5, 2) == pytest.approx(score(20, 17), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)
    torch.testing.assert_close(rot(torch.ones(1, 1, 1, 8)), torch.ones(1, 1, 1, 8))  # position 0: identity


ROUTERS = [  # (id, gate, gpt overrides)
    ("switch", {"kind": "topk", "top_k": 1, "jitter": 0.01}, {}),
    ("gshard-top2", {"kind": "topk", "top_k": 2}, {}),
    ("noisy-topk", {"kind": "noisy_topk", "top_k": 2}, {}),
    ("attentive", {"kind": "attentive", "top_k": 1}, {}),
    ("aux-free-bias", {"kind": "topk", "top_k": 1, "bias_balance_rate": 0.01}, {}),
    ("shared-experts", {"kind": "topk", "top_k": 1}, {"num_shared_experts": 2}),
    ("hypermoe-switch", {"kind": "topk", "top_k": 1, "hypermoe": HYPER}, {}),
    ("hypermoe-noisy-top2", {"kind": "noisy_topk", "top_k": 2, "hypermoe": HYPER}, {}),
]


@pytest.mark.parametrize("gate, gpt", [r[1:] for r in ROUTERS], ids=[r[0] for r in ROUTERS])
def test_every_token_choice_router_builds_trains_and_reports(text_file, gate, gpt):
    cfg = _cfg(text_file, gate=gate, gpt=gpt)
    model = build_model(cfg, num_classes=V, in_channels=0, image_size=0)  # the loop's entry point dispatches too
    assert isinstance(model, GPT)
    out = model.train()(torch.randint(0, V, (B, T)))
    k = gate["top_k"]
    assert len(out.gates) == len(out.layer_stats) == TINY["depth"] // 2 and out.aux_loss is None
    for g, stats in zip(out.gates, out.layer_stats):
        assert g.probs_NE.shape == (B * T, 4) and g.experts_NK.shape == (B * T, k)
        assert float(stats["dropped_frac"]) == 0.0 and float(stats["load_E"].sum()) == B * T * k  # dropless
    loss = F.nll_loss(out.log_probs_BC, torch.randint(0, V, (B * T,)))
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    moe_layers = [m for m in model.modules() if isinstance(m, TokenMoE)]
    if gate.get("hypermoe"):  # one hypernetwork, shared by every layer and registered once
        assert all(m.hypermoe.hypernet is model.hypernet for m in moe_layers)
        assert model.hypernet.trunk.weight.grad is not None
    if gate.get("bias_balance_rate"):
        assert all(int(m.router.balancer.counts_E.sum()) == B * T * k for m in moe_layers)


def test_init_is_nanogpt_outside_the_moe_layers_and_their_own_inside(text_file):
    cfg = _cfg(text_file, gate={"kind": "topk", "top_k": 1, "hypermoe": HYPER}, gpt={"depth": 8, "dim": 64})
    model = _model(cfg)
    assert model.tok_embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual = torch.cat([b.attn.proj.weight.flatten() for b in model.blocks]
                         + [b.ffn.fc2.weight.flatten() for b in model.blocks if isinstance(b.ffn, FeedForward)])
    assert residual.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)
    assert all(float(b.attn.qkv.bias.detach().abs().max()) == 0 for b in model.blocks)
    experts = model.blocks[1].ffn.experts.w1_EDF  # TokenExperts: U(+-1/sqrt(D))
    assert experts.abs().max().item() <= 1 / math.sqrt(64) and experts.std().item() > 0.05
    assert model.hypernet.w_down_head.weight.abs().max().item() < 1e-3  # hyperfan-in: starts as the plain MoE


@pytest.mark.parametrize("arch", ["gpt_moe", "gpt"])
def test_expert_choice_is_refused_for_causal_models(text_file, arch):
    raw = _raw(text_file, arch=arch, gate={"kind": "expert_choice"})
    with pytest.raises(ConfigError) as err:
        load_experiment(raw=raw)
    assert err.value.path == "gate.kind" and "future" in err.value.problem
    with pytest.raises(ConfigError) as err:  # and by the builder, for configs that skipped the checks
        build_gpt(from_dict(ExperimentConfig, raw), V)
    assert err.value.path == "gate.kind"


def test_capacity_dropping_is_refused_because_later_tokens_would_evict_earlier_ones(text_file):
    raw = _raw(text_file, gate={"kind": "topk", "top_k": 2, "capacity_factor": 1.0})
    with pytest.raises(ConfigError) as err:
        load_experiment(raw=raw)
    assert err.value.path == "gate.capacity_factor"
    with pytest.raises(ConfigError):
        build_gpt(from_dict(ExperimentConfig, raw), V)
    # why: token 0's second choice (expert 1) loses its slot to token 1's first choice once token 1 picks expert 1
    before = within_capacity(torch.tensor([[0, 1], [2, 3]]), capacity=1, num_experts=4)
    after = within_capacity(torch.tensor([[0, 1], [1, 3]]), capacity=1, num_experts=4)
    assert bool(before[0, 1]) and not bool(after[0, 1])


def test_padded_vocabulary_and_too_small_vocabulary(text_file):
    model = build_lm(_cfg(text_file, gpt={"vocab_size": 320}), V)  # byte data (256 ids) padded to 320 rows
    assert model.tok_embed.num_embeddings == 320
    assert model(torch.zeros(1, 2, dtype=torch.long)).log_probs_BC.shape == (2, 320)
    with pytest.raises(ConfigError) as err:
        build_lm(from_dict(ExperimentConfig, _raw(text_file, gpt={"vocab_size": 16})), V)
    assert err.value.path == "model.gpt.vocab_size"
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, T + 1, dtype=torch.long))


@pytest.mark.parametrize("patch, path", [
    ({"model": {"arch": "gpt_moe"}, "data": {"name": "fashion_mnist"}}, "model.arch"),
    ({"model": {"arch": "vit_moe"}}, "data.name"),
    ({"model": {"gpt": {"heads": 3}}}, "model.gpt.dim"),
    ({"model": {"gpt": {"dim": 24, "heads": 4}}}, "model.gpt.positions"),  # head dim 6 is even: fine; see below
    ({"model": {"gpt": {"dim": 20, "heads": 4}}}, "model.gpt.positions"),  # head dim 5: rotary needs pairs
    ({"model": {"gpt": {"positions": "alibi"}}}, "model.gpt.positions"),
    ({"model": {"gpt": {"moe_every": 5}}}, "model.gpt.moe_every"),
    ({"model": {"gpt": {"dropout": 1.0}}}, "model.gpt.dropout"),
    ({"model": {"gpt": {"bogus": 1}}}, "model.gpt.bogus"),
    ({"gate": {"kind": "softmax"}}, "gate.kind"),
    ({"model": {"arch": "gpt"}, "scaling": {"num_workers": 2, "expert_parallel": 2}}, "scaling.expert_parallel"),
])
def test_bad_model_settings_name_the_field(text_file, patch, path):
    raw = _raw(text_file)
    for section, values in patch.items():
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(raw.get(section, {}).get(key), dict):
                raw[section][key] = {**raw[section][key], **value}
            else:
                raw.setdefault(section, {})[key] = value
    if path == "model.gpt.positions" and patch["model"]["gpt"].get("dim") == 24:
        load_experiment(raw=raw)  # the even head dim is accepted
        return
    with pytest.raises(ConfigError) as err:
        load_experiment(raw=raw)
    assert err.value.path == path, str(err.value)
