"""A run's stable identity: the same resolved config gives the same name, so re-running it resumes.

Settings that do not change what is computed (progress bars, tracking target, where checkpoints go,
how many epochs remain to run) are left out, so extending `train.epochs` continues the same run.
"""

from __future__ import annotations

import hashlib
import json

from raymoe.config.load import to_dict
from raymoe.config.schema import ExperimentConfig

_IGNORED = {("train", "progress"), ("train", "epochs"), ("train", "checkpoint_dir"), ("tracking",),
            ("scaling", "max_failures"), ("scaling", "storage_path"), ("scaling", "cpus_per_worker"),
            ("scaling", "gpus_per_worker")}


def _strip(d: dict, prefix: tuple = ()) -> dict:
    out = {}
    for key, value in d.items():
        path = (*prefix, key)
        if path in _IGNORED:
            continue
        out[key] = _strip(value, path) if isinstance(value, dict) else value
    return out


def config_digest(cfg: ExperimentConfig) -> str:
    blob = json.dumps(_strip(to_dict(cfg)), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def run_name(cfg: ExperimentConfig) -> str:
    """`<name>-<digest>`: used for the checkpoint folder, the Ray Train RunConfig name and the MLflow run tag."""
    return f"{cfg.name}-{config_digest(cfg)}"
