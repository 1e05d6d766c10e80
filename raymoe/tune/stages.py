"""Staged grids: a row may take a setting from the best finished run of another row (docs/methodology.md).

A row override written as `{best_of: <category>, by: <metric>, mode: min}` is resolved when the row's stage
starts, from the finished trials of the named row: the paper's distilled rows take `train.distill_from` from
the attentive row picked by training error (docs/paper-notes.md §1.3 rows 8/9, §4.5). Rows run in dependency
order: stage 0 holds the rows that depend on nothing, stage k the rows whose dependencies are all in earlier
stages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from raymoe.errors import ConfigError
from raymoe.tune.sweep_schema import LOOP_METRICS, Mode, is_reported

# Settings a best_of reference can fill, and what of the picked run it fills them with.
FROM_RUN = {"train.distill_from": "its last checkpoint"}


@dataclass(kw_only=True, slots=True)
class BestOf:
    best_of: str  # the category (table row) whose best finished run supplies the value
    by: str = "train_error"  # the paper selects by training error (docs/paper-notes.md §4.5)
    mode: Mode = "min"


def is_reference(value: Any) -> bool:
    return isinstance(value, dict) and "best_of" in value


def parse_reference(value: dict[str, Any], where: str, key: str, categories: list[str], own: str) -> BestOf:
    """Check one `{best_of: ...}` override of row `own` at `where`; raises ConfigError naming the field."""
    from raymoe.config.load import from_dict

    ref = from_dict(BestOf, value, where)
    if key not in FROM_RUN:
        raise ConfigError(where, value, f"best_of can fill {sorted(FROM_RUN)} only")
    if ref.best_of not in categories:
        raise ConfigError(f"{where}.best_of", ref.best_of, f"names no row of this grid; rows: {categories}")
    if ref.best_of == own:
        raise ConfigError(f"{where}.best_of", ref.best_of, "a row cannot take a setting from itself")
    if not is_reported(ref.by):
        raise ConfigError(f"{where}.by", ref.by, f"unknown metric; the training loop reports {list(LOOP_METRICS)}")
    return ref


def stage_numbers(depends: dict[str, set[str]], where: dict[str, str]) -> dict[str, int]:
    """Stage of every category: 0 without dependencies, else 1 + the latest stage it depends on.

    Args:
        depends: category -> the categories it takes settings from.
        where: category -> its config path (for the cycle error).

    Raises:
        ConfigError: the dependencies form a cycle (named in order, e.g. a -> b -> a).
    """
    stage: dict[str, int] = {}

    def visit(category: str, trail: list[str]) -> int:
        if category in trail:
            cycle = trail[trail.index(category):] + [category]
            raise ConfigError(where[cycle[0]], " -> ".join(cycle), "rows depend on each other in a cycle")
        if category not in stage:
            stage[category] = 1 + max((visit(d, trail + [category]) for d in depends.get(category, ())), default=-1)
        return stage[category]

    for category in depends:
        visit(category, [])
    return stage


def pick_best(results: list[dict[str, Any]], ref: BestOf, where: str) -> dict[str, Any]:
    """The finished trial of row `ref.best_of` with the best `ref.by` (ties: the earlier trial).

    Args:
        results: one mapping per trial of earlier stages: category, index, status, metrics, checkpoint.
        ref: the reference.
        where: its config path, for the error.

    Raises:
        ConfigError: the row has no finished trial that reported the metric and left a checkpoint.
    """
    sign = 1.0 if ref.mode == "min" else -1.0
    candidates = [r for r in results if r["category"] == ref.best_of and r["status"] == "TERMINATED"
                  and _finite(r["metrics"].get(ref.by)) and r.get("checkpoint")]
    if not candidates:
        raise ConfigError(f"{where}.best_of", ref.best_of,
                          f"that row has no finished run with {ref.by} and a checkpoint, so this row cannot start")
    return min(candidates, key=lambda r: (sign * float(r["metrics"][ref.by]), r["index"]))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
