"""The sweep in MLflow: one parent run (search space, sweep file, summary, plots), one nested child per trial.

Children are created by train_fn (tag raymoe.run_name, mlflow.parentRunId). This module creates the parent,
records trials that failed before train_fn opened a run, and at the end reconciles every child with Tune's
final trial status (a trial stopped by ASHA leaves its run RUNNING; it is FINISHED here, tagged stopped early).
All writes go through MlflowClient, never the fluent API, so no process-global active run is involved.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from raymoe.config.load import flatten
from raymoe.tracking.mlflow_run import (FAILURE_TAG, PARENT_TAG, RUN_NAME_TAG, _retry, client_for, ensure_experiment,
                                        find_runs)

SWEEP_TAG = "raymoe.sweep"
ROLE_TAG = "raymoe.role"
SWEEP_ID_TAG = "raymoe.sweep_id"
STOPPED_EARLY_TAG = "raymoe.stopped_early"
ORPHAN_TAG = "raymoe.orphaned"
STATE_FILE = "raymoe_sweep.json"  # in the sweep folder: which parent run a --resume continues


class TrialPlan(Protocol):
    """What these functions need of a sweep's trial plan (raymoe.tune.trial.TrialPlan)."""

    sweep_name: str
    tracking_uri: str
    experiment: str
    parent_run_id: str


@dataclass
class ParentRun:
    run_id: str
    experiment_id: str
    uri: str
    experiment: str


def read_state(sweep_dir: Path) -> dict[str, Any] | None:
    path = Path(sweep_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def open_parent(sweep, uri: str, experiment: str, sweep_dir: Path, resume: bool) -> ParentRun:
    """Create the sweep's parent run (or, on resume, reopen the one recorded in the sweep folder)."""
    from mlflow.entities import RunStatus

    client = client_for(uri)
    experiment_id = ensure_experiment(client, experiment, uri)
    state = read_state(sweep_dir) if resume else None
    if state is not None:
        _retry(client.update_run, state["parent_run_id"], status=RunStatus.to_string(RunStatus.RUNNING))
        return ParentRun(state["parent_run_id"], state["experiment_id"], uri, experiment)
    sweep_id = f"{sweep.name}-{int(time.time())}"
    tags = {SWEEP_TAG: sweep.name, ROLE_TAG: "sweep", SWEEP_ID_TAG: sweep_id, "raymoe.strategy": sweep.config.strategy,
            "raymoe.sweep_dir": str(sweep_dir), "mlflow.source.type": "LOCAL",  # the UI's Source column
            "mlflow.source.name": f"raymoe tune {sweep.path or sweep.name}"}
    run = _retry(client.create_run, experiment_id, run_name=sweep.name, tags=tags)
    parent = ParentRun(run.info.run_id, experiment_id, uri, experiment)
    _log_definition(client, parent.run_id, sweep)
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    (Path(sweep_dir) / STATE_FILE).write_text(json.dumps({
        "name": sweep.name, "parent_run_id": parent.run_id, "experiment_id": experiment_id, "tracking_uri": uri,
        "experiment": experiment, "sweep_file": sweep.path, "sweep_id": sweep_id, "definition": sweep.digest},
        indent=2))
    return parent


def _log_definition(client, run_id: str, sweep) -> None:
    """Sweep settings as params; the sweep file, the space and the grid points as artifacts."""
    from dataclasses import asdict

    from mlflow.entities import Param

    cfg = sweep.config
    params = {"strategy": cfg.strategy, "metric": ",".join(cfg.metrics), "mode": ",".join(cfg.modes),
              "num_trials": sweep.num_trials, "seeds": ",".join(map(str, cfg.seed_list)),
              "resources.num_workers": cfg.resources.num_workers, "resources.use_gpu": cfg.resources.use_gpu,
              "resources.cpus_per_worker": cfg.resources.cpus_per_worker,
              "resources.gpus_per_worker": cfg.resources.gpus_per_worker}
    if cfg.strategy == "optuna":
        params.update(num_samples=cfg.num_samples, sampler=cfg.sampler, sampler_seed=cfg.sampler_seed,
                      scheduler="asha" if cfg.scheduler and cfg.scheduler.asha else "none")
    params.update({f"override.{k}": v for k, v in cfg.overrides.items()})
    _retry(client.log_batch, run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    name = Path(sweep.path).name if sweep.path else "sweep.yaml"
    _retry(client.log_text, run_id, sweep.text, f"sweep/{name}")
    if cfg.strategy == "optuna":
        space = {k: asdict(v) for k, v in sweep.space.items()}
        _retry(client.log_dict, run_id, space, "sweep/space.json")
        _retry(client.log_dict, run_id, sweep.base_raw, "sweep/base_experiment.json")
    else:
        _retry(client.log_dict, run_id, [p.as_config() for p in sweep.points], "sweep/grid_points.json")


def record_failed_child(plan: TrialPlan, run_name: str, tags: dict[str, str], reason: str,
                        overrides: dict[str, Any]) -> None:
    """Make sure the trial's child run exists and is FAILED with a reason; keeps a reason train_fn already set."""
    from mlflow.entities import Param, RunStatus

    client = client_for(plan.tracking_uri)
    experiment_id = ensure_experiment(client, plan.experiment, plan.tracking_uri)
    runs = find_runs(client, experiment_id, run_name)
    if runs:
        run = runs[0]
        if run.info.status == RunStatus.to_string(RunStatus.FINISHED):
            return
        run_id = run.info.run_id
        if FAILURE_TAG not in run.data.tags:
            _retry(client.set_tag, run_id, FAILURE_TAG, reason[:5000])
    else:
        all_tags = {RUN_NAME_TAG: run_name, PARENT_TAG: plan.parent_run_id, FAILURE_TAG: reason[:5000], **tags}
        run_id = _retry(client.create_run, experiment_id, run_name=run_name, tags=all_tags).info.run_id
        flat = flatten({k: v for k, v in overrides.items()})
        _retry(client.log_batch, run_id, params=[Param(k, str(v)[:6000]) for k, v in flat.items()])
    _retry(client.set_terminated, run_id, "FAILED")


def sweep_children(client, experiment_id: str, parent_run_id: str) -> list:
    """All child runs of a sweep parent (every status), oldest first."""
    runs, token = [], None
    while True:
        page = _retry(client.search_runs, [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                      order_by=["attributes.start_time ASC"], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def reconcile_children(plan: TrialPlan, trials: list[tuple[str, str, str | None]]) -> dict[str, int]:
    """Align each trial's child with Tune's final status.

    Args:
        plan: the sweep's shared trial settings.
        trials: (trial id, Tune status, error text) for every trial Tune knows.

    Returns:
        counts of what was changed: {"stopped_early": n, "failed": n, "missing": n, "orphaned": n}.
    """
    from mlflow.entities import RunStatus

    client = client_for(plan.tracking_uri)
    experiment_id = ensure_experiment(client, plan.experiment, plan.tracking_uri)
    finished = RunStatus.to_string(RunStatus.FINISHED)
    changed = {"stopped_early": 0, "failed": 0, "missing": 0, "orphaned": 0}
    for trial_id, status, error in trials:
        run_name = f"{plan.sweep_name}-{trial_id}"
        runs = find_runs(client, experiment_id, run_name)
        if status == "TERMINATED":
            if runs and runs[0].info.status != finished:  # Tune's TERMINATED = the trial function returned
                run = runs[0]
                done = max((m.step for m in _retry(client.get_metric_history, run.info.run_id, "test_error")),
                           default=0)
                if done < int(run.data.params.get("train.epochs", done + 1)):  # a scheduler stopped it (ASHA)
                    _retry(client.set_tag, run.info.run_id, STOPPED_EARLY_TAG, "true")
                    changed["stopped_early"] += 1
                _retry(client.set_terminated, run.info.run_id, "FINISHED")
            elif not runs:
                changed["missing"] += 1
        elif status == "ERROR":
            if not runs or runs[0].info.status != finished:
                changed["failed"] += 1
                record_failed_child(plan, run_name, {SWEEP_TAG: plan.sweep_name, ROLE_TAG: "trial"},
                                    error or "trial errored in Tune", {})
    # A killed driver may have started trials after its last saved state: the restored sweep re-ran those points
    # as new trials, so their children belong to no trial. Soft-delete them (`mlflow runs restore` undoes it).
    known = {f"{plan.sweep_name}-{trial_id}" for trial_id, _, _ in trials}
    for child in sweep_children(client, experiment_id, plan.parent_run_id):
        if child.data.tags.get(RUN_NAME_TAG, child.info.run_name) not in known:
            _retry(client.set_tag, child.info.run_id, ORPHAN_TAG, "started by a driver that was killed; "
                                                                  "the resumed sweep re-ran the point")
            _retry(client.delete_run, child.info.run_id)
            changed["orphaned"] += 1
    return changed


def finish_parent(parent: ParentRun, status: str = "FINISHED", tags: dict[str, str] | None = None) -> None:
    client = client_for(parent.uri)
    for key, value in (tags or {}).items():
        _retry(client.set_tag, parent.run_id, key, str(value)[:5000])
    _retry(client.set_terminated, parent.run_id, status)
