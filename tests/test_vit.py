"""ViT-MoE: shapes and ModelOutput fields, presets load and run, invalid router combinations are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raymoe.config.load import load_experiment
from raymoe.errors import ConfigError
from raymoe.models.vit import build_vit
from raymoe.moe.token.layer import TokenMoE

PRESETS = sorted(Path(__file__).resolve().parents[1].glob("tune_configs/vit/*.yaml"))
TINY_VIT = {"dim": 16, "depth": 2, "heads": 2, "mlp_dim": 16, "moe_every": 2, "patch_size": 7}


def _cfg(gate: dict, vit: dict | None = None, **extra):
    return load_experiment(raw={"name": "v", "model": {"arch": "vit_moe", "num_experts": 4,
                                                        "vit": {**TINY_VIT, **(vit or {})}},
                                "gate": gate, **extra})


@pytest.mark.parametrize("pool, tokens", [("cls", 17), ("mean", 16)])
def test_vit_forward_backward_shapes_on_fmnist_input(pool, tokens):
    torch.manual_seed(0)
    cfg = _cfg({"kind": "topk", "top_k": 2, "capacity_factor": 1.0}, {"pool": pool, "depth": 4})
    model = build_vit(cfg, num_classes=10, in_channels=1, image_size=28)
    x = torch.randn(3, 1, 28, 28)
    out = model(x)
    assert out.log_probs_BC.shape == (3, 10)
    torch.testing.assert_close(out.log_probs_BC.exp().sum(-1), torch.ones(3))
    assert out.items_per_sample == tokens  # 4x4 patches (+ the class token, which is routed too)
    assert len(out.gates) == len(out.layer_stats) == 2  # blocks 1 and 3
    for gate, stats in zip(out.gates, out.layer_stats):
        assert gate.probs_NE.shape == gate.logits_NE.shape == (3 * tokens, 4)
        assert gate.experts_NK.shape == gate.weights_NK.shape == (3 * tokens, 2)
        assert stats["load_E"].shape == (4,) and stats["load_E"].sum() == (gate.experts_NK >= 0).sum()
        assert 0 <= stats["dropped_frac"].item() < 1
    assert out.selected_pred_B is None and out.aux_loss is None
    out.log_probs_BC[:, 0].sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name


def test_moe_blocks_follow_moe_every_and_dense_blocks_elsewhere():
    cfg = _cfg({"kind": "noisy_topk", "top_k": 1}, {"depth": 6, "moe_every": 3})
    model = build_vit(cfg, num_classes=10, in_channels=1, image_size=28)
    assert [isinstance(b.ffn, TokenMoE) for b in model.blocks] == [False, False, True, False, False, True]


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(1)
    cfg = _cfg({"kind": "topk", "top_k": 1, "capacity_factor": 1.5})
    model = build_vit(cfg, num_classes=4, in_channels=1, image_size=28)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 4, (16,))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.nll_loss(model(x).log_probs_BC, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_load_build_and_run(path):
    cfg = load_experiment(path)
    assert cfg.model.arch == "vit_moe" and cfg.model.num_experts == 8
    assert cfg.tracking.experiment == "vit-routers"
    color = cfg.data.name.startswith("cifar")
    model = build_vit(cfg, num_classes=10, in_channels=3 if color else 1, image_size=32 if color else 28)
    model.train()
    out = model(torch.randn(2, 3 if color else 1, 32 if color else 28, 32 if color else 28))
    out.log_probs_BC.sum().backward()
    assert len(out.gates) == cfg.model.vit.depth // cfg.model.vit.moe_every


def test_presets_cover_the_router_comparison():
    names = {p.stem for p in PRESETS}
    assert {"fmnist_switch", "fmnist_gshard", "fmnist_hypermoe", "fmnist_expert_choice", "fmnist_shared",
            "fmnist_auxfree", "cifar10_switch"} <= names
    switch = load_experiment(Path(PRESETS[0]).parent / "fmnist_switch.yaml")
    assert (switch.gate.kind, switch.gate.top_k, switch.gate.capacity_factor) == ("topk", 1, 1.25)
    assert (switch.regularizer.load_balance, switch.regularizer.z_loss) == (0.01, 0.001)
    auxfree = load_experiment(Path(PRESETS[0]).parent / "fmnist_auxfree.yaml")
    assert auxfree.gate.bias_balance_rate > 0 and auxfree.regularizer.load_balance == 0


@pytest.mark.parametrize(
    "gate, vit, extra, path",
    [
        ({"kind": "expert_choice"}, {"causal": True}, {}, "gate.kind"),
        ({"kind": "expert_choice", "hypermoe": {"enabled": True}}, {}, {}, "gate.hypermoe.enabled"),
        ({"kind": "topk", "top_k": 5}, {}, {}, "gate.top_k"),
        ({"kind": "topk", "capacity_factor": 0.0}, {}, {}, "gate.capacity_factor"),
        ({"kind": "topk", "capacity_factor": -1.0}, {}, {}, "gate.capacity_factor"),
        ({"kind": "softmax"}, {}, {}, "gate.kind"),
        ({"kind": "expert_choice", "bias_balance_rate": 0.01}, {}, {}, "gate.bias_balance_rate"),
        ({"kind": "topk"}, {"moe_every": 3}, {}, "model.vit.moe_every"),
        ({"kind": "topk"}, {}, {"regularizer": {"sample_similarity": {"beta_s": 0.1}}},
         "regularizer.sample_similarity"),
        ({"kind": "attentive"}, {}, {"scaling": {"num_workers": 2, "expert_parallel": 2}}, "scaling.expert_parallel"),
    ],
)
def test_invalid_token_router_combinations_name_the_field(gate, vit, extra, path):
    with pytest.raises(ConfigError) as info:
        _cfg(gate, vit, **extra)
    assert info.value.path == path
