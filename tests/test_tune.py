"""`raymoe tune` end to end: real Ray (one shared local instance), real Optuna, real MLflow sqlite, real training
of tiny models on tiny Fashion-MNIST-format files (conftest.tiny_fmnist_root), 2 epochs, 1 worker per trial."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raymoe.train.ray_launch import SNAPSHOT
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
    from raymoe.tracking.sweep_runs import sweep_children

    return sweep_children(client, client.get_run(parent_id).info.experiment_id, parent_id)


def _steps(client, run_id: str, key: str = "test_error") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_grid_sweep_end_to_end(tmp_path, tiny_fmnist_root, ray_address, capsys):
    """A grid row x 2 seeds on real Ray, each trial a TorchTrainer run (launcher ray_train): one FINISHED child
    per trial (parentRunId, per-epoch metrics, its grid value as a param), the report's seed and paper tables
    built from them, logged on the parent, and `raymoe report NAME` finds the sweep again through its folder."""
    _preset(tmp_path, "att", tiny_fmnist_root, gate={"kind": "attentive"})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sweep_file = tmp_path / "grid.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "t_grid", "strategy": "grid", "seeds": 2, "max_concurrent_trials": 2,
        "rows": [{"method": "att.yaml", "grid": {"regularizer.importance": [0.5]}}],
        "resources": {"launcher": "ray_train"}, "tracking": {"uri": uri, "experiment": "t-grid"}}))
    outcome = run_sweep(load_sweep(sweep_file), storage_root=tmp_path / "sweeps", report_dir=tmp_path / "report",
                        shutdown=False)
    assert not outcome.interrupted and len(outcome.trials) == 2 and outcome.num_errors == 0

    client = _client(uri)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["raymoe.role"] == "sweep"
    children = _children(client, outcome.parent_run_id)
    assert len(children) == 2 and len({c.info.run_name for c in children}) == 2
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags.get("raymoe.failure_reason")
        assert child.data.tags["mlflow.parentRunId"] == outcome.parent_run_id
        assert float(child.data.params["regularizer.importance"]) == 0.5
        assert _steps(client, child.info.run_id) == [1, 2]
        assert {"train_error", "mi_pred_bits", "sample_entropy_bits", "usage_entropy_bits"} <= set(child.data.metrics)
        assert (tmp_path / "sweeps" / "t_grid" / "train" / child.info.run_name / SNAPSHOT).is_file()  # Ray Train ran
    assert sorted(int(c.data.params["seed"]) for c in children) == [0, 1]

    report = outcome.report
    assert [r.index for r in report.rows] == [0, 1]
    (seed_row,) = report.seed_table
    errors = [c.data.metrics["test_error"] for c in children]
    assert seed_row["point"] == "att[regularizer.importance=0.5]" and seed_row["n_seeds"] == 2
    assert seed_row["test_error_mean"] == pytest.approx(statistics.fmean(errors))
    (paper_row,) = report.paper_table
    pick = min(children, key=lambda c: c.data.metrics["train_error"])
    assert paper_row["run"] == pick.info.run_name
    assert paper_row["test_error_std"] == pytest.approx(statistics.stdev(errors))
    logged = {a.path for a in client.list_artifacts(outcome.parent_run_id, "report")}
    assert {"report/trials.csv", "report/trials.md", "report/paper_table.md", "report/seeds.csv",
            "report/parallel_coordinates.png", "report/metric_vs_trial.png"} <= logged
    assert "raymoe.best_run_id" in client.get_run(outcome.parent_run_id).data.tags

    from raymoe.cli import main as cli_main

    out = tmp_path / "again"
    assert cli_main(["report", "t_grid", "--storage", str(tmp_path / "sweeps"), "--out", str(out), "--no-log",
                     "--register", "t-grid-best"]) == 0
    printed = capsys.readouterr().out
    assert "paper table" in printed and all(c.info.run_name in printed for c in children)
    (version,) = client.search_model_versions("name='t-grid-best'")
    best_run = outcome.report.best[0]
    assert version.run_id == best_run.run_id
    assert f"registered t-grid-best version 1 (trial {best_run.run_name})" in printed
    assert cli_main(["report", "t_grid", "--storage", str(tmp_path / "sweeps"), "--register", "a/b"]) == 2
    assert "--register" in capsys.readouterr().err
    assert (out / "trials.csv").read_text().count("\n") == 1 + 2


def test_staged_grid_distills_from_the_best_run_of_another_row(tmp_path, tiny_fmnist_root, ray_address):
    """A distilled row takes train.distill_from from the attentive row's run with the lowest training error
    (found by the driver when stage 1 starts, not typed by hand); a resume of the finished sweep restores both
    stages and runs nothing again; a dependency that left no finished run stops the sweep before its dependants
    start, with the field named and the parent FAILED."""
    from raymoe.errors import ConfigError

    _preset(tmp_path, "att", tiny_fmnist_root, gate={"kind": "attentive"}, train={"epochs": 1})
    _preset(tmp_path, "dist", tiny_fmnist_root, train={"epochs": 1, "distill_from": "SET-ME"})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    raw = {"name": "t_staged", "strategy": "grid", "seeds": 2, "max_concurrent_trials": 2, "metric": "train_error",
           "rows": [{"method": "dist.yaml", "overrides": {"train.distill_from": {"best_of": "att"}}},
                    {"method": "att.yaml"}],
           "tracking": {"uri": uri, "experiment": "t-staged"}}
    sweep_file = tmp_path / "staged.yaml"
    sweep_file.write_text(yaml.safe_dump(raw))
    storage = tmp_path / "sweeps"
    outcome = run_sweep(load_sweep(sweep_file), storage_root=storage, report_dir=tmp_path / "report", shutdown=False)
    assert not outcome.interrupted and len(outcome.trials) == 4 and outcome.num_errors == 0
    client = _client(uri)
    children = _children(client, outcome.parent_run_id)
    att = [c for c in children if c.data.tags["raymoe.category"] == "att"]
    dist = [c for c in children if c.data.tags["raymoe.category"] == "dist"]
    assert len(att) == 2 and len(dist) == 2 and all(c.info.status == "FINISHED" for c in children)
    best = min(att, key=lambda c: (c.data.metrics["train_error"], int(c.data.tags["raymoe.trial_index"])))
    sources = {c.data.params["train.distill_from"] for c in dist}
    assert len(sources) == 1
    (source,) = sources
    assert Path(source).is_dir() and best.data.tags["raymoe.trial_id"] in source  # that trial's own checkpoint
    assert all(d.info.start_time >= max(a.info.end_time for a in att) for d in dist)  # stage 1 after stage 0
    assert {r["category"] for r in outcome.report.paper_table} == {"att", "dist"}

    again = run_sweep(load_sweep(sweep_file), resume=True, storage_root=storage, report_dir=tmp_path / "r2",
                      shutdown=False)
    assert sorted(again.trials) == sorted(outcome.trials)
    assert len(_children(client, outcome.parent_run_id)) == 4

    _preset(tmp_path, "att", tiny_fmnist_root, gate={"kind": "attentive"}, train={"epochs": 1, "lr": 1e30})
    sweep_file.write_text(yaml.safe_dump(dict(raw, name="t_staged_fail", seeds=1)))
    with pytest.raises(ConfigError) as info:
        run_sweep(load_sweep(sweep_file), storage_root=storage, shutdown=False)
    assert info.value.path == "rows[0].overrides.train.distill_from.best_of" and info.value.value == "att"
    parent = client.search_runs([client.get_experiment_by_name("t-staged").experiment_id],
                                filter_string="tags.`raymoe.sweep` = 't_staged_fail' and tags.`raymoe.role` = 'sweep'")
    assert [p.info.status for p in parent] == ["FAILED"]
    assert not (storage / "t_staged_fail" / "stage-1").exists()


def test_collapse_stopper_ends_a_collapsed_trial_and_the_sweep_goes_on(tmp_path, tiny_fmnist_root, ray_address):
    """stop_on: a row whose routing is collapsed by construction (one expert: usage entropy 0) is stopped after its
    first evaluation and its MLflow run says why; the healthy row trains all its epochs; the sweep reports."""
    _preset(tmp_path, "one", tiny_fmnist_root, model={"num_experts": 1}, train={"epochs": 3})
    _preset(tmp_path, "three", tiny_fmnist_root, regularizer={"importance": 1.0}, train={"epochs": 3})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sweep_file = tmp_path / "stop.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "t_stop", "strategy": "grid", "metric": "train_error", "max_concurrent_trials": 2,
        "rows": [{"method": "one.yaml"}, {"method": "three.yaml"}],
        "stop_on": {"metric": "usage_entropy_bits", "below": 0.01, "after": 1},
        "tracking": {"uri": uri, "experiment": "t-stop"}}))
    outcome = run_sweep(load_sweep(sweep_file), storage_root=tmp_path / "sweeps", report_dir=tmp_path / "report",
                        shutdown=False)
    assert not outcome.interrupted and outcome.num_errors == 0 and outcome.report is not None
    client = _client(uri)
    children = {c.data.tags["raymoe.category"]: c for c in _children(client, outcome.parent_run_id)}
    one, three = children["one"], children["three"]
    assert "routing collapsed: usage_entropy_bits = 0 < 0.01" in one.data.tags["raymoe.stopped_reason"]
    assert one.info.status == "FINISHED" and one.data.tags.get("raymoe.stopped_early") == "true"
    assert _steps(client, one.info.run_id) == [1]
    assert three.info.status == "FINISHED" and "raymoe.stopped_reason" not in three.data.tags
    assert _steps(client, three.info.run_id) == [1, 2, 3]


def test_paper_table_from_hand_made_runs(tmp_path):
    """The report on a hand-filled MLflow store: per category the FINISHED run with the lowest TRAINING error
    (not the lowest test error), the std of test error over the whole category (ddof 1), mean +- std per point."""
    from mlflow import MlflowClient

    from raymoe.tune.report import build_report

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("hand", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, run_name="h", tags={"raymoe.sweep": "h", "raymoe.role": "sweep",
                                                       "raymoe.strategy": "grid"}).info.run_id
    client.log_param(parent, "metric", "test_error")
    client.log_param(parent, "mode", "min")
    runs = [  # category, point, seed, train_error, test_error, status
        ("orig", "orig", 0, 0.30, 0.20, "FINISHED"),
        ("orig", "orig", 1, 0.10, 0.40, "FINISHED"),   # lowest train error -> selected despite its test error
        ("imp", "imp[w=0.2]", 0, 0.25, 0.30, "FINISHED"),
        ("imp", "imp[w=0.2]", 1, 0.35, 0.10, "FINISHED"),
        ("imp", "imp[w=0.4]", 0, 0.05, 0.50, "FAILED"),  # failed runs never count
        ("imp", "imp[w=0.4]", 1, 0.20, 0.60, "FINISHED"),
    ]
    for i, (category, point, seed, train, test, status) in enumerate(runs):
        run = client.create_run(exp, run_name=f"h-{i}", tags={
            "mlflow.parentRunId": parent, "raymoe.trial_index": str(i), "raymoe.category": category,
            "raymoe.point": point, "raymoe.seed": str(seed), "raymoe.sweep_params": "{}"}).info.run_id
        for step, scale in ((1, 2.0), (2, 1.0)):  # the report reads the last epoch
            for key, value in (("train_error", train), ("test_error", test), ("mi_pred_bits", 1 - test),
                               ("sample_entropy_bits", 0.1), ("usage_entropy_bits", 2.0)):
                client.log_metric(run, key, value * scale, step=step)
        client.set_terminated(run, status)
    report = build_report(uri, None, "h", out_dir=tmp_path / "out", log_to_parent=False)
    table = {row["category"]: row for row in report.paper_table}
    assert table["orig"]["run"] == "h-1" and table["orig"]["test_error"] == pytest.approx(0.40)
    assert table["orig"]["mi_pred_bits"] == pytest.approx(0.60)
    assert table["orig"]["test_error_std"] == pytest.approx(math.sqrt(((0.2 - 0.3) ** 2 + (0.4 - 0.3) ** 2) / 1))
    assert table["imp"]["run"] == "h-5" and table["imp"]["n_runs"] == 3
    assert table["imp"]["test_error_std"] == pytest.approx(statistics.stdev([0.30, 0.10, 0.60]))
    # over the seeds of the selected point only (imp[w=0.4]: its FINISHED seed 1), and for orig both seeds
    assert table["imp"]["n_seeds"] == 1 and table["imp"]["test_error_mean"] == pytest.approx(0.60)
    assert math.isnan(table["imp"]["test_error_ci_lo"])  # one seed: no interval
    assert table["orig"]["test_error_mean"] == pytest.approx(0.30) and table["orig"]["test_error_seeds"] == "0.2;0.4"
    # two seeds: the bootstrap means are 0.2, 0.3 or 0.4 (p = 1/4, 1/2, 1/4): the 95% interval is [0.2, 0.4]
    assert (table["orig"]["test_error_ci_lo"], table["orig"]["test_error_ci_hi"]) == pytest.approx((0.2, 0.4))
    assert (tmp_path / "out" / "seeds_by_row.png").stat().st_size > 10_000
    seeds = {row["point"]: row for row in report.seed_table}
    assert seeds["imp[w=0.2]"]["test_error_mean"] == pytest.approx(0.20)
    assert seeds["imp[w=0.2]"]["test_error_std"] == pytest.approx(math.sqrt(0.02))
    assert seeds["imp[w=0.4]"]["n_seeds"] == 1 and math.isnan(seeds["imp[w=0.4]"]["test_error_std"])
    assert report.best[0].run_name == "h-3"  # lowest test error among finished runs
    assert [r.index for r in report.rows] == list(range(6))
    assert (tmp_path / "out" / "paper_table.md").read_text().count("\n| ") == 3  # header + 2 categories
    assert report.rows[0].curves["usage_entropy_bits"] == [(1, 4.0), (2, 2.0)]  # H_u per epoch for the figure
    assert (tmp_path / "out" / "usage_entropy_bits_over_epochs.png").stat().st_size > 10_000


def test_resources_no_node_can_hold_fail_fast(tmp_path, ray_address):
    """A worker bigger than any node: ConfigError naming `resources` with the numbers; no folder, no MLflow run."""
    from raymoe.errors import ConfigError

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sweep = load_sweep(raw={"name": "t_big", "base": {"name": "b"}, "resources": {"cpus_per_worker": 512},
                            "space": {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
                            "tracking": {"uri": uri, "experiment": "t-big"}})
    with pytest.raises(ConfigError) as info:
        run_sweep(sweep, storage_root=tmp_path / "sweeps", shutdown=False)
    assert info.value.path == "resources" and "512" in str(info.value)
    assert not (tmp_path / "sweeps").exists()
    client = _client(uri)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


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
    assert sorted(c.data.tags["raymoe.trial_id"] for c in children) == trial_ids, [  # one child per trial, no extras
        (c.info.run_name, c.info.status, c.data.tags.get("raymoe.failure_reason", "")[:80], c.info.start_time)
        for c in children]
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
    # one worker per trial: launcher auto trained in the trial processes (Tune checkpoints, no Ray Train runs)
    assert not list((storage / "t_resume" / "train").glob(f"*/{SNAPSHOT}"))

    # the study lives in sqlite beside the sweep: read it back the way optuna-dashboard does
    import optuna

    study = optuna.load_study(study_name="t_resume", storage=f"sqlite:///{storage / 't_resume' / 'optuna.db'}")
    states = [(t.number, t.state.name) for t in study.trials]
    # continued, not restarted: the 4 points, plus at most the points the killed driver had running (2 at once; left
    # RUNNING or closed as FAIL in the sqlite study; the resumed sweep ran them again as new trials)
    assert 4 <= len(study.trials) <= 4 + 2, states
    finished_children = [c for c in children if c.info.status == "FINISHED"]
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == len(finished_children), states
    done = [t for t in study.trials if t.state.name in ("COMPLETE", "FAIL")]
    assert study.trials[0].params == {"gate.kind": "softmax", "model.num_experts": 3, "train.lr": 3e-3}
    assert study.trials[1].params["gate.top_k"] == 3 and study.trials[2].params["train.lr"] == 1e30
    assert any(math.isfinite(t.value) for t in done if t.state.name == "COMPLETE")


@pytest.mark.skipif(not Path("/usr/share/games/fortunes").is_dir(), reason="Debian's fortunes is not installed")
def test_lm_routers_sweep_minimises_validation_loss(tmp_path, ray_address):
    """The shipped language-model sweep (Optuna on val_loss) runs end to end at a tiny size: every trial FINISHED
    with its validation metrics, and the report tabulates validation loss and bits per byte."""
    repo = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((repo / "tune_configs/sweeps/lm_routers.yaml").read_text())
    raw["base"] = str(repo / "tune_configs/lm/switch.yaml")
    raw["num_samples"] = 2
    raw["overrides"].update({"train.max_steps": 4, "train.eval_every": 2, "train.warmup_steps": 1,
                             "train.batch_size": 4, "model.gpt.dim": 16, "model.gpt.depth": 2, "model.gpt.heads": 2,
                             "model.gpt.mlp_dim": 16, "model.gpt.block_size": 16, "model.num_experts": 4,
                             "data.text.block_size": 16, "data.text.val_tokens": 256,
                             "data.root": str(tmp_path / "data"), "train.progress": False})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    raw["tracking"] = {"uri": uri, "experiment": "t-lm"}
    sweep_file = tmp_path / "lm_routers.yaml"
    sweep_file.write_text(yaml.safe_dump(raw))
    outcome = run_sweep(load_sweep(sweep_file), storage_root=tmp_path / "sweeps", report_dir=tmp_path / "report",
                        shutdown=False)
    assert not outcome.interrupted and len(outcome.trials) == 2 and outcome.num_errors == 0
    client = _client(uri)
    children = _children(client, outcome.parent_run_id)
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    for child in children:
        assert _steps(client, child.info.run_id, "val_loss") == [2, 4]
        assert {"val_bits_per_byte", "layer0/mi_next_token_bits", "targets_per_s"} <= set(child.data.metrics)
    assert outcome.report.table_metrics[0] == "val_loss"
    best = min(children, key=lambda c: c.data.metrics["val_loss"])
    assert outcome.report.best[0].run_name == best.info.run_name
