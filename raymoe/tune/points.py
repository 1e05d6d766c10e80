"""What a sweep runs: the points of a paper grid (every method row x the cartesian product of its hyperparameter
lists x N seeds), or an Optuna define-by-run space built from the declared `space:` of a sweep file.

In the Optuna space, parameters are suggested in declaration order; a parameter whose `when` conditions do not all
hold is not suggested at all, so Optuna's TPE sees a truly conditional space (no dummy values for inactive params).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raymoe.tune.sweep_schema import GridRow, ParamSpec


@dataclass(frozen=True)
class GridPoint:
    """One trial of a grid sweep (plain data: it travels inside the Tune trial config)."""

    category: str  # the paper table's row, e.g. "original_importance"
    method: str  # absolute path of the preset experiment
    overrides: dict[str, Any] = field(default_factory=dict)  # this point's grid values
    seed: int = 0
    index: int = 0  # position in the whole grid (the report's trial order)
    fixed: dict[str, Any] = field(default_factory=dict)  # the row's own overrides (not part of the label)
    stage: int = 0  # rows run in dependency order (raymoe.tune.stages)

    @property
    def label(self) -> str:
        """`category[k=v,...]` without the seed: the key for mean +- std over seeds."""
        inner = ",".join(f"{k}={v}" for k, v in self.overrides.items())
        return f"{self.category}[{inner}]" if inner else self.category

    def as_config(self) -> dict[str, Any]:
        return {"category": self.category, "method": self.method, "overrides": dict(self.overrides),
                "seed": self.seed, "label": self.label, "index": self.index, "fixed": dict(self.fixed),
                "stage": self.stage}


def row_category(row: GridRow) -> str:
    return row.category or Path(row.method).stem


def expand_row(row: GridRow) -> list[dict[str, Any]]:
    """The grid points of one method row (without seeds), in declaration order."""
    keys = list(row.grid)
    combos = itertools.product(*(row.grid[k] for k in keys)) if keys else [()]
    return [dict(zip(keys, combo)) for combo in combos]


def expand_grid(rows: list[GridRow], seeds: list[int], sweep_dir: Path,
                stages: dict[str, int] | None = None) -> list[GridPoint]:
    """All trials: for each row, each grid point, each seed (seed innermost, so a point's seeds run together).
    stages: category -> stage (default all 0)."""
    points = []
    for row in rows:
        method = str((Path(sweep_dir) / row.method).resolve())
        category = row_category(row)
        stage = (stages or {}).get(category, 0)
        for overrides in expand_row(row):
            start = len(points)
            points.extend([GridPoint(category, method, overrides, seed, start + i, dict(row.overrides), stage)
                           for i, seed in enumerate(seeds)])
    return points


def condition_holds(when: dict[str, Any], values: dict[str, Any], static: dict[str, Any]) -> bool:
    """True when every `path: value(s)` in `when` matches a sampled value (or else the fixed base value)."""
    for path, wanted in when.items():
        if path in values:
            current = values[path]
        elif path in static:
            current = static[path]
        else:
            return False  # the parameter it depends on was itself inactive
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if current not in allowed:
            return False
    return True


def suggest(trial: Any, name: str, spec: ParamSpec) -> Any:
    """One `trial.suggest_*` call for a declared parameter."""
    if spec.type == "categorical":
        return trial.suggest_categorical(name, list(spec.choices))
    if spec.type == "int":
        return trial.suggest_int(name, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
    log = spec.log or spec.type == "loguniform"
    return trial.suggest_float(name, float(spec.low), float(spec.high), step=spec.step, log=log)


class DefineByRun:
    """Picklable define-by-run function for `OptunaSearch(space=...)` (Tune pickles it with the searcher state).

    Args:
        space: dotted name -> ParamSpec, in sampling order (conditions refer to earlier names).
        static: flattened base experiment; `when` on a path outside the space compares against it.
    """

    def __init__(self, space: dict[str, ParamSpec], static: dict[str, Any]):
        self.space = dict(space)
        self.static = dict(static)

    def __call__(self, trial: Any) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, spec in self.space.items():
            if condition_holds(spec.when, values, self.static):
                values[name] = suggest(trial, name, spec)
        return values  # OptunaSearch merges this with what it captured (same values); plain Optuna uses it
