"""Step settings (train.*): the lr schedule, gradient accumulation, clipping by the global norm, bf16 autocast,
each against a hand-worked value or the plain computation it must equal."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from raymoe.config.load import load_experiment
from raymoe.models.build import build_model
from raymoe.parallel.context import DistContext
from raymoe.runtime import bf16_supported
from raymoe.train.schedule import lr_at
from raymoe.train.step import StepSettings, train_epoch


def test_schedule_hand_values():
    kw = dict(lr=1.0, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [lr_at(s, schedule="cosine", **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(9, schedule="cosine", **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert lr_at(14, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(100, schedule="cosine", **kw) == pytest.approx(0.1)  # held at the floor after the budget
    assert lr_at(2, schedule="constant", **kw) == 0.75 and lr_at(50, schedule="constant", **kw) == 1.0


def _single(seed: int = 0):
    cfg = load_experiment(raw={"name": "s", "data": {"name": "fashion_mnist"}, "model": {"arch": "single"}})
    torch.manual_seed(seed)
    return cfg, build_model(cfg, 10, 1, 28)


def _batch(n: int = 32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(10, (n,), generator=g)


def _one_step(model, cfg, settings: StepSettings, lr: float = 0.0):
    x, y = _batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    result = train_epoch(model, optimizer, [(x, y)], reg_cfg=cfg.regularizer, ctx=DistContext(), epoch=1,
                         num_samples=len(y), batch_size=len(y), settings=settings)
    return result, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_accumulation_equals_one_big_batch():
    cfg, model = _single()
    twin = copy.deepcopy(model)
    whole, g_whole = _one_step(model, cfg, StepSettings())
    parts, g_parts = _one_step(twin, cfg, StepSettings(accum_steps=4))
    assert parts.loss == pytest.approx(whole.loss, rel=1e-6) and parts.error == whole.error
    for name in g_whole:
        torch.testing.assert_close(g_parts[name], g_whole[name], rtol=1e-5, atol=1e-7)


def test_clipping_scales_to_the_global_norm():
    cfg, model = _single()
    twin = copy.deepcopy(model)
    _, plain = _one_step(model, cfg, StepSettings())
    norm = torch.cat([g.flatten() for g in plain.values()]).norm().item()
    result, clipped = _one_step(twin, cfg, StepSettings(grad_clip=norm / 4))
    assert result.grad_norm == pytest.approx(norm, rel=1e-5)
    for name in plain:
        torch.testing.assert_close(clipped[name], plain[name] / 4, rtol=1e-4, atol=1e-8)
    _, untouched = _one_step(copy.deepcopy(model), cfg, StepSettings(grad_clip=norm * 10))  # below the bound
    for name in plain:
        torch.testing.assert_close(untouched[name], plain[name], rtol=1e-6, atol=0)


def test_schedule_sets_the_lr_of_each_step():
    cfg, model = _single()
    seen = []
    result, _ = _one_step(model, cfg, StepSettings(lr_at=lambda step: seen.append(step) or 0.5 * (step + 1)))
    assert seen == [0] and result.lr == 0.5


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no bf16 arithmetic")
@pytest.mark.parametrize("arch", ["single", "moe"])
def test_bf16_step_runs_in_bf16_and_tracks_fp32(arch):
    raw = {"name": "b", "data": {"name": "fashion_mnist"}, "model": {"arch": arch}}
    cfg = load_experiment(raw={**raw, "gate": {"kind": "attentive"}} if arch == "moe" else raw)
    torch.manual_seed(0)
    model = build_model(cfg, 10, 1, 28)
    twin = copy.deepcopy(model)
    fp32, g32 = _one_step(model, cfg, StepSettings())
    bf16, g16 = _one_step(twin, cfg, StepSettings(precision="bf16"))
    assert bf16.loss != fp32.loss and bf16.loss == pytest.approx(fp32.loss, rel=2e-2)
    assert all(p.dtype == torch.float32 for p in twin.parameters())  # float32 master weights
    assert all(g.dtype == torch.float32 for g in g16.values())
