"""`raymoe compare RUN_A RUN_B ...`: one table of final metrics and one figure of overlaid curves, logged to a new
MLflow run that links the compared runs (tag raymoe.compared_runs, and one link tag per run)."""

from __future__ import annotations

import argparse
import math

from raymoe.errors import ConfigError

DEFAULT_METRICS = ("test_error", "val_error", "train_error", "train_loss", "val_loss", "mi_pred_bits",
                   "usage_entropy_bits", "dead_expert_frac")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="run names (raymoe.run_name) or MLflow run ids, two or more")
    parser.add_argument("--uri", default="sqlite:///mlflow.db", help="tracking store (default sqlite:///mlflow.db)")
    parser.add_argument("--metric", dest="metrics", action="append", default=None,
                        help="metric to compare (repeatable; default: the usual error, loss and routing ones)")
    parser.add_argument("--experiment", default="raymoe-compare", help="MLflow experiment of the comparison run")


def find(client, key: str):
    """A run by MLflow run id or by raymoe run name (newest), in any experiment."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(key)
    except MlflowException:
        pass
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`raymoe.run_name` = '{key}'",
                              order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
    if not runs:
        raise ConfigError("runs", key, "no run with that name or id in the tracking store")
    return runs[0]


def run(args: argparse.Namespace) -> int:
    from raymoe.tracking.figures import _figure
    from raymoe.tracking.mlflow_run import _retry, client_for, ensure_experiment
    from raymoe.tracking.uri import absolute_tracking_uri, sqlite_path

    if len(args.runs) < 2:
        raise ConfigError("runs", args.runs, "give two or more runs to compare")
    uri = absolute_tracking_uri(args.uri)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise ConfigError("--uri", args.uri, "no tracking store there")
    client = client_for(uri)
    runs = [find(client, key) for key in args.runs]
    wanted = args.metrics or [m for m in DEFAULT_METRICS if any(m in r.data.metrics for r in runs)]
    names = [r.data.tags.get("raymoe.run_name", r.info.run_name) for r in runs]
    lines = ["| run | " + " | ".join(wanted) + " |", "|---|" + "---|" * len(wanted)]
    for name, r in zip(names, runs):
        cells = [f"{r.data.metrics[m]:.4g}" if m in r.data.metrics else "–" for m in wanted]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    fig = _figure(3.2 * min(len(wanted), 4), 2.8 * math.ceil(len(wanted) / 4))
    for i, metric in enumerate(wanted):
        ax = fig.add_subplot(math.ceil(len(wanted) / 4), min(len(wanted), 4), i + 1)
        for name, r in zip(names, runs):
            history = sorted((m.step, m.value) for m in _retry(client.get_metric_history, r.info.run_id, metric))
            if history:
                ax.plot(*zip(*history), marker=".", label=name[:28])
        ax.set_title(metric, fontsize=8)
        ax.tick_params(labelsize=7)
    fig.axes[0].legend(fontsize=6)
    experiment_id = ensure_experiment(client, args.experiment, uri)
    tags = {"raymoe.role": "comparison", "raymoe.compared_runs": ",".join(r.info.run_id for r in runs),
            **{f"raymoe.compared.{i}": f"{name} ({r.info.run_id})" for i, (name, r) in enumerate(zip(names, runs))}}
    created = _retry(client.create_run, experiment_id, run_name="compare-" + "-vs-".join(n[:20] for n in names)[:200],
                     tags=tags)
    _retry(client.log_text, created.info.run_id, table + "\n", "comparison/table.md")
    _retry(client.log_figure, created.info.run_id, fig, "comparison/curves.png")
    _retry(client.set_terminated, created.info.run_id, "FINISHED")
    print(f"logged to MLflow run {created.info.run_id} (experiment {args.experiment!r}); raymoe ui --uri {uri}")
    return 0
