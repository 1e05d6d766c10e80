"""`raymoe train CONFIG [--set KEY=VALUE ...] [--address ADDR] [--fresh]`: one experiment.

scaling.num_workers = 0 runs `train_fn` in this process; >= 1 runs it on Ray Train workers. Bad input (config,
data, checkpoints) is answered with exit code 2 before anything starts; a NaN loss with exit code 1.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

from raymoe.config.load import load_experiment
from raymoe.train.run_spec import RunSpec
from raymoe.train.step import TrainingDiverged


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML, e.g. tune_configs/paper/fmnist/attentive.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (type-checked), e.g. --set train.epochs=5; repeatable")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address for scaling.num_workers >= 1 (default: start/attach locally)")
    parser.add_argument("--fresh", action="store_true",
                        help="ignore this run's checkpoints and MLflow run and start over (default: resume)")


def check_data_available(cfg) -> None:
    """Raise DataError (a ConfigError) now if no source can provide the data set, before anything starts."""
    if cfg.data.name == "text":  # tokenized once here, on the driver, before any worker or run starts
        from raymoe.data.text.prepare import prepare_text_data

        prepare_text_data(cfg.data)
        return
    from raymoe.data import sources

    sources.check_available(cfg.data)


def summary(metrics: dict, run_id: str | None, uri: str) -> str:
    def f(key: str) -> str:
        value = metrics.get(key)
        return "n/a" if value is None or not isinstance(value, (int, float)) or math.isnan(value) else f"{value:.4f}"

    if "val_bits_per_byte" in metrics:  # language model
        lines = [f"val loss {f('val_loss')} | bits per byte {f('val_bits_per_byte')} | test loss {f('test_loss')} | "
                 f"H_u {f('usage_entropy_bits')} bits | I(E; next token) {f('mi_next_token_bits')} bits"]
    else:
        lines = [(f"val error {f('val_error')} | " if "val_error" in metrics else "") +
                 f"test error {f('test_error')} | I(E;Y) {f('mi_pred_bits')} bits (true labels "
                 f"{f('mi_true_bits')}) | H_s {f('sample_entropy_bits')} bits | H_u {f('usage_entropy_bits')} bits"]
    if run_id:
        lines.append(f"MLflow run {run_id} in {uri}")
        lines.append(f"open the UI: raymoe ui --uri {uri}")
    return "\n".join(lines)


def train(spec: RunSpec, address: str | None = None) -> dict:
    """Run one experiment where its config says (this process or Ray Train workers); returns final metrics."""
    cfg = spec.experiment
    if cfg.scaling.num_workers == 0:
        from raymoe.train.loop import train_fn

        if spec.fresh:  # local checkpoints live in <checkpoint_root>/<run_name>/epoch_XXXX
            shutil.rmtree(Path(spec.checkpoint_root) / spec.run_name, ignore_errors=True)
        return train_fn(spec)
    from raymoe.train.ray_launch import run_on_ray, storage_uri

    storage = storage_uri(cfg)
    if spec.fresh and "://" not in storage:  # else Train V2 would resume the old run's snapshot
        shutil.rmtree(Path(storage) / spec.run_name, ignore_errors=True)
    return run_on_ray(spec, address=address)


def run(args: argparse.Namespace) -> int:
    from raymoe.train.preflight import check_outputs
    from raymoe.train.run_spec import make_run_spec

    cfg = load_experiment(args.config, args.overrides)
    check_data_available(cfg)
    check_outputs(cfg)
    spec = make_run_spec(cfg, config_path=args.config, fresh=args.fresh)
    try:
        metrics = train(spec, address=args.address)
    except TrainingDiverged as exc:
        print(f"raymoe train: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        if cfg.scaling.num_workers == 0:
            raise
        print(f"raymoe train: {exc}", file=sys.stderr)  # run_on_ray: the workers' error after all restarts
        return 1
    uri = spec.tracking_uri
    run_id = None
    if cfg.tracking.enabled:
        from raymoe.tracking.mlflow_run import find_run_id

        run_id = find_run_id(uri, cfg.tracking.experiment, spec.run_name)
    print(f"{spec.run_name} done.")
    print(summary(metrics or {}, run_id, uri))
    return 0
