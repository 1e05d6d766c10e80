"""A sweep's report, read back from MLflow: all trials, the best trial (or Pareto front), mean +- std over seeds,
and for grid sweeps the paper-style table (docs/paper-notes.md §4.5).

Paper table, per method category: the run with the LOWEST TRAINING error is selected; the table gives its test
error, I(E;Y) (mi_pred_bits), H_s (sample_entropy_bits) and H_u (usage_entropy_bits), and the std of the test
error over every run of the category (all hyperparameter values and seeds; ddof=1, as pandas' .std()).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raymoe.tune.uncertainty import summary
from raymoe.tune.trial import (CATEGORY_TAG, PARAMS_TAG, POINT_TAG, ROLE_TAG, SEED_TAG, SWEEP_TAG,
                               TRIAL_INDEX_TAG)

IMAGE_TABLE_METRICS = ("test_error", "train_error", "train_loss", "mi_pred_bits", "sample_entropy_bits",
                       "usage_entropy_bits")
LM_TABLE_METRICS = ("val_loss", "val_bits_per_byte", "test_loss", "test_bits_per_byte", "train_loss",
                    "mi_next_token_bits", "usage_entropy_bits")
TABLE_METRICS = IMAGE_TABLE_METRICS  # the table's columns; language-model sweeps switch to LM_TABLE_METRICS
CURVE_METRICS = ("usage_entropy_bits",)  # per-epoch curves drawn per category for grid sweeps
SHORT = {"test_error": "test err", "train_error": "train err", "train_loss": "train loss", "mi_pred_bits": "I(E;Y)",
         "val_loss": "val loss", "val_bits_per_byte": "val bpb", "test_loss": "test loss",
         "test_bits_per_byte": "test bpb", "mi_next_token_bits": "I(E;next)",
         "sample_entropy_bits": "H_s", "usage_entropy_bits": "H_u"}


@dataclass
class TrialRow:
    index: int
    run_name: str
    run_id: str
    status: str  # MLflow status: FINISHED / FAILED / KILLED / RUNNING
    point: str
    seed: str
    category: str | None
    params: dict[str, Any]
    metrics: dict[str, float]
    epochs: int
    note: str = ""  # failure reason or "stopped early"
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # CURVE_METRICS per epoch (grid)

    def as_point(self) -> dict[str, Any]:
        return {"index": self.index, **self.params, **self.metrics}


@dataclass
class SweepReport:
    name: str
    parent_run_id: str
    strategy: str
    metrics: list[str]
    modes: list[str]
    rows: list[TrialRow]
    best: list[TrialRow]  # one row (single objective) or the Pareto front
    seed_table: list[dict[str, Any]] = field(default_factory=list)
    paper_table: list[dict[str, Any]] = field(default_factory=list)
    table_metrics: tuple[str, ...] = TABLE_METRICS
    files: list[str] = field(default_factory=list)

    @property
    def param_names(self) -> list[str]:
        names: list[str] = []
        for row in self.rows:
            names.extend(k for k in row.params if k not in names)
        return names


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def find_parent(client, name: str, experiment: str | None = None):
    """The newest parent run of sweep `name` (in `experiment`, or in any experiment); None if there is none."""
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        ids = [found.experiment_id] if found is not None else []
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return None
    runs = client.search_runs(ids, filter_string=f"tags.`{SWEEP_TAG}` = '{name}' and tags.`{ROLE_TAG}` = 'sweep'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def collect_rows(client, parent, curves: tuple[str, ...] = ()) -> list[TrialRow]:
    """One row per child run of the parent, ordered by Tune trial index; with the per-epoch history of `curves`."""
    from raymoe.tracking.mlflow_run import FAILURE_TAG
    from raymoe.tracking.sweep_runs import STOPPED_EARLY_TAG, sweep_children

    rows = []
    for run in sweep_children(client, parent.info.experiment_id, parent.info.run_id):
        tags = run.data.tags
        history = client.get_metric_history(run.info.run_id, "test_error")
        note = tags.get(FAILURE_TAG, "") if run.info.status != "FINISHED" else ""  # a retried trial may keep it
        if tags.get(STOPPED_EARLY_TAG) == "true":
            note = "stopped early (ASHA)"
        rows.append(TrialRow(
            index=int(tags.get(TRIAL_INDEX_TAG, -1)), run_name=run.info.run_name, run_id=run.info.run_id,
            status=run.info.status, point=tags.get(POINT_TAG, ""), seed=tags.get(SEED_TAG, ""),
            category=tags.get(CATEGORY_TAG), params=json.loads(tags.get(PARAMS_TAG, "{}")),
            metrics=dict(run.data.metrics), epochs=len({m.step for m in history}), note=note,
            curves={name: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
                    for name in curves}))
    return sorted(rows, key=lambda r: (r.index, r.run_name))


def best_rows(rows: list[TrialRow], metrics: list[str], modes: list[str]) -> list[TrialRow]:
    from raymoe.tune.plots import pareto_front

    done = [r for r in rows if r.status == "FINISHED" and all(_finite(r.metrics.get(m)) for m in metrics)]
    if not done:
        return []
    if len(metrics) == 1:
        sign = 1.0 if modes[0] == "min" else -1.0
        return [min(done, key=lambda r: sign * r.metrics[metrics[0]])]
    by_index = {id(r): r for r in done}
    front = pareto_front([{**r.metrics, "_id": id(r)} for r in done], metrics, modes)
    return [by_index[p["_id"]] for p in front]


def table_metrics_for(rows: list[TrialRow]) -> tuple[str, ...]:
    """The report's columns: the paper's for image runs, validation loss and bits per byte for language models."""
    return LM_TABLE_METRICS if any("val_bits_per_byte" in r.metrics for r in rows) else IMAGE_TABLE_METRICS


def seed_table(rows: list[TrialRow], metrics: tuple[str, ...] = TABLE_METRICS) -> list[dict[str, Any]]:
    """Mean and std over seeds of each point (grid: the grid point; optuna: the sampled point), finished runs."""
    groups: dict[str, list[TrialRow]] = {}
    for row in rows:
        if row.status == "FINISHED":
            groups.setdefault(row.point, []).append(row)
    table = []
    for point, members in groups.items():
        entry: dict[str, Any] = {"point": point, "category": members[0].category or "", "n_seeds": len(members)}
        if not members[0].category:
            entry["params"] = json.dumps(members[0].params, sort_keys=True)
        for metric in metrics:
            stats = summary([r.metrics[metric] for r in members if _finite(r.metrics.get(metric))])
            entry.update({f"{metric}_mean": stats["mean"], f"{metric}_std": stats["sd"],
                          f"{metric}_ci_lo": stats["ci_lo"], f"{metric}_ci_hi": stats["ci_hi"]})
        table.append(entry)
    return table


def paper_table(rows: list[TrialRow], metrics: tuple[str, ...] = TABLE_METRICS) -> list[dict[str, Any]]:
    """Per category, the finished run with the lowest training error and the category's test-error std
    (docs/paper-notes.md §4.5); language models: the lowest validation loss and the std of validation loss. Then,
    over the seeds of the selected grid point (a category's only point when it has no grid), every metric's mean,
    sd and 95% bootstrap interval (`<metric>_mean`, `_sd`, `_ci_lo`, `_ci_hi`) and the per-seed values
    (`<metric>_seeds`, for the figure)."""
    select, spread = ("val_loss", "val_loss") if "val_loss" in metrics else ("train_error", "test_error")
    categories: dict[str, list[TrialRow]] = {}
    for row in rows:
        if row.category and row.status == "FINISHED":
            categories.setdefault(row.category, []).append(row)
    table = []
    for category, members in categories.items():
        ranked = [r for r in members if _finite(r.metrics.get(select))]
        if not ranked:
            continue
        pick = min(ranked, key=lambda r: r.metrics[select])
        spreads = [r.metrics[spread] for r in members if _finite(r.metrics.get(spread))]
        table.append({"category": category, "selected": pick.point, "seed": pick.seed, "run": pick.run_name,
                      **{m: pick.metrics.get(m, math.nan) for m in metrics},
                      f"{spread}_std": statistics.stdev(spreads) if len(spreads) > 1 else math.nan,
                      **_seed_stats([r for r in members if r.point == pick.point], metrics),
                      "n_runs": len(members)})
    return table


def _seed_stats(runs: list[TrialRow], metrics: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"n_seeds": len(runs)}
    for m in metrics:
        values = [r.metrics[m] for r in runs if _finite(r.metrics.get(m))]
        out.update({f"{m}_{stat}": value for stat, value in summary(values).items()})
        out[f"{m}_seeds"] = ";".join(f"{v:.6g}" for v in values)
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def markdown(table: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not table:
        return "(no rows)\n"
    columns = columns or list(table[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")).replace("|", "/") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def text_table(table: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not table:
        return "(no rows)"
    columns = columns or list(table[0])
    cells = [[_fmt(row.get(c, ""))[:48] for c in columns] for row in table]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _write_csv(path: Path, table: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in table:
        columns.extend(k for k in row if k not in columns)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)


def trials_table(report: SweepReport) -> list[dict[str, Any]]:
    metrics = list(dict.fromkeys([*report.metrics, *report.table_metrics]))
    table = []
    for row in report.rows:
        entry: dict[str, Any] = {"trial": row.index, "status": row.status, "point": row.point, "seed": row.seed}
        if report.strategy == "grid":
            entry["category"] = row.category or ""
        entry.update({p: row.params.get(p, "") for p in report.param_names})
        entry.update({SHORT.get(m, m): row.metrics.get(m, math.nan) for m in metrics})
        entry.update(epochs=row.epochs, note=row.note[:120].replace("\n", " "), run=row.run_name)
        table.append(entry)
    return table


def build_report(uri: str, experiment: str | None, name: str, *, parent_run_id: str | None = None,
                 out_dir: str | Path | None = None, log_to_parent: bool = True) -> SweepReport:
    """Read the sweep from MLflow, write CSV/Markdown/PNG into out_dir (default ./reports/<name>) and log them.

    Raises:
        ConfigError: no sweep of that name in the tracking store.
    """
    from raymoe.errors import ConfigError
    from raymoe.tracking.mlflow_run import client_for
    from raymoe.tune import plots

    client = client_for(uri)
    parent = client.get_run(parent_run_id) if parent_run_id else find_parent(client, name, experiment)
    if parent is None:
        where = f"experiment {experiment!r}" if experiment else "any experiment"
        raise ConfigError("sweep", name, f"no sweep of that name in {uri} ({where})")
    params = parent.data.params
    metrics, modes = params.get("metric", "test_error").split(","), params.get("mode", "min").split(",")
    strategy = parent.data.tags.get("raymoe.strategy", params.get("strategy", "optuna"))
    rows = collect_rows(client, parent, CURVE_METRICS if strategy == "grid" else ())
    report = SweepReport(name, parent.info.run_id, strategy, metrics, modes, rows, best_rows(rows, metrics, modes))
    report.table_metrics = columns = table_metrics_for(rows)
    seeds = seed_table(rows, columns)
    report.seed_table = seeds if any(t["n_seeds"] > 1 for t in seeds) else []
    report.paper_table = paper_table(rows, columns) if strategy == "grid" else []

    out = Path(out_dir or Path("reports") / name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    trials = trials_table(report)
    files = {"trials.csv": trials, "trials.md": trials}
    if report.seed_table:
        files.update({"seeds.csv": report.seed_table,
                      "seeds.md": _mean_std_strings(report.seed_table, report.table_metrics)})
    if report.paper_table:
        files.update({"paper_table.csv": report.paper_table,
                      "paper_table.md": _selection_columns(report.paper_table),
                      "paper_table_over_seeds.md": _over_seeds(report.paper_table, report.table_metrics)})
    for filename, table in files.items():
        path = out / filename
        if filename.endswith(".csv"):
            _write_csv(path, table)
        else:
            path.write_text(f"# sweep {name}: {filename[:-3].replace('_', ' ')}\n\n{markdown(table)}")
    best = [{"trial": r.index, "run": r.run_name, "run_id": r.run_id, "params": r.params,
             **{m: r.metrics.get(m) for m in metrics}} for r in report.best]
    (out / "best.json").write_text(json.dumps(best, indent=2, default=str))
    points = [r.as_point() for r in rows if r.status == "FINISHED"]
    figures = {"metric_vs_trial.png": plots.metric_vs_trial(points, metrics[0], modes[0]),
               "parallel_coordinates.png": plots.parallel_coordinates(points, report.param_names, metrics[0])}
    if len(metrics) > 1:
        figures["pareto_front.png"] = plots.pareto_plot(points, metrics, modes)
    if report.paper_table:
        headline = report.table_metrics[0]  # test error, or validation loss for language models
        figures["seeds_by_row.png"] = plots.seeds_by_category(report.paper_table, headline,
                                                              SHORT.get(headline, headline))
    if report.paper_table and "test_error" in report.table_metrics:
        figures["paper_table.png"] = plots.category_bars(report.paper_table)
        for metric in CURVE_METRICS:
            by_category: dict[str, list] = {}
            for r in rows:
                if r.status == "FINISHED" and r.category and r.curves.get(metric):
                    by_category.setdefault(r.category, []).append(r.curves[metric])
            if by_category:
                figures[f"{metric}_over_epochs.png"] = plots.curves_by_category(by_category, metric,
                                                                                SHORT.get(metric, metric))
    for filename, fig in figures.items():
        with warnings.catch_warnings():  # constrained layout gives up on crowded axes; the figure is still fine
            warnings.simplefilter("ignore", UserWarning)
            fig.savefig(out / filename)
    report.files = sorted(str(p) for p in out.iterdir() if p.is_file())
    if log_to_parent:
        _log_to_parent(client, report, out)
    return report


def _log_to_parent(client, report: SweepReport, out: Path) -> None:
    from raymoe.tracking.mlflow_run import _retry

    run_id = report.parent_run_id
    _retry(client.log_artifacts, run_id, str(out), "report")
    tags = {"raymoe.num_trials": str(len(report.rows)),
            "raymoe.num_finished": str(sum(r.status == "FINISHED" for r in report.rows)),
            "raymoe.num_failed": str(sum(r.status == "FAILED" for r in report.rows))}
    if report.best:
        best = report.best[0]
        tags.update({"raymoe.best_run_id": best.run_id, "raymoe.best_run_name": best.run_name,
                     "raymoe.best_params": json.dumps(best.params, sort_keys=True, default=str)[:5000]})
        tags.update({f"best.param.{k}": str(v)[:5000] for k, v in best.params.items()})
        for metric in report.table_metrics:
            if _finite(best.metrics.get(metric)):
                _retry(client.log_metric, run_id, f"best_{metric}", best.metrics[metric])
        if len(report.metrics) > 1:
            tags["raymoe.pareto_runs"] = ",".join(r.run_name for r in report.best)[:5000]
    for key, value in tags.items():
        _retry(client.set_tag, run_id, key, value)


STAT_SUFFIXES = ("_mean", "_std", "_sd", "_ci_lo", "_ci_hi", "_seeds")


def _mean_std_strings(table: list[dict[str, Any]],
                      metrics: tuple[str, ...] = TABLE_METRICS) -> list[dict[str, Any]]:
    """`x_mean`, `x_std` (or `x_sd`), `x_ci_lo`, `x_ci_hi` columns -> one `x` column: `mean ± std [lo, hi]`."""
    out = []
    for row in table:
        entry = {k: v for k, v in row.items() if not _is_stat(k)}
        for metric in metrics:
            mean = row.get(f"{metric}_mean", math.nan)
            std = row.get(f"{metric}_std", row.get(f"{metric}_sd", math.nan))
            lo, hi = row.get(f"{metric}_ci_lo", math.nan), row.get(f"{metric}_ci_hi", math.nan)
            interval = f" [{_fmt(lo)}, {_fmt(hi)}]" if _finite(lo) else ""
            entry[SHORT[metric]] = f"{_fmt(mean)} ± {_fmt(std)}{interval}"
        out.append(entry)
    return out


def _selection_columns(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The paper table without its over-seeds statistics (printed separately)."""
    return [{k: v for k, v in row.items() if not _is_stat(k) or k.endswith("_std")} for row in table]


def _is_stat(key: str) -> bool:
    """`<metric>_<stat>` columns of the over-seeds statistics (not n_seeds or n_runs)."""
    return key.endswith(STAT_SUFFIXES) and not key.startswith("n_")


def _over_seeds(table: list[dict[str, Any]], metrics: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = _mean_std_strings(table, metrics)
    return [{"category": r["category"], "n_seeds": r["n_seeds"], **{SHORT[m]: r[SHORT[m]] for m in metrics}}
            for r in rows]


def short_names(names: list[str]) -> dict[str, str]:
    """Dotted paths -> their shortest unambiguous tails (regularizer.sample_similarity.beta_s -> beta_s)."""
    out = {}
    for name in names:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            tail = ".".join(parts[-k:])
            if sum(1 for other in names if other == tail or other.endswith("." + tail)) == 1:
                out[name] = tail
                break
        else:
            out[name] = name
    return out


def format_report(report: SweepReport) -> str:
    """The text `raymoe report` prints (parameter columns by their short names; the files keep full paths)."""
    short = short_names(report.param_names)
    trials = [{short.get(k, k): v for k, v in row.items()} for row in trials_table(report)]
    parts = [f"sweep {report.name} ({report.strategy}): {len(report.rows)} trial(s), "
             f"{sum(r.status == 'FINISHED' for r in report.rows)} finished, "
             f"{sum(r.status == 'FAILED' for r in report.rows)} failed", "", text_table(trials)]
    if report.best:
        label = "best trial" if len(report.metrics) == 1 else "Pareto front"
        parts += ["", f"{label} ({', '.join(f'{m} {o}' for m, o in zip(report.metrics, report.modes))}):"]
        for row in report.best:
            values = ", ".join(f"{m} {row.metrics[m]:.4g}" for m in report.metrics)
            params = json.dumps(row.params, default=str)
            parts.append(f"  trial {row.index} ({row.run_name}): {values}; params {params}")
    if report.seed_table:
        parts += ["", "mean ± std over seeds (finished runs):",
                  text_table(_mean_std_strings(report.seed_table, report.table_metrics))]
    if report.paper_table and "val_loss" in report.table_metrics:
        parts += ["", "per category: the run with the lowest validation loss; std = validation loss over the "
                      "category:", text_table(_selection_columns(report.paper_table))]
    elif report.paper_table:
        parts += ["", "paper table (per category: the run with the lowest training error; std = test error over "
                      "the category):", text_table(_selection_columns(report.paper_table))]
    if report.paper_table:
        parts += ["", "the selected point over its seeds: mean ± std [95% bootstrap interval of the mean]:",
                  text_table(_over_seeds(report.paper_table, report.table_metrics))]
    if report.files:
        parts += ["", f"files: {Path(report.files[0]).parent}"]
    return "\n".join(parts)
