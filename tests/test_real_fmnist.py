"""The paper's Fashion-MNIST attentive MoE on the real data (Debian's dataset-fashion-mnist): one epoch on a
20k-image training subset, evaluated on the full 10k test set, must reach a sane accuracy (> 70%).

The paper's tiny experts (one 3x3 filter each) need a few hundred Adam steps to pass 70%, so this one epoch uses
batch 64 and lr 2e-3 (313 steps); with the paper's batch 512 one epoch of 10k images is only 20 steps (~45%).
On CPU the run is deterministic, so its outcome is fixed (test error ~0.21 for seed 2 here).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from raymoe.config.load import load_experiment
from raymoe.train.run_spec import make_run_spec

SYSTEM_COPY = Path("/usr/share/datasets/fashion-mnist")
PRESET = Path(__file__).resolve().parents[1] / "tune_configs" / "paper" / "fmnist" / "attentive.yaml"

pytestmark = pytest.mark.skipif(not (SYSTEM_COPY / "train-images-idx3-ubyte.gz").is_file(),
                                reason="Debian's dataset-fashion-mnist is not installed")


def test_one_epoch_attentive_moe_on_real_fashion_mnist(tmp_path, monkeypatch, restore_torch_state):
    from raymoe.train.loop import train_fn

    monkeypatch.chdir(tmp_path)
    overrides = {"name": "real-fmnist", "data.root": None, "data.download": False,
                 "seed": 2, "data.train_limit": 20000, "data.test_limit": None, "train.epochs": 1,
                 "train.batch_size": 64, "train.lr": 2e-3, "train.progress": False,
                 "train.device": "cpu", "tracking.enabled": False}
    if PRESET.is_file():
        cfg = load_experiment(PRESET, overrides)
    else:
        cfg = load_experiment(raw={"name": "x", "gate": {"kind": "attentive"}, "model": {"hidden_size": 32}},
                              overrides=overrides)
    assert (cfg.data.name, cfg.gate.kind, cfg.model.num_experts, cfg.model.hidden_size) == (
        "fashion_mnist", "attentive", 5, 32)
    metrics = train_fn(make_run_spec(cfg))
    assert metrics["test_error"] < 0.30, metrics
    assert 0.0 <= metrics["usage_entropy_bits"] <= 2.33  # log2 5
