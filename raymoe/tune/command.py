"""`raymoe tune SWEEP.yaml [--resume] [--set KEY=VALUE ...] [--sweep-set KEY=VALUE ...]`: a hyperparameter sweep
with Ray Tune + Optuna (--set changes every trial's experiment, --sweep-set the sweep file's own keys).

The sweep file is checked completely first (exit 2 with the field path on any problem; nothing started).
Sweeps live in ./ray_results/sweeps/<name>; a second run of the same name needs --resume (or another --name).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep YAML, e.g. tune_configs/sweeps/fmnist_gates.yaml")
    parser.add_argument("--resume", action="store_true",
                        help="finish an interrupted sweep of this name (same trials, same MLflow parent run)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override an experiment setting of every trial, e.g. --set train.epochs=2; repeatable")
    parser.add_argument("--sweep-set", dest="sweep_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the sweep file itself, e.g. --sweep-set num_samples=3 --sweep-set "
                             "seeds=2 --sweep-set resources.num_workers=2; repeatable, type-checked like the file")
    parser.add_argument("--name", default=None, help="sweep name (default: the file's name:)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local Ray)")
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="trials at once (default: the file's max_concurrent_trials, else what the cluster fits)")
    parser.add_argument("--storage", default=None, help="folder of sweeps (default ./ray_results/sweeps)")
    parser.add_argument("--check", action="store_true", help="only check the sweep file and print the plan")
    parser.add_argument("--quick", action="store_true",
                        help="grid sweeps: one seed per row at the presets' values (sweep <name>-quick)")


def run(args: argparse.Namespace) -> int:
    from raymoe.tune.driver import DEFAULT_STORAGE, run_sweep, sweep_dir_for
    from raymoe.tune.report import format_report
    from raymoe.tune.sweep_load import load_sweep

    sweep = load_sweep(args.sweep, args.overrides, name=args.name, quick=args.quick,
                       max_concurrent=args.max_concurrent, sweep_overrides=args.sweep_overrides)
    storage = args.storage or DEFAULT_STORAGE
    if args.check:
        print(f"sweep {sweep.name} is valid: strategy {sweep.config.strategy}, {sweep.num_trials} trial(s); "
              f"would run in {sweep_dir_for(sweep.name, storage)}")
        stages = sorted({p.stage for p in sweep.points})
        if len(stages) > 1:
            for stage in stages:
                rows = list(dict.fromkeys(p.category for p in sweep.points if p.stage == stage))
                print(f"  stage {stage}: {', '.join(rows)}")
        return 0
    outcome = run_sweep(sweep, resume=args.resume, address=args.address, storage_root=storage)
    if outcome.interrupted:
        print(f"raymoe tune: sweep {sweep.name} interrupted; finish it with:\n"
              f"  raymoe tune {args.sweep} --resume" + (f" --name {args.name}" if args.name else "")
              + (" --quick" if args.quick else ""))
        return 130
    print(format_report(outcome.report))
    print(f"\nMLflow UI: raymoe ui --uri {outcome.tracking_uri}   (parent run {outcome.parent_run_id})")
    from pathlib import Path

    from raymoe.tune.report_command import dashboard_hint

    hint = dashboard_hint(Path(outcome.sweep_dir))
    if hint:
        print(hint)
    finished = sum(r.status == "FINISHED" for r in outcome.report.rows)
    return 0 if finished else 1
