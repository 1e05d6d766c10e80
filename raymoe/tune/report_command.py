"""`raymoe report SWEEP_NAME [--tracking-uri URI] [--experiment NAME]`: tables and plots of a sweep from MLflow.

Without --tracking-uri the sweep folder (./ray_results/sweeps/<name>) says where its runs were logged, else the
default store sqlite:///mlflow.db in the current folder is read.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="the sweep's name (its name: field), e.g. fmnist_gates")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: from the sweep folder, "
                                                             "else sqlite:///mlflow.db)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: search all)")
    parser.add_argument("--out", default=None, help="report folder (default ./reports/<sweep>)")
    parser.add_argument("--storage", default=None, help="folder of sweeps (default ./ray_results/sweeps)")
    parser.add_argument("--no-log", action="store_true", help="do not log the report to the sweep's parent run")


def run(args: argparse.Namespace) -> int:
    from raymoe.train.loop_config import absolute_tracking_uri
    from raymoe.tune.driver import DEFAULT_STORAGE, sweep_dir_for
    from raymoe.tune.mlflow_sweep import read_state
    from raymoe.tune.report import build_report, format_report

    sweep_dir = sweep_dir_for(args.sweep, args.storage or DEFAULT_STORAGE)
    state = read_state(sweep_dir) or {}
    uri = absolute_tracking_uri(args.tracking_uri or state.get("tracking_uri") or "sqlite:///mlflow.db")
    experiment = args.experiment or (state.get("experiment") if not args.tracking_uri else None)
    parent = state.get("parent_run_id") if uri == state.get("tracking_uri") and not args.experiment else None
    report = build_report(uri, experiment, args.sweep, parent_run_id=parent, out_dir=args.out,
                          log_to_parent=not args.no_log)
    print(format_report(report))
    print(dashboard_hint(sweep_dir))
    return 0


def dashboard_hint(sweep_dir) -> str:
    """How to open the sweep's Optuna study (optuna sweeps keep it in sqlite beside the sweep)."""
    from raymoe.tune.driver import OPTUNA_DB, optuna_storage_url

    if not (sweep_dir / OPTUNA_DB).is_file():
        return ""
    url = optuna_storage_url(sweep_dir)
    return (f"Optuna study: optuna.load_study(study_name={sweep_dir.name!r}, storage={url!r}); dashboard: "
            f"pip install optuna-dashboard && optuna-dashboard {url}")
