"""Optuna define-by-run search space built from the declared `space:` of a sweep file.

Parameters are suggested in declaration order; a parameter whose `when` conditions do not all hold is not
suggested at all, so Optuna's TPE sees a truly conditional space (no dummy values for inactive params).
"""

from __future__ import annotations

from typing import Any

from raymoe.tune.sweep_schema import ParamSpec


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
