"""The one plain-dict argument of `train_fn`, built on the driver.

It must survive pickling to Ray workers and Tune trials, so it holds only plain data. Paths that a worker
in another working directory would read differently (sqlite store, data root, distillation checkpoint,
checkpoint root) are made absolute here, on the driver.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from raymoe.config.load import to_dict
from raymoe.config.schema import ExperimentConfig
from raymoe.tracking.uri import absolute_tracking_uri
from raymoe.train.identity import run_name as identity_run_name

def make_loop_config(cfg: ExperimentConfig, *, run_name: str | None = None, config_path: str | None = None,
                     parent_run_id: str | None = None, tags: dict[str, str] | None = None, fresh: bool = False,
                     checkpoint_root: str | None = None) -> dict[str, Any]:
    """Everything `train_fn` needs, as plain data.

    Args:
        cfg: the resolved, checked experiment config.
        run_name: stable run identity; default `identity.run_name(cfg)` (same config -> same run -> resume).
        config_path: the YAML file the config came from; its text is logged to MLflow as an artifact.
        parent_run_id: MLflow run to nest this run under (a Tune sweep's parent run).
        tags: extra MLflow tags for the run.
        fresh: ignore existing checkpoints and MLflow run of this run_name and start over.
        checkpoint_root: where `<run_name>/epoch_XXXX` checkpoints go; default `cfg.train.checkpoint_dir`.

    Returns:
        dict with keys experiment, run_name, config_text, config_path, mlflow_parent_run_id, mlflow_tags,
        checkpoint_root, fresh, launch_id (unique per call: with `fresh`, a restarted Ray worker keeps what this
        launch wrote and drops only older runs/checkpoints).
    """
    name = run_name or identity_run_name(cfg)  # computed before paths are made absolute (identity uses them)
    experiment = to_dict(cfg)
    experiment["tracking"]["uri"] = absolute_tracking_uri(cfg.tracking.uri)
    if cfg.data.root is not None:
        experiment["data"]["root"] = os.path.abspath(os.path.expanduser(cfg.data.root))
    if cfg.train.distill_from is not None:
        experiment["train"]["distill_from"] = os.path.abspath(os.path.expanduser(cfg.train.distill_from))
    config_text = None
    if config_path is not None:
        config_path = os.path.abspath(config_path)
        config_text = Path(config_path).read_text()
    return {
        "experiment": experiment,
        "run_name": name,
        "config_text": config_text,
        "config_path": config_path,
        "mlflow_parent_run_id": parent_run_id,
        "mlflow_tags": dict(tags or {}),
        "checkpoint_root": os.path.abspath(checkpoint_root or cfg.train.checkpoint_dir),
        "fresh": bool(fresh),
        "launch_id": uuid.uuid4().hex,
    }
