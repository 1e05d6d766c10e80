"""`raymoe train`'s last checks before anything starts: the run's output folders and its tracking store can be
written (docs/reliability.md). A file where a folder must be is a ConfigError naming the setting, not a failure
after an epoch of training."""

from __future__ import annotations

from raymoe.config.schema import ExperimentConfig
from raymoe.errors import ConfigError
from raymoe.tracking.store_check import folder_problem, tracking_problem


def check_outputs(cfg: ExperimentConfig) -> None:
    """Raises ConfigError for the first output that cannot be written: checkpoints, Ray storage, MLflow store."""
    if cfg.scaling.num_workers == 0:
        problem = folder_problem(cfg.train.checkpoint_dir)
        if problem:
            raise ConfigError("train.checkpoint_dir", cfg.train.checkpoint_dir, problem)
    else:
        from raymoe.train.ray_launch import storage_uri

        storage = storage_uri(cfg)
        problem = None if "://" in storage else folder_problem(storage)
        if problem:
            raise ConfigError("scaling.storage_path", cfg.scaling.storage_path or "ray_results", problem)
    if cfg.tracking.enabled:
        problem = tracking_problem(cfg.tracking.uri)
        if problem:
            raise ConfigError("tracking.uri", cfg.tracking.uri, problem)
