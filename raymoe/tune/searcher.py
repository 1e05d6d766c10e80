"""Seeds over Optuna points: each sampled point runs as one Tune trial per seed; Optuna sees one trial per point.

Why this shape: MLflow stays one child run per Tune trial (one training run per seed), ASHA still sees
per-epoch results of every run, and Optuna is told the mean objective over the point's seeds once all of
them have finished, so TPE models the seed-averaged objective instead of seed noise.
"""

from __future__ import annotations

import logging
import math
import pickle
from typing import Any

from ray.tune.search import Searcher

log = logging.getLogger(__name__)
POINT_KEY = "point"  # Tune config key: the sampled point's id, shared by its seeds
SEED_KEY = "seed"


class SeedRepeatSearch(Searcher):
    """Wraps an OptunaSearch: `suggest` hands out each new Optuna point once per seed.

    Args:
        inner: the OptunaSearch (define-by-run space, metric(s) and mode(s) set).
        seeds: the seeds each point runs with.
        metric, mode: as on the inner searcher (str or list for multi-objective).
    """

    def __init__(self, inner: Any, seeds: list[int], metric: str | list[str], mode: str | list[str]):
        super().__init__(metric=metric, mode=mode)
        self.inner = inner
        self.seeds = list(seeds)
        self.pending: list[tuple[str, int, dict[str, Any]]] = []  # (point, seed, params) not yet handed out
        self.trial_point: dict[str, str] = {}  # Tune trial id -> point id
        self.results: dict[str, dict[int, dict | None]] = {}  # point id -> seed -> final result (None = error)
        self.trial_seed: dict[str, int] = {}
        self.num_points = 0
        self.last_step: dict[str, int] = {}  # point -> last intermediate step told to Optuna

    def suggest(self, trial_id: str) -> dict | str | None:
        if not self.pending:
            point = f"p{self.num_points:04d}"
            params = self.inner.suggest(point)
            if params is None or params == Searcher.FINISHED:
                return params
            self.num_points += 1
            self.results[point] = {}
            self.pending = [(point, seed, params) for seed in self.seeds]
        point, seed, params = self.pending.pop(0)
        self.trial_point[trial_id] = point
        self.trial_seed[trial_id] = seed
        return {**params, POINT_KEY: point, SEED_KEY: seed}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        point = self.trial_point.get(trial_id)
        single = len(self.seeds) == 1 and isinstance(self.metric, str)  # per-epoch values mean nothing per point
        step = result.get("training_iteration", 0)
        if point is not None and single and self.metric in result and step > self.last_step.get(point, 0):
            self.last_step[point] = step  # a resumed trial starts counting again; Optuna keeps the first value
            _tell_once(self.inner.on_trial_result, point, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        point = self.trial_point.get(trial_id)
        if point is None:  # a trial this searcher never handed out (state saved before it) has nothing to tell
            log.warning("trial %s completed but is unknown to the searcher", trial_id)
            return
        self.results[point][self.trial_seed[trial_id]] = None if error or not result else dict(result)
        if len(self.results[point]) < len(self.seeds):
            return
        merged = _mean_result(list(self.results[point].values()), self.metric)
        _tell_once(self.inner.on_trial_complete, point, result=merged, error=merged is None)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


def _tell_once(tell, point: str, *args, **kwargs) -> None:
    """Tell Optuna about a point unless its study (sqlite, beside the sweep) already holds the point's final value:
    a driver killed after telling but before saving this searcher re-runs the point on --resume."""
    from optuna.exceptions import UpdateFinishedTrialError

    try:
        tell(point, *args, **kwargs)
    except (UpdateFinishedTrialError, ValueError) as exc:  # report() / tell() on a trial the study has finished
        if isinstance(exc, ValueError) and not str(exc).startswith("Cannot tell a"):
            raise
        log.warning("point %s was already finished in the Optuna study (told before the driver was killed)", point)


def _mean_result(results: list[dict | None], metric: str | list[str]) -> dict | None:
    """Mean of each objective over the seeds that produced a finite value; None if no seed did."""
    metrics = [metric] if isinstance(metric, str) else list(metric)
    merged = {}
    for name in metrics:
        values = [r[name] for r in results if r and isinstance(r.get(name), (int, float))
                  and math.isfinite(r[name])]
        if not values:
            return None
        merged[name] = sum(values) / len(values)
    return merged
