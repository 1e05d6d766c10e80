"""`raymoe tune` end to end: real Ray (one shared local instance), real Optuna, real MLflow sqlite, real training
of tiny models on tiny Fashion-MNIST-format files (conftest.tiny_fmnist_root), 2 epochs, 1 worker per trial."""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raymoe.tune.driver import TRAIN_ENV_DEFAULTS, run_sweep
from raymoe.tune.sweep_load import load_sweep

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray instance for every sweep of this module (the resume test's subprocess driver joins it)."""
    import ray

    from raymoe.train.ray_session import ensure_ray

    with pytest.MonkeyPatch.context() as mp:
        for key, value in TRAIN_ENV_DEFAULTS.items():
            mp.setenv(key, value)
        started = ensure_ray(None, num_cpus_needed=2)
        yield ray.get_runtime_context().gcs_address
        if started:
            ray.shutdown()


def _preset(folder: Path, name: str, data_root: Path, **sections) -> None:
    raw = {"name": name, "data": {"name": "fashion_mnist", "root": str(data_root), "download": False},
           "model": {"num_experts": 3}, "train": {"epochs": 2, "batch_size": 64, "lr": 3e-3}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(raw))


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _children(client, parent_id: str) -> list:
    from raymoe.tune.mlflow_sweep import sweep_children

    return sweep_children(client, client.get_run(parent_id).info.experiment_id, parent_id)


def _steps(client, run_id: str, key: str = "test_error") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_grid_sweep_paper_table(tmp_path, tiny_fmnist_root, ray_address):
    """4 trials (2 method rows x 2 seeds): one FINISHED child per trial with per-epoch metrics, and the paper table
    and the seed table match a brute-force recomputation from the MLflow runs."""
    _preset(tmp_path, "orig", tiny_fmnist_root, gate={"kind": "softmax"})
    _preset(tmp_path, "att", tiny_fmnist_root, gate={"kind": "attentive"})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sweep_file = tmp_path / "grid.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "t_grid", "strategy": "grid", "seeds": 2, "max_concurrent_trials": 2,
        "rows": [{"method": "orig.yaml"}, {"method": "att.yaml", "grid": {"train.lr": [3e-3]}}],
        "tracking": {"uri": uri, "experiment": "t-grid"}}))
    outcome = run_sweep(load_sweep(sweep_file), storage_root=tmp_path / "sweeps", report_dir=tmp_path / "report",
                        shutdown=False)
    assert not outcome.interrupted and len(outcome.trials) == 4 and outcome.num_errors == 0

    client = _client(uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["raymoe.role"] == "sweep"
    children = _children(client, outcome.parent_run_id)
    assert len(children) == 4 and len({c.info.run_name for c in children}) == 4
    healthy = children
    for child in healthy:
        assert child.info.status == "FINISHED", child.data.tags.get("raymoe.failure_reason")
        assert child.data.tags["mlflow.parentRunId"] == outcome.parent_run_id
        assert _steps(client, child.info.run_id) == [1, 2]
        assert {"train_error", "mi_pred_bits", "sample_entropy_bits", "usage_entropy_bits"} <= set(child.data.metrics)

    report = outcome.report
    assert len(report.rows) == 4 and [r.index for r in report.rows] == [0, 1, 2, 3]
    by_category: dict[str, list] = {}
    for child in healthy:
        by_category.setdefault(child.data.tags["raymoe.category"], []).append(child)
    assert sorted(by_category) == ["att", "orig"]
    table = {row["category"]: row for row in report.paper_table}
    for category, members in by_category.items():
        pick = min(members, key=lambda c: c.data.metrics["train_error"])  # spec §4.5: lowest TRAINING error
        assert table[category]["run"] == pick.info.run_name
        assert table[category]["test_error"] == pytest.approx(pick.data.metrics["test_error"])
        assert table[category]["mi_pred_bits"] == pytest.approx(pick.data.metrics["mi_pred_bits"])
        expected_std = statistics.stdev(c.data.metrics["test_error"] for c in members)
        assert table[category]["test_error_std"] == pytest.approx(expected_std)
    seeds = {row["point"]: row for row in report.seed_table}
    assert sorted(seeds) == ["att[train.lr=0.003]", "orig"]
    for point, members in (("orig", by_category["orig"]), ("att[train.lr=0.003]", by_category["att"])):
        errors = [c.data.metrics["test_error"] for c in members]
        assert seeds[point]["n_seeds"] == 2
        assert seeds[point]["test_error_mean"] == pytest.approx(statistics.fmean(errors))
        assert seeds[point]["test_error_std"] == pytest.approx(statistics.stdev(errors))
    logged = {a.path for a in client.list_artifacts(outcome.parent_run_id, "report")}
    assert {"report/trials.csv", "report/trials.md", "report/paper_table.md", "report/seeds.csv",
            "report/parallel_coordinates.png", "report/metric_vs_trial.png"} <= logged
    assert (tmp_path / "report" / "paper_table.csv").is_file()


def _wait_for_finished_child(uri: str, sweep: str, proc: subprocess.Popen, log: Path, state_file: Path,
                             timeout: float) -> list:
    from mlflow.exceptions import MlflowException

    client, deadline = None, time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the sweep ended before it could be interrupted:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
        if client is None:  # opening a store the driver is still creating races its schema migration
            if not state_file.is_file():
                continue
            client = _client(uri)
        try:
            experiment_id = json.loads(state_file.read_text())["experiment_id"]
            found = client.search_runs([experiment_id], filter_string=f"tags.`raymoe.sweep` = '{sweep}' "
                                       "and tags.`raymoe.role` = 'trial'")
        except MlflowException:
            found = []  # the store is being created
        if any(r.info.status == "FINISHED" for r in found):
            return found
    raise AssertionError("no trial finished in time")


def test_killed_optuna_sweep_resumes_without_losing_or_duplicating_trials(tmp_path, tiny_fmnist_root,
                                                                          ray_address):
    """The driver is SIGKILLed after the first trial finished; --resume finishes the sweep: one child per trial,
    the finished child kept, the Optuna study continued (4 points in total, the warm-start points first).
    Failing trials do not stop the sweep: start point 2 is an invalid combination (top_k 3 > 2 experts), start
    point 3 diverges (lr 1e30 -> NaN loss); both children are FAILED with the reason."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    base = {"name": "r", "data": {"name": "fashion_mnist", "root": str(tiny_fmnist_root), "download": False},
            "model": {"num_experts": 3}, "train": {"epochs": 2, "batch_size": 64}}
    sweep_file = tmp_path / "resume.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "t_resume", "base": base, "num_samples": 4, "max_concurrent_trials": 2, "sampler_seed": 1,
        "space": {"gate.kind": {"type": "categorical", "choices": ["softmax", "attentive", "topk"]},
                  "gate.top_k": {"type": "int", "low": 1, "high": 3, "when": {"gate.kind": "topk"}},
                  "model.num_experts": {"type": "categorical", "choices": [2, 3]},
                  "train.lr": {"type": "categorical", "choices": [3e-3, 1e-2, 1e30]}},
        "start_points": [{"gate.kind": "softmax", "model.num_experts": 3, "train.lr": 3e-3},
                         {"gate.kind": "topk", "gate.top_k": 3, "model.num_experts": 2, "train.lr": 3e-3},
                         {"gate.kind": "attentive", "model.num_experts": 3, "train.lr": 1e30}],
        "scheduler": {"asha": {"grace_period": 1, "reduction_factor": 2}},
        "tracking": {"uri": uri, "experiment": "t-resume"}}))
    storage = tmp_path / "sweeps"
    env = dict(os.environ, RAY_ADDRESS=ray_address, **TRAIN_ENV_DEFAULTS)
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "raymoe.cli", "tune", str(sweep_file), "--storage",
                                 str(storage)], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        before = _wait_for_finished_child(uri, "t_resume", proc, log, storage / "t_resume" / "raymoe_sweep.json",
                                          timeout=150)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished_before = {r.info.run_name: r.info.run_id for r in before if r.info.status == "FINISHED"}

    outcome = run_sweep(load_sweep(sweep_file), resume=True, storage_root=storage, report_dir=tmp_path / "report",
                        shutdown=False)
    assert not outcome.interrupted and len(outcome.trials) == 4
    client = _client(uri)
    children = _children(client, outcome.parent_run_id)
    trial_ids = sorted(t[0] for t in outcome.trials)
    assert sorted(c.data.tags["raymoe.trial_id"] for c in children) == trial_ids  # one child per trial, no extras
    for name, run_id in finished_before.items():  # finished before the kill: the same run, not a new one
        assert [c.info.run_id for c in children if c.info.run_name == name] == [run_id]
    for child in children:
        params = json.loads(child.data.tags["raymoe.sweep_params"])
        invalid = params["gate.kind"] == "topk" and params["gate.top_k"] > params["model.num_experts"]
        reason = child.data.tags.get("raymoe.failure_reason", "")
        if invalid:
            assert child.info.status == "FAILED"
            assert "invalid config" in reason and "gate.top_k" in reason
        elif params["train.lr"] > 1:
            assert child.info.status == "FAILED" and "loss" in reason.lower(), reason
        else:
            assert child.info.status == "FINISHED", child.data.tags.get("raymoe.failure_reason")
            assert _steps(client, child.info.run_id)[0] == 1  # ASHA may stop a trial after epoch 1
    points = sorted(c.data.tags["raymoe.point"] for c in children)
    assert points == ["p0000", "p0001", "p0002", "p0003"]

    state = sorted((storage / "t_resume").glob("searcher-state-*.pkl"))[-1]
    searcher = pickle.loads(state.read_bytes())
    study = searcher["inner"]._ot_study
    assert len(study.trials) == 4  # continued, not restarted
    assert study.trials[0].params == {"gate.kind": "softmax", "model.num_experts": 3, "train.lr": 3e-3}
    assert study.trials[1].params["gate.top_k"] == 3 and study.trials[2].params["train.lr"] == 1e30
    assert all(t.state.name in ("COMPLETE", "FAIL") for t in study.trials)
    assert any(math.isfinite(t.value) for t in study.trials if t.state.name == "COMPLETE")
