"""The Tune trial function: the same train_fn as `raymoe train`, launched one of two ways (resources.launcher).

- ray_train: the trial is a Ray Train *driver* (Train V2 pattern, docs/ray-notes.md §2). It builds the same
  TorchTrainer as `raymoe train` with a TuneReportCallback (constructed here, inside the Tune session) and fits
  it; needed for multi-worker and expert-parallel trials.
- in_trial (auto for one worker): train_fn runs in the trial's own process and reports with ray.tune.report.
  That skips a Train controller and a worker process per trial (~12 s each on 2 cores), and with
  reuse_actors the process, its imports and the loaded data set stay warm for the next trial.

Each trial resolves its experiment (base + the sampled values, checked by load_experiment). Its run_name is
`<sweep>-<trial id>`: stable across `--resume` (Tune keeps trial ids), so the run reloads its latest checkpoint
and train_fn reopens the same MLflow child run instead of making another.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raymoe.tracking.sweep_runs import ROLE_TAG, SWEEP_TAG
from raymoe.tune.searcher import POINT_KEY, SEED_KEY

# MLflow tags every trial's child run carries (the report reads them back).
TRIAL_ID_TAG = "raymoe.trial_id"
TRIAL_INDEX_TAG = "raymoe.trial_index"
POINT_TAG = "raymoe.point"
SEED_TAG = "raymoe.seed"
PARAMS_TAG = "raymoe.sweep_params"
CATEGORY_TAG = "raymoe.category"


@dataclass
class TrialPlan:
    """What every trial of one sweep shares (plain data, shipped once through tune.with_parameters)."""

    sweep_name: str
    strategy: str  # "optuna" | "grid"
    parent_run_id: str
    tracking_uri: str  # absolute
    experiment: str
    storage_path: str  # Ray Train runs go to <storage_path>/<run_name>
    base_raw: dict[str, Any] | None = None  # optuna
    applied: list[str] = field(default_factory=list)  # optuna: space names that are config paths
    row_raws: dict[str, dict[str, Any]] = field(default_factory=dict)  # grid: preset path -> raw experiment
    seeds: list[int] = field(default_factory=lambda: [0])  # optuna: each point's seeds, in order
    in_trial: bool = False  # train in the trial's process instead of a TorchTrainer (module docstring)
    timing_dir: str | None = None  # where each trial drops `<trial id>.json` with its start/end times (bench)


def trial_index(config: dict[str, Any], plan: TrialPlan) -> int:
    """Creation order of the trial, from its config: grid position, or Optuna point number x seeds + seed slot."""
    if plan.strategy == "grid":
        return int(config[POINT_KEY]["index"])
    return int(str(config[POINT_KEY]).lstrip("p")) * len(plan.seeds) + plan.seeds.index(config[SEED_KEY])


def resolve_trial(config: dict[str, Any], plan: TrialPlan) -> tuple[dict, dict[str, Any], dict[str, str]]:
    """(raw experiment, overrides, MLflow tags) of one trial's Tune config."""
    if plan.strategy == "grid":
        point = config[POINT_KEY]
        raw = plan.row_raws[point["method"]]
        overrides = {**point.get("fixed", {}), **point["overrides"], "seed": point["seed"]}
        tags = {POINT_TAG: point["label"], SEED_TAG: str(point["seed"]), CATEGORY_TAG: point["category"],
                PARAMS_TAG: json.dumps(point["overrides"], sort_keys=True, default=str)}
        return raw, overrides, tags
    sampled = {k: v for k, v in config.items() if k not in (POINT_KEY, SEED_KEY)}
    overrides = {k: v for k, v in sampled.items() if k in plan.applied}
    overrides["seed"] = config[SEED_KEY]
    tags = {POINT_TAG: str(config[POINT_KEY]), SEED_TAG: str(config[SEED_KEY]),
            PARAMS_TAG: json.dumps(sampled, sort_keys=True, default=str)}
    return plan.base_raw, overrides, tags


def run_trial(config: dict[str, Any], plan: TrialPlan) -> None:
    """Tune function trainable: one training run of the sweep (see module docstring)."""
    import ray.tune

    from raymoe.config.load import load_experiment
    from raymoe.errors import ConfigError
    from raymoe.tracking import sweep_runs
    from raymoe.train.loop import train_fn
    from raymoe.train.run_spec import make_run_spec

    started = time.time()
    trial_id = ray.tune.get_context().get_trial_id()
    run_name = f"{plan.sweep_name}-{trial_id}"
    raw, overrides, tags = resolve_trial(config, plan)
    tags.update({SWEEP_TAG: plan.sweep_name, ROLE_TAG: "trial", TRIAL_ID_TAG: trial_id,
                 TRIAL_INDEX_TAG: str(trial_index(config, plan))})
    overrides.update({"tracking.uri": plan.tracking_uri, "tracking.experiment": plan.experiment,
                      "scaling.storage_path": plan.storage_path})
    try:
        cfg = load_experiment(raw=raw, overrides=overrides)
    except ConfigError as exc:  # an invalid sampled combination: this trial fails, the sweep goes on
        sweep_runs.record_failed_child(plan, run_name, tags, f"invalid config: {exc}", overrides)
        raise
    spec = make_run_spec(cfg, run_name=run_name, parent_run_id=plan.parent_run_id, tags=tags,
                         checkpoint_root=str(Path(plan.storage_path) / "local"))
    try:
        if plan.in_trial:
            train_fn(spec.launched_by("in_trial"))
        else:
            _fit(spec)
    except Exception as exc:  # not SystemExit: that is Tune stopping the trial (ASHA), reconciled by the driver
        # train_fn marks its own run FAILED; this covers failures before it opened one (data, workers, OOM kill)
        sweep_runs.record_failed_child(plan, run_name, tags, f"{type(exc).__name__}: {exc}", overrides)
        raise
    finally:
        _write_timing(plan, trial_id, run_name, started)


def _fit(spec) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    from raymoe.train.ray_launch import build_trainer

    trainer = build_trainer(spec, callbacks=[TuneReportCallback()])
    result = trainer.fit()
    if getattr(result, "error", None) is not None:
        raise result.error


def _write_timing(plan: TrialPlan, trial_id: str, run_name: str, started: float) -> None:
    if plan.timing_dir is None:
        return
    path = Path(plan.timing_dir) / f"{trial_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"trial_id": trial_id, "run_name": run_name, "started": started,
                                "ended": time.time()}))
