"""`raymoe bench fidelity`: raymoe's paper models against a literal implementation of the reference code.

Two parts, both printed as JSON lines (raymoe/fidelity/):
* steps: for each preset, raymoe's step (the fast stacked model, `step_loss`, its optimizer) and the literal
  model's step in float32, both measured against the literal model in float64, from the same weights on the same
  batches. raymoe passes when it is no further from float64 than the float32 literal model is (times a margin):
  any remaining gap is float32 rounding, not a different computation. raymoe's model also runs in float64 next
  to the float64 literal model: equal there (same_function), a larger float32 gap is rounding that the training
  dynamics amplified (a ReLU unit at its edge flips; Adam scales its tiny gradient up), so "equivalent" is
  either.
* runs (--seeds N): for each preset and seed, the full loops side by side: `train_fn` exactly as `raymoe train`
  runs it, and the literal reference loop (torchvision DataLoader, per-sample transforms, plain modules); final
  train loss, train and test error, H_u; then mean +- std per side, and the speed ratio of the two loops
  (samples/s including evaluation, measured in this one run on this machine).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from raymoe.config.load import load_experiment
from raymoe.errors import ConfigError

PRESETS = Path(__file__).resolve().parents[2] / "tune_configs" / "paper"
DEFAULT_ROWS = ("single", "original", "original_importance", "original_ls", "attentive", "attentive_importance",
                "attentive_ls")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="fmnist", choices=["mnist", "fmnist", "cifar10", "cifar100"],
                        help="preset folder under tune_configs/paper/ (default fmnist)")
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), metavar="ROW",
                        help="preset names in that folder (default: every row without distillation)")
    parser.add_argument("--steps", type=int, default=12, help="compared training steps per preset (0 = skip)")
    parser.add_argument("--seeds", type=int, default=0, help="full runs of both loops for N seeds (default 0)")
    parser.add_argument("--first-seed", type=int, default=0, help="the runs use seeds K..K+N-1 (default 0)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of those runs (default: the preset's)")
    parser.add_argument("--train-limit", type=int, default=None, help="first N training images in the runs")
    parser.add_argument("--init", choices=["literal", "raymoe"], default="literal",
                        help="the literal loop's initial weights: its own draw for the seed (default), or exactly "
                             "the weights raymoe draws for that seed (then both loops start from the same point)")
    parser.add_argument("--literal-only", action="store_true", help="run only the literal loop in the runs part")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key of every preset")


def cpu_model() -> str:
    """The CPU's model name (benchmark figures are recorded next to it)."""
    import torch

    from raymoe.tracking.environment import device_name

    return device_name(torch.device("cpu"))


def _preset(args: argparse.Namespace, row: str, extra: list[str] = ()):
    path = PRESETS / args.dataset / f"{row}.yaml"
    return load_experiment(path, ["train.progress=false", *args.overrides, *extra]), path


def _steps_part(args: argparse.Namespace, row: str) -> dict:
    from raymoe.data.batches import train_batches
    from raymoe.data.datasets import load_dataset
    from raymoe.fidelity.side_by_side import compare_steps

    batch = 512
    cfg, _ = _preset(args, row, [f"data.train_limit={args.steps * batch}", "data.test_limit=16"])
    data = load_dataset(cfg.data, torch.device("cpu"))
    batches = list(train_batches(data.train, batch, generator=torch.Generator().manual_seed(cfg.seed),
                                 augment=data.augment))
    gaps = compare_steps(cfg, batches, data.num_classes, data.in_channels, data.image_size, seed=cfg.seed)
    worst = {k: max(getattr(g.raymoe, k) for g in gaps) for k in ("loss", "probs", "grad", "param")}
    floor = {k: max(getattr(g.floor, k) for g in gaps) for k in ("loss", "probs", "grad", "param")}
    twin = {k: max(getattr(g.raymoe_float64, k) for g in gaps) for k in ("loss", "probs", "grad", "param")}
    within = all(g.within_rounding() for g in gaps)
    same = all(g.same_function() for g in gaps)
    return {"bench": "fidelity", "part": "steps", "row": row, "steps": len(gaps),
            "raymoe_vs_float64": {k: float(f"{v:.2e}") for k, v in worst.items()},
            "literal_float32_vs_float64": {k: float(f"{v:.2e}") for k, v in floor.items()},
            "raymoe_float64_vs_float64": {k: float(f"{v:.2e}") for k, v in twin.items()},
            "within_rounding": within, "same_function": same,
            # same computation: within the float32 floor, or equal in float64 (then the float32 gap is rounding
            # amplified by a flip at a ReLU edge, docs/fidelity.md §2)
            "equivalent": within or same}


def _raymoe_run(cfg, scratch: str) -> dict[str, float]:
    from raymoe.train.loop import train_fn
    from raymoe.train.run_spec import make_run_spec

    metrics = train_fn(make_run_spec(cfg, checkpoint_root=scratch, fresh=True))
    return metrics


def _teacher_row(row: str) -> str | None:
    """The attentive row a distilled row starts from (distilled_attentive_ls -> attentive_ls), else None."""
    return row.removeprefix("distilled_") if row.startswith("distilled_") else None


def _literal_train(loop):
    """Every epoch of the loop's preset; the last epoch's train and eval metrics are kept on loop.last."""
    for _ in range(loop.cfg.train.epochs):
        loop.last = {**loop.train_epoch(), **loop.evaluate(), "epochs": loop.cfg.train.epochs}
    return loop


def _run_line(row: str, seed: int, init: str, mine: dict, lit: dict, samples: int, mine_seconds: float,
              lit_seconds: float) -> dict:
    keys = ("train_loss", "train_error", "test_error", "usage_entropy_bits")
    return {"bench": "fidelity", "part": "run", "row": row, "seed": seed, "epochs": lit["epochs"],
            "literal_init": init,
            "raymoe": {k: round(mine.get(k, math.nan), 4) for k in keys},
            "literal": {k: round(lit.get(k, math.nan), 4) for k in keys},
            "literal_train_error_before_step": round(lit["train_error_before_step"], 4),
            "raymoe_samples_per_s": round(samples / mine_seconds, 1) if mine else math.nan,
            "literal_samples_per_s": round(samples / lit_seconds, 1)}


def _runs_part(args: argparse.Namespace, row: str) -> list[dict]:
    from raymoe.fidelity.literal_loop import LiteralLoop

    lines, keys = [], ("train_loss", "train_error", "test_error", "usage_entropy_bits")
    teacher = _teacher_row(row)
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        extra = [f"seed={seed}", "tracking.enabled=false"]
        if args.epochs:
            extra.append(f"train.epochs={args.epochs}")
        if args.train_limit:
            extra.append(f"data.train_limit={args.train_limit}")
        with tempfile.TemporaryDirectory(prefix="raymoe-fidelity-") as scratch:
            # a distilled row's preset needs an existing distill_from; the literal loop distils in memory instead
            cfg, _ = _preset(args, row, extra + ([f"train.distill_from={scratch}"] if teacher else []))
            start = time.perf_counter()
            mine = {} if args.literal_only else _raymoe_run(cfg, scratch)
            mine_seconds = time.perf_counter() - start
            attentive = None
            if teacher:  # rows 8/9, docs/paper-notes.md §1.3: the attentive row first, same seed
                start = time.perf_counter()
                attentive = _literal_train(LiteralLoop(_preset(args, teacher, extra)[0], Path(scratch), args.init))
                print(json.dumps(_run_line(teacher, seed, args.init, {}, attentive.last,
                                           len(attentive.train_loader.dataset) * attentive.cfg.train.epochs,
                                           0.0, time.perf_counter() - start)), flush=True)
            start = time.perf_counter()
            loop = LiteralLoop(cfg, Path(scratch), init="literal" if teacher else args.init,
                               distill_from=attentive.model if attentive else None)
            lit = _literal_train(loop).last
            lit_seconds = time.perf_counter() - start
        line = _run_line(row, seed, args.init, mine, lit, len(loop.train_loader.dataset) * cfg.train.epochs,
                         mine_seconds, lit_seconds)
        print(json.dumps(line), flush=True)
        lines.append(line)
    summary = {"bench": "fidelity", "part": "runs_summary", "row": row, "seeds": len(lines), "cpu": cpu_model(),
               "threads": torch.get_num_threads()}
    for side in ("raymoe", "literal"):
        for k in keys:
            values = [line[side][k] for line in lines if not math.isnan(line[side][k])]
            if values:
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                summary[f"{side}_{k}"] = f"{statistics.mean(values):.4f} +- {sd:.4f}"
    if args.literal_only:
        return [summary]
    summary["speedup_incl_eval_and_startup"] = round(
        statistics.mean(x["raymoe_samples_per_s"] for x in lines) / statistics.mean(
            x["literal_samples_per_s"] for x in lines), 2)
    return [summary]


def run(args: argparse.Namespace) -> int:
    from raymoe.runtime import prepare_process

    for row in args.rows:
        if args.seeds > 0 and _teacher_row(row) and not args.literal_only:
            raise ConfigError("--rows", row, "a distilled row's runs need --literal-only (raymoe's distilled rows "
                                             "come from the paper grid, which trains the attentive run first)")
        if args.steps > 0 and _teacher_row(row):
            raise ConfigError("--rows", row, "the step comparison covers the rows without distillation: use --steps 0")
    prepare_process(torch.device("cpu"))
    for row in args.rows:
        if args.steps > 0:
            print(json.dumps(_steps_part(args, row)), flush=True)
        if args.seeds > 0:
            for line in _runs_part(args, row):
                print(json.dumps(line), flush=True)
    return 0
