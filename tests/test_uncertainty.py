"""The report's over-seeds statistics against exact enumeration: every one of the n^n equally likely resamples."""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pytest

from raymoe.tune.uncertainty import bootstrap_ci, summary


def _exact_quantiles(values, level):
    means = sorted(statistics.fmean(pick) for pick in itertools.product(values, repeat=len(values)))
    return np.quantile(means, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")  # the law is discrete


@pytest.mark.parametrize("values", [[0.11, 0.12, 0.15, 0.10], [0.2, 0.9, 0.3], [1.0, 1.0, 3.0, 2.0, 0.0]])
def test_bootstrap_interval_matches_the_exact_resampling_distribution(values):
    lo, hi = bootstrap_ci(values)
    exact_lo, exact_hi = _exact_quantiles(values, 0.95)
    spread = max(values) - min(values)
    assert abs(lo - exact_lo) < 0.05 * spread and abs(hi - exact_hi) < 0.05 * spread  # quantiles of a discrete law
    assert lo <= statistics.fmean(values) <= hi


def test_summary_columns_and_the_degenerate_cases():
    stats = summary([0.1, 0.3])
    assert stats["mean"] == pytest.approx(0.2) and stats["sd"] == pytest.approx(math.sqrt(0.02))
    assert (stats["ci_lo"], stats["ci_hi"]) == pytest.approx((0.1, 0.3))
    assert bootstrap_ci([0.1, 0.3]) == bootstrap_ci([0.1, 0.3])  # seeded: a report is reproducible
    one = summary([0.5])
    assert one["mean"] == 0.5 and all(math.isnan(one[k]) for k in ("sd", "ci_lo", "ci_hi"))
    assert all(math.isnan(v) for v in summary([]).values())
