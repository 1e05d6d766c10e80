"""One MLflow run per run_name, written through MlflowClient (no global fluent state, so a Tune driver's
active parent run in the same process is never disturbed).

Rank 0 opens a `TrackedRun`; other ranks and `tracking.enabled: false` get a `NullRun` with the same methods.
A re-run (or a Ray worker restart) finds its run by the tag `raymoe.run_name` and keeps logging into it.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from raymoe.config.load import flatten
from raymoe.tracking.uri import sqlite_path

if TYPE_CHECKING:  # annotation only: train imports tracking, not the other way round
    from raymoe.train.run_spec import RunSpec

RUN_NAME_TAG = "raymoe.run_name"
FAILURE_TAG = "raymoe.failure_reason"
PARENT_TAG = "mlflow.parentRunId"
LAUNCH_TAG = "raymoe.launch_id"
T = TypeVar("T")


def _retry(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Concurrent trials share one sqlite file; ride out its short write locks."""
    for attempt in range(20):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - MlflowException wraps sqlalchemy's OperationalError
            if "database is locked" not in str(exc) or attempt == 19:
                raise
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


def client_for(uri: str):
    from mlflow import MlflowClient  # imported lazily: MLflow costs ~1 s to import

    path = sqlite_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


# The MLflow UI (3.x) opens an experiment in its model-training view, not the GenAI one, when this tag says so
# (values read from MLflow 3.17's UI bundle: genai_development | custom_model_development).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def ensure_experiment(client, name: str, uri: str) -> str:
    """Experiment id by name, creating it (artifacts beside the sqlite file, not in ./mlruns); a concurrent
    creator winning the race is fine."""
    found = _retry(client.get_experiment_by_name, name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            _retry(client.restore_experiment, found.experiment_id)
        if EXPERIMENT_KIND_TAG not in found.tags:  # made by an older raymoe, or by hand
            _retry(client.set_experiment_tag, found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return found.experiment_id
    db = sqlite_path(uri)
    location = None
    if db is not None:
        location = (db.parent / "mlartifacts" / re.sub(r"[^\w.-]", "_", name)).as_uri()
    try:
        return _retry(client.create_experiment, name, artifact_location=location,
                      tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
    except Exception:  # noqa: BLE001 - RESOURCE_ALREADY_EXISTS from a concurrent creator
        found = _retry(client.get_experiment_by_name, name)
        if found is None:
            raise
        return found.experiment_id


def _quote(value: str) -> str:
    return f'"{value}"' if "'" in value else f"'{value}'"


def find_runs(client, experiment_id: str, run_name: str) -> list:
    """Active runs tagged with this run_name, newest first."""
    return list(_retry(client.search_runs, [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = {_quote(run_name)}",
                       order_by=["attributes.start_time DESC"]))


def find_run_id(uri: str, experiment: str, run_name: str) -> str | None:
    """The MLflow run id of a run_name, for summaries after Ray runs (None if absent)."""
    client = client_for(uri)
    found = _retry(client.get_experiment_by_name, experiment)
    if found is None:
        return None
    runs = find_runs(client, found.experiment_id, run_name)
    return runs[0].info.run_id if runs else None


class NullRun:
    """Same interface, does nothing (non-zero ranks, tracking disabled)."""

    run_id: str | None = None
    resumed = False
    last_step = 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_figures(self, figures: dict[str, Any]) -> None: ...
    def log_dict(self, data: dict, artifact_file: str) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def finish(self) -> None: ...
    def fail(self, reason: str, status: str = "FAILED") -> None: ...


class TrackedRun(NullRun):
    """A live MLflow run.

    Attributes:
        run_id: the MLflow run id.
        resumed: True when an existing run of this run_name was reopened.
        last_step: the highest epoch already logged (metrics for steps <= it are not logged again).
    """

    def __init__(self, client, run_id: str, resumed: bool, last_step: int):
        self.client, self.run_id, self.resumed, self.last_step = client, run_id, resumed, last_step

    @classmethod
    def open(cls, spec: RunSpec, environment: dict[str, str]) -> "TrackedRun":
        """Find (or, with `fresh`, replace) or create the run of spec.run_name; log params, config and
        environment."""
        from mlflow.entities import Param, RunStatus

        experiment = spec.experiment_dict()
        tracking, run_name = experiment["tracking"], spec.run_name
        client = client_for(tracking["uri"])
        experiment_id = ensure_experiment(client, tracking["experiment"], tracking["uri"])
        runs = find_runs(client, experiment_id, run_name)
        if spec.fresh:  # drop older runs of this name, keep what this launch made (worker restarts)
            launch = spec.launch_id
            for run in runs:
                if run.data.tags.get(LAUNCH_TAG) != launch:  # soft delete: `mlflow runs restore` brings it back
                    _retry(client.delete_run, run.info.run_id)
            runs = [run for run in runs if run.data.tags.get(LAUNCH_TAG) == launch]
        env_tags = {f"raymoe.env.{k}": v for k, v in environment.items()}
        if runs:
            run = runs[0]
            _retry(client.update_run, run.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            history = _retry(client.get_metric_history, run.info.run_id, "test_error")
            tracked = cls(client, run.info.run_id, True, max((m.step for m in history), default=0))
            old_params = run.data.params
        else:
            tags = {RUN_NAME_TAG: run_name, LAUNCH_TAG: spec.launch_id, "raymoe.config_name": experiment["name"],
                    **env_tags, **spec.tags}
            # the UI's Source column: what started the run
            tags["mlflow.source.type"] = "LOCAL"
            tags["mlflow.source.name"] = (f"raymoe train {spec.config_path}" if spec.config_path
                                          else f"raymoe ({run_name})")
            if env_tags.get("raymoe.env.git_commit", "none") != "none":
                tags["mlflow.source.git.commit"] = environment["git_commit"]
            if spec.parent_run_id:
                tags[PARENT_TAG] = spec.parent_run_id
            run = _retry(client.create_run, experiment_id, run_name=run_name, tags=tags)
            tracked = cls(client, run.info.run_id, False, 0)
            old_params = {}
        tracked.set_tags(env_tags)  # a resumed run may now run on another device
        # MLflow refuses to change a logged param; settings outside the run identity (e.g. more epochs) may differ.
        params = [Param(k, str(v)[:6000]) for k, v in flatten(experiment).items() if k not in old_params]
        for i in range(0, len(params), 100):
            _retry(client.log_batch, tracked.run_id, params=params[i:i + 100])
        if spec.config_text is not None:
            _retry(client.log_text, tracked.run_id, spec.config_text,
                   f"config/{Path(spec.config_path or 'config.yaml').name}")
        tracked.log_dict(experiment, "config/resolved.json")
        tracked.log_dict(environment, "environment.json")
        return tracked

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if step <= self.last_step:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(batch), 1000):
            _retry(self.client.log_batch, self.run_id, metrics=batch[i:i + 1000])
        self.last_step = step

    def log_figures(self, figures: dict[str, Any]) -> None:
        for artifact_file, figure in figures.items():
            _retry(self.client.log_figure, self.run_id, figure, artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        _retry(self.client.log_dict, self.run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        _retry(self.client.log_text, self.run_id, text, artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        _retry(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def finish(self) -> None:
        _retry(self.client.set_terminated, self.run_id, "FINISHED")

    def fail(self, reason: str, status: str = "FAILED") -> None:
        """Mark the run FAILED (or KILLED) with the reason as a tag (none if empty); never raises (we are
        already failing)."""
        try:
            if reason:
                self.set_tags({FAILURE_TAG: reason})
            _retry(self.client.set_terminated, self.run_id, status)
        except Exception:  # noqa: BLE001
            pass

