"""The typed argument of `train_fn`: what to train and where it is tracked, built once on the driver.

A RunSpec travels by pickle to Ray Train workers and Tune trials, so it holds only data. Paths that a worker in
another working directory would read differently (sqlite store, data root, distillation checkpoint, checkpoint
root) are made absolute here, on the driver. The experiment inside is the checked config; a worker re-checks only
what depends on its own machine (raymoe.config.load.check_on_this_machine).
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from raymoe.config.load import to_dict
from raymoe.config.schema import ExperimentConfig
from raymoe.tracking.uri import absolute_tracking_uri
from raymoe.train.identity import run_name as identity_run_name

Launcher = Literal["local", "ray_train", "in_trial"]


@dataclass(frozen=True)
class RunSpec:
    """One training run.

    Attributes:
        experiment: the resolved, checked config, its paths absolute.
        run_name: stable run identity (same config -> same run -> resume); the MLflow run and checkpoint folder.
        checkpoint_root: where `<run_name>/epoch_XXXX` checkpoints go when the run reports to local folders.
        launch_id: unique per launch: with `fresh`, a restarted Ray worker keeps what this launch wrote and drops
            only older runs and checkpoints.
        fresh: ignore existing checkpoints and the MLflow run of this run_name and start over.
        config_path, config_text: the YAML file the config came from and its text (logged as an artifact).
        parent_run_id: MLflow run to nest this run under (a Tune sweep's parent run).
        mlflow_tags: extra MLflow tags, as (key, value) pairs.
        launcher: who runs train_fn: this process ("local"), a Ray Train worker, or a Tune trial's own process;
            it decides where checkpoints and metrics are reported (raymoe/train/reporter.py).
    """

    experiment: ExperimentConfig
    run_name: str
    checkpoint_root: str
    launch_id: str
    fresh: bool = False
    config_path: str | None = None
    config_text: str | None = None
    parent_run_id: str | None = None
    mlflow_tags: tuple[tuple[str, str], ...] = ()
    launcher: Launcher = "local"

    @property
    def tracking_uri(self) -> str:
        return self.experiment.tracking.uri

    @property
    def tags(self) -> dict[str, str]:
        return dict(self.mlflow_tags)

    def experiment_dict(self) -> dict[str, Any]:
        """The experiment as plain data (checkpoints and MLflow params store this)."""
        return to_dict(self.experiment)

    def launched_by(self, launcher: Launcher) -> "RunSpec":
        return dataclasses.replace(self, launcher=launcher)


def _absolute(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(os.path.expanduser(path))


def make_run_spec(cfg: ExperimentConfig, *, run_name: str | None = None, config_path: str | None = None,
                  parent_run_id: str | None = None, tags: dict[str, str] | None = None, fresh: bool = False,
                  checkpoint_root: str | None = None) -> RunSpec:
    """The RunSpec of a checked config (see RunSpec for the arguments); run_name defaults to
    `identity.run_name(cfg)`, checkpoint_root to `cfg.train.checkpoint_dir`."""
    name = run_name or identity_run_name(cfg)  # computed before paths are made absolute (identity uses them)
    experiment = dataclasses.replace(
        cfg,
        tracking=dataclasses.replace(cfg.tracking, uri=absolute_tracking_uri(cfg.tracking.uri)),
        data=dataclasses.replace(cfg.data, root=_absolute(cfg.data.root)),
        train=dataclasses.replace(cfg.train, distill_from=_absolute(cfg.train.distill_from)))
    config_text = None
    if config_path is not None:
        config_path = os.path.abspath(config_path)
        config_text = Path(config_path).read_text()
    return RunSpec(experiment=experiment, run_name=name,
                   checkpoint_root=os.path.abspath(checkpoint_root or cfg.train.checkpoint_dir),
                   launch_id=uuid.uuid4().hex, fresh=bool(fresh), config_path=config_path, config_text=config_text,
                   parent_run_id=parent_run_id, mlflow_tags=tuple(sorted((tags or {}).items())))
