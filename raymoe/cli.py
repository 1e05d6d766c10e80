"""`raymoe` command line: a thin router to one module per command.

Each command module exposes `add_arguments(parser)` and `run(args) -> int`. Bad input (ConfigError)
exits with code 2 and one line naming the field path and the bad value; nothing is started.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from raymoe.errors import ConfigError

COMMANDS = {
    "train": ("raymoe.train.command", "run one experiment (this machine, or Ray Train workers)"),
    "tune": ("raymoe.tune.command", "hyperparameter search with Ray Tune + Optuna"),
    "report": ("raymoe.tune.report_command", "tables and plots of a sweep from MLflow"),
    "analyze": ("raymoe.analysis.command", "how much the learned routing matters: counterfactual routings"),
    "compare": ("raymoe.analysis.compare", "final metrics and curves of several runs side by side, in MLflow"),
    "bench": ("raymoe.bench.command", "benchmarks: train | ep | moe-layer | tune"),
    "ui": ("raymoe.tracking.ui_command", "open the MLflow UI over the project's tracking store"),
    "demo": ("raymoe.demo", "the main job: a small real experiment on Fashion-MNIST"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raymoe", description="Mixture-of-Experts experiment platform on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads spin ~10k rounds between parallel regions, then sleep (read when torch loads libgomp). The
    # default 300k spins starved other jobs on a busy 2-core box (steps 10x slower); sleeping at once
    # (OMP_WAIT_POLICY=PASSIVE) left a core idle 21% of a step: bench train 13,700 vs 16,800 samples/s with this.
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv)  # prints usage or the error and exits
        return 2
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)  # only the chosen command's imports are paid for
    parser = argparse.ArgumentParser(prog=f"raymoe {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except ConfigError as exc:
        print(f"raymoe {name}: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"raymoe {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
