"""The routing-collapse stopper (sweep key `stop_on`): a Tune Stopper that ends a trial once its routing metric
has crossed the threshold at `after` evaluations in a row (e.g. half the experts dead for 3 epochs), and keeps the
reason so the driver can tag the trial's MLflow run (docs/observatory.md). Other trials go on."""

from __future__ import annotations

import math

from ray.tune.stopper import Stopper

STOPPED_REASON_TAG = "raymoe.stopped_reason"


class CollapseStopper(Stopper):
    """Args: the stop_on settings, and where the trials' MLflow runs live (`<sweep>-<trial id>` in the store)."""

    def __init__(self, metric: str, above: float | None, below: float | None, after: int,
                 tracking_uri: str | None = None, experiment: str | None = None, sweep_name: str = ""):
        self.metric, self.above, self.below, self.after = metric, above, below, after
        self.tracking_uri, self.experiment, self.sweep_name = tracking_uri, experiment, sweep_name
        self.streak: dict[str, int] = {}
        self.reasons: dict[str, str] = {}  # trial id -> why it was stopped

    def crossed(self, value: float) -> bool:
        if not isinstance(value, (int, float)) or math.isnan(value):
            return False
        return value > self.above if self.above is not None else value < self.below

    def __call__(self, trial_id: str, result: dict) -> bool:
        if self.metric not in result:
            return False
        value = result[self.metric]
        self.streak[trial_id] = self.streak.get(trial_id, 0) + 1 if self.crossed(value) else 0
        if self.streak[trial_id] >= self.after:
            side = f"> {self.above}" if self.above is not None else f"< {self.below}"
            shown = value + 0.0  # no "-0"
            self.reasons[trial_id] = (f"routing collapsed: {self.metric} = {shown:.4g} {side} at {self.after} "
                                      f"evaluation(s) in a row (stop_on)")
            self._tag(trial_id)
            return True
        return False

    def _tag(self, trial_id: str) -> None:
        """The reason on the trial's MLflow run (the driver's reconcile marks it FINISHED, stopped early)."""
        if self.tracking_uri is None:
            return
        from raymoe.tracking.mlflow_run import _retry, client_for, ensure_experiment, find_runs

        client = client_for(self.tracking_uri)
        runs = find_runs(client, ensure_experiment(client, self.experiment, self.tracking_uri),
                         f"{self.sweep_name}-{trial_id}")
        for run in runs[:1]:
            _retry(client.set_tag, run.info.run_id, STOPPED_REASON_TAG, self.reasons[trial_id])

    def stop_all(self) -> bool:
        return False
