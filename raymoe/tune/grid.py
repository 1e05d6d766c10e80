"""The paper's grids: every method row x the cartesian product of its hyperparameter lists x N seeds."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raymoe.tune.sweep_schema import GridRow


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
