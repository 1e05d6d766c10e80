"""Sweep figures (matplotlib object API on the Agg canvas: no pyplot state, no display needed).

Inputs are plain lists so these stay independent of MLflow: `points` are dicts with "index", the sampled
parameters and the metric values of finished trials.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_vs_trial(points: list[dict], metric: str, mode: str) -> Figure:
    """Each finished trial's final metric by trial index, with the best-so-far line."""
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    pts = sorted((p["index"], p[metric]) for p in points if _finite(p.get(metric)))
    if pts:
        x, y = zip(*pts)
        ax.scatter(x, y, s=24, label="trial", zorder=3)
        best = np.minimum.accumulate(y) if mode == "min" else np.maximum.accumulate(y)
        ax.step(x, best, where="post", color="tab:red", label=f"best so far ({mode})")
        ax.legend()
    ax.set_xlabel("trial index")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial")
    ax.grid(alpha=0.3)
    return fig


def _axis_values(values: list[Any]) -> tuple[list[float | None], list[str] | None, bool]:
    """Map one parameter's values to floats: categorical -> index (with labels), wide positive ranges -> log10."""
    present = [v for v in values if v is not None]
    if present and all(_finite(v) for v in present):
        lo, hi = min(present), max(present)
        log = lo > 0 and hi / lo >= 100
        return [(math.log10(v) if log else float(v)) if v is not None else None for v in values], None, log
    labels = sorted({str(v) for v in present})
    return [float(labels.index(str(v))) if v is not None else None for v in values], labels, False


def parallel_coordinates(points: list[dict], params: list[str], metric: str) -> Figure:
    """One vertical axis per sampled parameter (min..max), one line per trial coloured by the metric.

    Inactive conditional parameters (absent from a trial) leave a gap in that trial's line.
    """
    fig = _figure(max(6, 1.6 * len(params) + 2), 4.5)
    ax = fig.add_subplot()
    rows = [p for p in points if _finite(p.get(metric))]
    if not rows or not params:
        ax.set_title("no finished trials to draw")
        return fig
    columns = []
    for name in params:
        mapped, labels, log = _axis_values([p.get(name) for p in rows])
        present = [v for v in mapped if v is not None]
        lo, hi = (min(present), max(present)) if present else (0.0, 1.0)
        span = hi - lo or 1.0
        columns.append(([None if v is None else (v - lo) / span for v in mapped], labels, log, lo, hi))
    values = np.array([p[metric] for p in rows], dtype=float)
    norm = (values - values.min()) / ((values.max() - values.min()) or 1.0)
    colormap = colormaps["viridis"]
    for i in range(len(rows)):
        ys = [col[0][i] for col in columns]
        color = colormap(norm[i])
        segment_x, segment_y = [], []
        for x, y in enumerate(ys):
            if y is None:
                if len(segment_x) > 1:
                    ax.plot(segment_x, segment_y, color=color, alpha=0.8)
                elif segment_x:
                    ax.scatter(segment_x, segment_y, color=color, s=10)
                segment_x, segment_y = [], []
                continue
            segment_x.append(x)
            segment_y.append(y)
        if len(segment_x) > 1:
            ax.plot(segment_x, segment_y, color=color, alpha=0.8)
        elif segment_x:
            ax.scatter(segment_x, segment_y, color=color, s=10)
    for x, (_, labels, log, lo, hi) in enumerate(columns):
        ax.axvline(x, color="black", lw=0.8)
        if labels is not None:
            for j, label in enumerate(labels):
                ax.text(x + 0.03, j / max(len(labels) - 1, 1), label, fontsize=7, va="center")
        else:
            fmt = (lambda v: f"1e{v:.1f}") if log else (lambda v: f"{v:.3g}")
            ax.text(x + 0.03, 0, fmt(lo), fontsize=7, va="bottom")
            ax.text(x + 0.03, 1, fmt(hi), fontsize=7, va="top")
    ax.set_xticks(range(len(params)))
    ax.set_xticklabels(params, rotation=20, ha="right", fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(params) - 0.5)
    mappable = ScalarMappable(norm=Normalize(values.min(), values.max()), cmap=colormap)
    fig.colorbar(mappable, ax=ax, label=metric)
    ax.set_title(f"sampled parameters coloured by {metric}")
    return fig


def pareto_front(points: list[dict], metrics: list[str], modes: list[str]) -> list[dict]:
    """The non-dominated finished trials for two or more objectives (brute force, O(n^2))."""
    rows = [p for p in points if all(_finite(p.get(m)) for m in metrics)]
    sign = [1.0 if mode == "min" else -1.0 for mode in modes]

    def dominates(a: dict, b: dict) -> bool:
        pairs = [(s * a[m], s * b[m]) for m, s in zip(metrics, sign)]
        return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)

    return [p for p in rows if not any(dominates(q, p) for q in rows if q is not p)]


def pareto_plot(points: list[dict], metrics: list[str], modes: list[str]) -> Figure:
    """The first two objectives of every finished trial, the Pareto front highlighted and joined."""
    fig = _figure(6, 4.5)
    ax = fig.add_subplot()
    m1, m2 = metrics[:2]
    rows = [p for p in points if _finite(p.get(m1)) and _finite(p.get(m2))]
    front = pareto_front(rows, metrics[:2], modes[:2])
    ax.scatter([p[m1] for p in rows], [p[m2] for p in rows], s=20, color="tab:gray", label="trial")
    front = sorted(front, key=lambda p: p[m1])
    ax.plot([p[m1] for p in front], [p[m2] for p in front], "o-", color="tab:red", label="Pareto front")
    for p in front:
        ax.annotate(str(p["index"]), (p[m1], p[m2]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"{m1} ({modes[0]})")
    ax.set_ylabel(f"{m2} ({modes[1]})")
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title("multi-objective sweep")
    return fig


def category_bars(table: list[dict]) -> Figure:
    """Paper table: the selected run's test error per method category, with the category's test-error std."""
    fig = _figure(max(5, 1.1 * len(table) + 2), 4)
    ax = fig.add_subplot()
    names = [row["category"] for row in table]
    ax.bar(range(len(table)), [row["test_error"] for row in table],
           yerr=[row["test_error_std"] if _finite(row["test_error_std"]) else 0 for row in table], capsize=4)
    ax.set_xticks(range(len(table)))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test error (run with the lowest training error)")
    ax.set_title("per method category; error bar = std of test error over the category")
    ax.grid(axis="y", alpha=0.3)
    return fig


def seeds_by_category(table: list[dict], metric: str, label: str) -> Figure:
    """Per category: each seed of the selected point as a dot, their mean and its 95% bootstrap interval as a bar
    (rows whose intervals overlap are not told apart by these seeds)."""
    fig = _figure(max(5, 1.1 * len(table) + 2), 4)
    ax = fig.add_subplot()
    for i, row in enumerate(table):
        seeds = [float(v) for v in str(row.get(f"{metric}_seeds", "")).split(";") if v]
        jitter = np.linspace(-0.12, 0.12, len(seeds)) if len(seeds) > 1 else np.zeros(len(seeds))
        ax.scatter(i + jitter, seeds, s=14, color="tab:gray", alpha=0.8, zorder=2)
        mean, lo, hi = row.get(f"{metric}_mean"), row.get(f"{metric}_ci_lo"), row.get(f"{metric}_ci_hi")
        if _finite(mean):
            err = [[mean - lo], [hi - mean]] if _finite(lo) and _finite(hi) else None
            ax.errorbar([i + 0.3], [mean], yerr=err, fmt="o", color="tab:blue", capsize=4, zorder=3)
    ax.set_xticks(range(len(table)))
    ax.set_xticklabels([row["category"] for row in table], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(label)
    ax.set_title(f"{label}: seeds (dots), mean and 95% bootstrap interval (bar)")
    ax.grid(axis="y", alpha=0.3)
    return fig


def curves_by_category(curves: dict[str, list[list[tuple[int, float]]]], metric: str, label: str) -> Figure:
    """One line per category: the mean over its runs of `metric` at each epoch, a band of +- one std, and each
    run as a thin line (e.g. H_u over epochs for the original vs the attentive gate: when a gate collapses)."""
    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot()
    colors = colormaps["tab10"]
    for i, (category, runs) in enumerate(sorted(curves.items())):
        color = colors(i % 10)
        by_step: dict[int, list[float]] = {}
        for run in runs:
            pts = sorted((s, v) for s, v in run if _finite(v))
            if pts:
                ax.plot(*zip(*pts), color=color, alpha=0.25, linewidth=0.8)
            for step, value in pts:
                by_step.setdefault(step, []).append(value)
        if not by_step:
            continue
        steps = sorted(by_step)
        mean = np.array([np.mean(by_step[s]) for s in steps])
        std = np.array([np.std(by_step[s]) for s in steps])
        ax.plot(steps, mean, color=color, linewidth=2, label=f"{category} (n={len(runs)})")
        ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel(label)
    ax.set_title(f"{label} over training, mean ± std over each category's runs")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    return fig
