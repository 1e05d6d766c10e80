"""`raymoe train` end to end on a tiny data set in the real Fashion-MNIST IDX format.

Everything is read back from the MLflow sqlite store with MlflowClient (not from return values): one run per
run name, FINISHED, params, per-epoch metrics, figures, config and environment; re-runs resume, --fresh starts
over (bit-identical metrics on CPU), a NaN loss fails the run with its reason, a checkpoint from another
architecture is refused before any run is created.
"""

from __future__ import annotations

import json

import shutil
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import ViewType

from raymoe.cli import main
from raymoe.config.load import load_experiment
from raymoe.train.identity import run_name

PER_EPOCH = ("train_loss", "train_error", "val_error", "val_loss", "test_error", "test_loss", "mi_true_bits",
             "mi_pred_bits", "sample_entropy_bits", "usage_entropy_bits", "importance_cv", "epoch_seconds", "samples_per_s")
FIGURES = ("figures/expert_class_true.png", "figures/expert_class_pred.png", "figures/expert_usage.png",
           "figures/exemplars.png",
           "figures/gate_entropy.png", "figures/load_over_training.png", "figures/routing_stability.png")


def _experiment(root: Path, name: str = "tiny", **sections) -> dict:
    raw = {"name": name, "seed": 1,
           "data": {"name": "fashion_mnist", "root": str(root), "download": False},
           "model": {"num_experts": 3},
           "gate": {"kind": "attentive"},
           "regularizer": {"importance": 0.1},
           "train": {"epochs": 2, "batch_size": 64, "eval_batch_size": 64, "progress": False, "device": "cpu"},
           "tracking": {"experiment": "e2e"}}
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _runs(client: MlflowClient, view=ViewType.ACTIVE_ONLY, name: str | None = None) -> list:
    experiment = client.get_experiment_by_name("e2e")
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], run_view_type=view)
    return [r for r in runs if name is None or r.data.tags.get("raymoe.run_name") == name]


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture
def workdir(tmp_path, monkeypatch, restore_torch_state):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _check_native_mlflow_objects(client, run) -> None:
    """What MLflow's own UI shows: model-training experiment kind, the dataset inputs per split, the model (it
    loads back and predicts like the run's final model would), system metrics."""
    import mlflow.pytorch
    import torch

    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["test", "train", "val"]
    assert inputs["train"].name == "fashion_mnist-train" and len({d.digest for d in inputs.values()}) == 1
    sizes = {split: json.loads(d.profile)["num_rows"] for split, d in inputs.items()}
    assert sizes == {"train": 230, "val": 26, "test": 128}  # 256 training images: 10% held out per class
    (logged,) = client.search_logged_models([run.info.experiment_id])
    assert logged.source_run_id == run.info.run_id
    model = mlflow.pytorch.load_model(logged.model_uri)
    out = model(torch.zeros(2, 1, 28, 28))
    assert out.log_probs_BC.shape == (2, 10)
    from raymoe.train.checkpoint import load_full_state

    final, _ = load_full_state(sorted((Path("checkpoints") / run.data.tags["raymoe.run_name"]).glob("epoch_*"))[-1])
    logged_state = model.state_dict()
    assert set(final) <= set(logged_state) and all(torch.equal(final[k], logged_state[k]) for k in final)
    assert any(key.startswith("system/cpu_utilization") for key in client.get_run(run.info.run_id).data.metrics)


def test_train_logs_one_run_resumes_and_fresh_restarts(workdir, tiny_fmnist_root, capsys):
    config = _write(workdir / "tiny.yaml", _experiment(tiny_fmnist_root))
    name = run_name(load_experiment(config))
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")

    assert main(["train", str(config), "--set", "train.progress=true", "--set", "tracking.system_metrics_s=0.2"]) == 0
    out = capsys.readouterr().out
    assert "resuming" not in out and "val error" in out and "test error" in out and "raymoe ui" in out
    (run,) = _runs(client)
    _check_native_mlflow_objects(client, run)
    assert run.info.status == "FINISHED" and run.data.tags["raymoe.run_name"] == name
    assert run.info.run_id in out
    params = run.data.params
    assert params["train.epochs"] == "2" and params["gate.kind"] == "attentive" and params["model.num_experts"] == "3"
    assert params["regularizer.importance"] == "0.1" and params["data.root"] == str(tiny_fmnist_root)
    assert len(params) > 40  # the full resolved config, flattened
    for key in PER_EPOCH:
        assert [s for s, _ in _history(client, run.info.run_id, key)] == [1, 2], key
    assert [s for s, _ in _history(client, run.info.run_id, "reg_importance")] == [1, 2]
    for key in ("max_load_share", "dead_expert_frac", "load_share/0", "load_share/2"):  # the observatory
        assert [s for s, _ in _history(client, run.info.run_id, key)] == [1, 2], key
    shares = [dict(_history(client, run.info.run_id, f"load_share/{j}"))[2] for j in range(3)]
    assert sum(shares) == pytest.approx(1.0)
    (churn,) = _history(client, run.info.run_id, "routing_churn")  # needs an earlier evaluation: epoch 2 only
    assert churn[0] == 2 and 0.0 <= churn[1] <= 1.0
    test_errors = _history(client, run.info.run_id, "test_error")
    assert all(0.0 <= v <= 1.0 for _, v in test_errors)
    tags = run.data.tags
    assert tags["raymoe.env.torch_version"] == metadata.version("torch")
    assert tags["raymoe.env.device"] == "cpu" and "raymoe.env.git_commit" in tags
    local = Path(client.download_artifacts(run.info.run_id, "", str(workdir / "artifacts")))
    for figure in FIGURES:
        assert (local / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
    assert (local / "config" / "tiny.yaml").read_text() == config.read_text()
    assert "torch_version" in (local / "environment.json").read_text()
    assert (workdir / "checkpoints" / name / "epoch_0002").is_dir()

    # Same config again: resumes, finds the run finished, adds nothing.
    assert main(["train", str(config)]) == 0
    assert f"resuming {name} from epoch 2" in capsys.readouterr().out
    (again,) = _runs(client)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert _history(client, run.info.run_id, "test_error") == test_errors

    # More epochs continue the same run (epochs are not part of the run identity).
    assert main(["train", str(config), "--set", "train.epochs=3"]) == 0
    assert f"resuming {name} from epoch 2" in capsys.readouterr().out
    (longer,) = _runs(client)
    assert longer.info.run_id == run.info.run_id
    resumed_errors = _history(client, run.info.run_id, "test_error")
    assert [s for s, _ in resumed_errors] == [1, 2, 3] and resumed_errors[:2] == test_errors

    # --fresh: a new run replaces the old one (soft-deleted) and, trained uninterrupted for 3 epochs, matches
    # the interrupted-and-resumed run exactly (per-epoch data order and noise depend only on seed and epoch).
    assert main(["train", str(config), "--fresh", "--set", "train.epochs=3"]) == 0
    assert "resuming" not in capsys.readouterr().out
    (fresh,) = _runs(client)
    assert fresh.info.run_id != run.info.run_id and fresh.info.status == "FINISHED"
    assert client.get_run(run.info.run_id).info.lifecycle_stage == "deleted"
    assert _history(client, fresh.info.run_id, "test_error") == resumed_errors
    assert _history(client, fresh.info.run_id, "train_loss") == _history(client, run.info.run_id, "train_loss")


def test_ui_command_points_mlflow_at_the_absolute_store(tmp_path, monkeypatch):
    from raymoe.tracking.ui_command import ui_command_line

    monkeypatch.chdir(tmp_path)
    command = ui_command_line("sqlite:///mlflow.db", 5077)
    assert command[1:4] == ["-m", "mlflow", "ui"]
    assert command[command.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert command[command.index("--host") + 1] == "127.0.0.1" and command[command.index("--port") + 1] == "5077"


def test_nan_loss_stops_with_clear_message_and_failed_run(workdir, tiny_fmnist_root, capsys):
    config = _write(workdir / "nan.yaml", _experiment(tiny_fmnist_root, "diverge", train={"lr": 1e30}))
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    code = main(["train", str(config)])
    err = capsys.readouterr().err
    assert code == 1
    assert "loss became NaN at epoch 1 step" in err and "lr=1e+30" in err
    (run,) = _runs(client)
    assert run.info.status == "FAILED"
    assert "loss became NaN at epoch 1 step" in run.data.tags["raymoe.failure_reason"]


def test_checkpoint_from_another_architecture_is_refused(workdir, tiny_fmnist_root, capsys):
    softmax = _experiment(tiny_fmnist_root, "arch", gate={"kind": "softmax"}, train={"epochs": 1},
                          tracking={"enabled": False})
    config = _write(workdir / "softmax.yaml", softmax)
    assert main(["train", str(config)]) == 0
    trained = workdir / "checkpoints" / run_name(load_experiment(config))
    capsys.readouterr()

    # Distilling needs an attentive-gate checkpoint: refused before anything starts, exit code 2.
    distill = _write(workdir / "distill.yaml", _experiment(
        tiny_fmnist_root, "distilled", gate={"kind": "softmax"}, train={"distill_from": str(trained), "epochs": 1}))
    assert main(["train", str(distill)]) == 2
    err = capsys.readouterr().err
    assert "train.distill_from" in err and "attentive" in err

    # A checkpoint of 3 softmax experts where a 4-expert run expects its own: refused, no MLflow run created.
    other = _write(workdir / "other.yaml", _experiment(tiny_fmnist_root, "arch", gate={"kind": "softmax"},
                                                       model={"num_experts": 4}))
    target = workdir / "checkpoints" / run_name(load_experiment(other))
    shutil.copytree(trained, target)
    assert main(["train", str(other)]) == 2
    err = capsys.readouterr().err
    assert "another architecture" in err and "--fresh" in err
    assert _runs(MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}"), ViewType.ALL) == []
