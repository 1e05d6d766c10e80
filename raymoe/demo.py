"""`raymoe demo`: the main job. A real, small experiment on Fashion-MNIST, end to end.

The paper's original (softmax-gate) MoE against its attentive-gate MoE, a few epochs each on a training
subset, both logged to the MLflow experiment "demo"; then a comparison table and the command that opens the UI.
Running it again resumes/re-reports the finished runs (add --fresh to train again).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from raymoe.config.load import load_experiment

PRESETS = Path(__file__).resolve().parents[1] / "tune_configs" / "paper" / "fmnist"
# Used when the presets are not next to the package (e.g. an installed wheel): the paper's FMNIST settings.
FALLBACK = {"data": {"name": "fashion_mnist"}, "model": {"num_experts": 5},
            "train": {"batch_size": 512, "lr": 1e-3, "optimizer": "adam"}}
MODELS = (("original", "softmax"), ("attentive", "attentive"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=3, help="epochs per model (default 3)")
    parser.add_argument("--train-limit", type=int, default=None,
                        help="first N training images (default all 60,000; the test set is always the full 10,000)")
    parser.add_argument("--uri", default="sqlite:///mlflow.db", help="MLflow tracking store (default ./mlflow.db)")
    parser.add_argument("--data-root", default=None, help="where to look for / download Fashion-MNIST")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="train again instead of resuming finished runs")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def demo_configs(args: argparse.Namespace) -> list:
    """One ExperimentConfig per compared model (presets from tune_configs/paper/fmnist when present)."""
    configs = []
    for label, gate in MODELS:
        overrides = {"name": f"demo-{label}", "seed": args.seed, "train.epochs": args.epochs,
                     "data.train_limit": args.train_limit, "data.test_limit": None, "data.root": args.data_root,
                     "train.progress": args.progress, "tracking.uri": args.uri, "tracking.experiment": "demo",
                     "scaling.num_workers": 0}
        preset = PRESETS / f"{label}.yaml"
        if preset.is_file():
            configs.append((label, load_experiment(preset, overrides), str(preset)))
        else:
            raw = {"name": f"demo-{label}", **FALLBACK, "gate": {"kind": gate}}
            configs.append((label, load_experiment(raw=raw, overrides=overrides), None))
    return configs


def comparison_table(rows: list[tuple[str, dict, float]]) -> str:
    head = f"{'model':<12}{'test error':>11}{'I(E;Y) bits':>13}{'H_s bits':>10}{'H_u bits':>10}{'minutes':>9}"
    lines = [head, "-" * len(head)]
    for label, m, seconds in rows:
        def f(key: str) -> str:
            v = m.get(key, math.nan)
            return f"{v:.4f}" if isinstance(v, (int, float)) else str(v)

        lines.append(f"{label:<12}{f('test_error'):>11}{f('mi_pred_bits'):>13}{f('sample_entropy_bits'):>10}"
                     f"{f('usage_entropy_bits'):>10}{seconds / 60:>9.1f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from raymoe.train.command import check_data_available, train
    from raymoe.train.run_spec import make_run_spec

    configs = demo_configs(args)
    check_data_available(configs[0][1])
    rows, uri = [], None
    for label, cfg, preset in configs:
        print(f"== {label} MoE ({cfg.gate.kind} gate, {cfg.model.num_experts} experts): {cfg.train.epochs} epochs on "
              f"{cfg.data.train_limit or 'all'} Fashion-MNIST training images", flush=True)
        spec = make_run_spec(cfg, config_path=preset, fresh=args.fresh)
        uri = spec.tracking_uri
        start = time.perf_counter()
        metrics = train(spec)
        rows.append((label, metrics, time.perf_counter() - start))
    print()
    print("Fashion-MNIST test set (10,000 images); I(E;Y) uses the selected expert's prediction (paper), "
          "H_s = mean gate entropy per sample, H_u = entropy of mean expert usage")
    print(comparison_table(rows))
    print()
    print("MLflow experiment 'demo' (params, per-epoch metrics, expert x class heatmaps, usage, gate entropy):")
    print(f"  raymoe ui --uri {uri}      # then open http://127.0.0.1:5000")
    return 0
