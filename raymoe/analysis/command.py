"""`raymoe analyze RUN_NAME_OR_CHECKPOINT`: how much does the learned routing matter? (docs/observatory.md)

Re-evaluates a trained paper MoE (or a ViT-MoE or GPT-MoE, one MoE layer at a time) on its test set with the
routing replaced (raymoe/analysis/counterfactual.py),
prints the table and logs it to the run's MLflow run (artifact analysis/counterfactual.md, metrics
cf/<routing>/test_error) when that run is in the tracking store.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, NamedTuple

from raymoe.errors import ConfigError

ANALYZED_ARCHS = ("moe", "vit_moe", "gpt_moe")


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


class Saved(NamedTuple):
    """One checkpoint as read once: weights, resolved config, the interval it was saved after, its run's name."""

    state: dict
    cfg: Any
    epoch: int
    run_name: str | None


def _checkpoint(folder: Path) -> Saved:
    """The checkpoint in `folder`; ConfigError unless its model is an MoE this command analyses."""
    from raymoe.config.load import load_experiment
    from raymoe.train.checkpoint import load_full_state

    state, extra = load_full_state(folder)
    cfg = load_experiment(raw=extra["config"])
    if cfg.model.arch not in ANALYZED_ARCHS:
        raise ConfigError("target", str(folder), f"counterfactual routing needs an MoE (model.arch "
                                                 f"{', '.join(ANALYZED_ARCHS)}); this run is {cfg.model.arch}")
    return Saved(state, cfg, int(extra.get("epoch", 0)), extra.get("run_name"))


def _model(cfg, state: dict, build_args: tuple | None):
    from raymoe.train.loop import initial_model

    model = initial_model(cfg, build_args)
    model.load_state_dict(state)
    return model


def _test_batches(cfg) -> tuple[list, str, tuple | None]:
    """(the test split as a list of (inputs, targets) batches, a description, the model's build_args); a language
    model's test windows are the fixed contiguous windows its final evaluation scores (its val windows without a
    test split)."""
    import torch

    cpu = torch.device("cpu")
    if cfg.model.arch == "gpt_moe":
        from raymoe.data.text.dataset import load_text_dataset
        from raymoe.data.text.windows import eval_windows

        data = load_text_dataset(cfg.data, cpu)
        split = "test" if data.test is not None else "val"
        x_BT, y_BT = (eval_windows(data.test, data.block_size, cfg.data.text.val_tokens) if data.test is not None
                      else (data.val_x, data.val_y))
        size = cfg.train.eval_batch_size
        batches = list(zip(torch.split(x_BT, size), torch.split(y_BT, size)))
        described = f"{y_BT.numel()} {split} tokens; error = next-token error, loss = NLL per token"
        return batches, described, (data.vocab_size, 0, 0)
    from raymoe.data.batches import eval_batches
    from raymoe.data.datasets import load_dataset

    data = load_dataset(cfg.data, cpu)
    return list(eval_batches(data.test, cfg.train.eval_batch_size)), f"{len(data.test)} test images", None


def run(args: argparse.Namespace) -> int:
    from raymoe.analysis.counterfactual import counterfactual_table, token_counterfactual_table

    final, epochs = resolve(args.target, args.checkpoint_dir)
    saved = _checkpoint(final)
    cfg, final_epoch = saved.cfg, saved.epoch
    early_epoch = args.early_epoch if args.early_epoch is not None else min(epochs, default=None)
    if args.early_epoch is not None and args.early_epoch not in epochs:
        raise ConfigError("--early-epoch", args.early_epoch, f"no checkpoint of that epoch kept; kept: {sorted(epochs)}")
    batches, described, build_args = _test_batches(cfg)
    model = _model(cfg, saved.state, build_args)
    early = None
    if early_epoch is not None and early_epoch != final_epoch:
        earlier = _checkpoint(epochs[early_epoch])
        early = _model(earlier.cfg, earlier.state, build_args)
    if cfg.model.arch == "moe":
        table = counterfactual_table(model, batches, seed=args.seed, early=early)
    else:  # one MoE layer replaced at a time
        table = token_counterfactual_table(model, batches, seed=args.seed, early=early)
    unit = "evaluation interval" if cfg.model.arch == "gpt_moe" else "epoch"  # checkpoints are kept per interval
    lines = [f"counterfactual routing, {cfg.name} after {unit} {final_epoch} ({described}"
             + (f"; early gate from {unit} {early_epoch}" if early is not None else "") + ")"]
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
        _log(cfg, saved.run_name, text, table)
    return 0


def _log(cfg, run_name: str | None, text: str, table: list[dict]) -> None:
    """Onto the run's MLflow run, when the store holds it."""
    from raymoe.tracking.mlflow_run import _retry, client_for, find_run_id

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
