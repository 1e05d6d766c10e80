"""`raymoe analyze RUN_NAME_OR_CHECKPOINT`: how much does the learned routing matter? (docs/observatory.md)

Re-evaluates a trained paper MoE (or a ViT-MoE, one MoE layer at a time) on its test set with the routing replaced (raymoe/analysis/counterfactual.py),
prints the table and logs it to the run's MLflow run (artifact analysis/counterfactual.md, metrics
cf/<routing>/test_error) when that run is in the tracking store.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from raymoe.config.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="a run name (its checkpoints under train.checkpoint_dir), a run's checkpoint "
                                       "folder, or one epoch_XXXX checkpoint")
    parser.add_argument("--early-epoch", type=int, default=None,
                        help="the checkpoint whose gate is the 'early gate' row (default: the earliest one kept)")
    parser.add_argument("--checkpoint-dir", default="checkpoints", help="where run folders live (default ./checkpoints)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random routings")
    parser.add_argument("--no-log", action="store_true", help="print only; do not log to the MLflow run")


def _epochs(run_folder: Path) -> dict[int, Path]:
    from raymoe.train.checkpoint import is_complete

    return {int(p.name.split("_")[1]): p for p in sorted(run_folder.glob("epoch_*")) if is_complete(p)}


def resolve(target: str, checkpoint_dir: str) -> tuple[Path, dict[int, Path]]:
    """(the final checkpoint, every kept epoch checkpoint of the run); ConfigError naming the target if none."""
    from raymoe.train.checkpoint import is_complete

    path = Path(target)
    if not path.exists():
        path = Path(checkpoint_dir) / target
    if path.exists() and is_complete(path):
        return path, _epochs(path.parent)
    epochs = _epochs(path) if path.is_dir() else {}
    if not epochs:
        raise ConfigError("target", target, f"no run checkpoints there (looked for {path}/epoch_*); give a run name "
                                             f"trained on this machine, a run folder or an epoch checkpoint")
    return epochs[max(epochs)], epochs


def _model(folder: Path):
    from raymoe.config.load import load_experiment
    from raymoe.train.checkpoint import load_full_state
    from raymoe.train.loop import initial_model

    state, extra = load_full_state(folder)
    cfg = load_experiment(raw=extra["config"])
    if cfg.model.arch not in ("moe", "vit_moe"):
        raise ConfigError("target", str(folder), f"counterfactual routing is built for the image MoEs (model.arch "
                                                 f"moe, vit_moe); this run is {cfg.model.arch}")
    model = initial_model(cfg)
    model.load_state_dict(state)
    return cfg, model, int(extra.get("epoch", 0))


def run(args: argparse.Namespace) -> int:
    from raymoe.analysis.counterfactual import counterfactual_table, token_counterfactual_table
    from raymoe.data.batches import eval_batches
    from raymoe.data.datasets import load_dataset

    final, epochs = resolve(args.target, args.checkpoint_dir)
    cfg, model, final_epoch = _model(final)
    early_epoch = args.early_epoch if args.early_epoch is not None else min(epochs, default=None)
    if args.early_epoch is not None and args.early_epoch not in epochs:
        raise ConfigError("--early-epoch", args.early_epoch, f"no checkpoint of that epoch kept; kept: {sorted(epochs)}")
    early = _model(epochs[early_epoch])[1] if early_epoch is not None and early_epoch != final_epoch else None
    import torch

    data = load_dataset(cfg.data, torch.device("cpu"))
    batches = list(eval_batches(data.test, cfg.train.eval_batch_size))
    if cfg.model.arch == "moe":
        table = counterfactual_table(model, batches, seed=args.seed, early=early)
    else:  # one MoE layer replaced at a time
        table = token_counterfactual_table(model, batches, seed=args.seed, early=early)
    lines = [f"counterfactual routing, {cfg.name} after epoch {final_epoch} ({len(data.test)} test images"
             + (f"; early gate from epoch {early_epoch}" if early is not None else "") + ")"]
    if cfg.model.arch == "moe":
        lines += ["| routing | test error | test loss |", "|---|---|---|"]
        lines += [f"| {r['routing']} | {r['test_error']:.4f} | {r['test_loss']:.4f} |" for r in table]
    else:
        lines += ["| MoE layer | routing | test error | test loss |", "|---|---|---|---|"]
        lines += [f"| {r['layer']} | {r['routing']} | {r['test_error']:.4f} | {r['test_loss']:.4f} |"
                  for r in table]
    text = "\n".join(lines)
    print(text)
    if not args.no_log:
        _log(cfg, final, text, table)
    return 0


def _log(cfg, final: Path, text: str, table: list[dict]) -> None:
    """Onto the run's MLflow run, when the store holds it."""
    from raymoe.train.checkpoint import load_full_state
    from raymoe.tracking.mlflow_run import _retry, client_for, find_run_id

    run_name = (load_full_state(final)[1] or {}).get("run_name")
    run_id = find_run_id(cfg.tracking.uri, cfg.tracking.experiment, run_name) if run_name else None
    if run_id is None:
        print(f"(no MLflow run {run_name!r} in {cfg.tracking.uri}; not logged)")
        return
    client = client_for(cfg.tracking.uri)
    _retry(client.log_text, run_id, text + "\n", "analysis/counterfactual.md")
    _retry(client.log_text, run_id, json.dumps(table, indent=2), "analysis/counterfactual.json")
    for row in table:
        layer = f"layer{row['layer']}/" if row.get("layer", "all") != "all" else ""
        key = f"cf/{layer}" + row["routing"].replace(" ", "_").replace("-", "_") + "/test_error"
        _retry(client.log_metric, run_id, key, row["test_error"])
    print(f"logged to MLflow run {run_id}")
