"""`raymoe report SWEEP_NAME [--tracking-uri URI] [--experiment NAME]`: tables and plots of a sweep from MLflow.

Without --tracking-uri the sweep folder (./ray_results/sweeps/<name>) says where its runs were logged, else the
default store sqlite:///mlflow.db in the current folder is read.
"""

from __future__ import annotations

import argparse

from raymoe.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="the sweep's name (its name: field), e.g. fmnist_gates")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: from the sweep folder, "
                                                             "else sqlite:///mlflow.db)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: search all)")
    parser.add_argument("--out", default=None, help="report folder (default ./reports/<sweep>)")
    parser.add_argument("--storage", default=None, help="folder of sweeps (default ./ray_results/sweeps)")
    parser.add_argument("--no-log", action="store_true", help="do not log the report to the sweep's parent run")
    parser.add_argument("--register", default=None, metavar="MODEL_NAME",
                        help="register the best trial's logged model in the MLflow model registry under this name")


def check_model_name(name: str) -> None:
    """MLflow's own rule for registered model names, applied before anything is read or written."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
    except MlflowException as exc:
        raise ConfigError("--register", name, exc.message.splitlines()[0]) from None
    if "%" in name:
        raise ConfigError("--register", name, "a registered model name cannot contain '%'")


def register_best(uri: str, report, name: str) -> str:
    """Register the model logged by the sweep's best trial; returns `name version N`."""
    import mlflow

    from raymoe.tracking.mlflow_run import client_for

    if not report.best:
        raise ConfigError("--register", name, "the sweep has no finished trial to register")
    best = report.best[0]
    client = client_for(uri)
    models = [m for m in client.search_logged_models([client.get_run(best.run_id).info.experiment_id])
              if m.source_run_id == best.run_id]
    if not models:
        raise ConfigError("--register", name, f"the best trial {best.run_name} logged no model "
                                              f"(tracking.log_model was off, or it used expert parallelism)")
    mlflow.set_tracking_uri(uri)
    version = mlflow.register_model(models[0].model_uri, name)
    return f"{name} version {version.version} (trial {best.run_name})"


def run(args: argparse.Namespace) -> int:
    from raymoe.tracking.sweep_runs import read_state
    from raymoe.tracking.uri import absolute_tracking_uri
    from raymoe.tune.driver import DEFAULT_STORAGE, sweep_dir_for
    from raymoe.tune.report import build_report, format_report

    if args.register is not None:
        check_model_name(args.register)
    sweep_dir = sweep_dir_for(args.sweep, args.storage or DEFAULT_STORAGE)
    state = read_state(sweep_dir) or {}
    uri = absolute_tracking_uri(args.tracking_uri or state.get("tracking_uri") or "sqlite:///mlflow.db")
    experiment = args.experiment or (state.get("experiment") if not args.tracking_uri else None)
    parent = state.get("parent_run_id") if uri == state.get("tracking_uri") and not args.experiment else None
    report = build_report(uri, experiment, args.sweep, parent_run_id=parent, out_dir=args.out,
                          log_to_parent=not args.no_log)
    print(format_report(report))
    print(dashboard_hint(sweep_dir))
    if args.register is not None:
        print(f"registered {register_best(uri, report, args.register)}")
    return 0


def dashboard_hint(sweep_dir) -> str:
    """How to open the sweep's Optuna study (optuna sweeps keep it in sqlite beside the sweep)."""
    from raymoe.tune.driver import OPTUNA_DB, optuna_storage_url

    if not (sweep_dir / OPTUNA_DB).is_file():
        return ""
    url = optuna_storage_url(sweep_dir)
    return (f"Optuna study: optuna.load_study(study_name={sweep_dir.name!r}, storage={url!r}); dashboard: "
            f"pip install optuna-dashboard && optuna-dashboard {url}")
