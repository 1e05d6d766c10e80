"""Uncertainty over seeds: mean, sample std and a percentile-bootstrap interval of the mean (docs/methodology.md).

With a handful of seeds the interval is wide; it is reported so that two rows whose intervals overlap are not
read as different. The resampling is seeded, so a report is reproducible to the digit.
"""

from __future__ import annotations

import math
import statistics

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, sample std with ddof 1, as pandas' .std()); nan where undefined."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def bootstrap_ci(values: list[float], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean: resample the values with replacement, take the
    (1 - level) / 2 and (1 + level) / 2 quantiles of the resampled means; nan for fewer than 2 values."""
    if len(values) < 2:
        return math.nan, math.nan
    x = np.asarray(values, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    means = x[picks].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def summary(values: list[float]) -> dict[str, float]:
    """mean, sd, ci_lo, ci_hi of a metric over seeds (the report's columns `<metric>_<stat>`)."""
    mean, sd = mean_std(values)
    lo, hi = bootstrap_ci(values)
    return {"mean": mean, "sd": sd, "ci_lo": lo, "ci_hi": hi}
