"""Routing stability metrics against hand-worked cases and brute force (every permutation of the labels)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from raymoe.metrics.stability import (_contingency, adjusted_mutual_information, churn,
                                      expected_mutual_information, mutual_information)


def test_churn_by_hand():
    assert churn([0, 1, 2, 3], [0, 1, 3, 2]) == 0.5
    assert churn([1, 1, 1], [1, 1, 1]) == 0.0
    with pytest.raises(ValueError):
        churn([0, 1], [0])


def test_mutual_information_by_hand():
    # two perfectly coupled balanced binary labels: MI = ln 2
    assert mutual_information(_contingency(np.array([0, 0, 1, 1]), np.array([1, 1, 0, 0]))) == pytest.approx(
        math.log(2))
    assert mutual_information(_contingency(np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1]))) == pytest.approx(0.0)


@pytest.mark.parametrize("a, b", [([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]), ([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2]),
                                  ([0, 1, 2, 0, 1, 2, 0], [1, 1, 0, 0, 2, 2, 2])])
def test_expected_mi_equals_the_mean_over_all_permutations(a, b):
    """E[MI] under the hypergeometric model = the average MI over every reordering of one labelling."""
    a, b = np.array(a), np.array(b)
    brute = np.mean([mutual_information(_contingency(a, b[list(p)])) for p in itertools.permutations(range(len(b)))])
    table = _contingency(a, b)
    assert expected_mutual_information(table.sum(1), table.sum(0), len(a)) == pytest.approx(brute, abs=1e-12)
    h = max(-sum(c / len(a) * math.log(c / len(a)) for c in np.bincount(x) if c) for x in (a, b))
    mi = mutual_information(table)
    assert adjusted_mutual_information(a, b) == pytest.approx((mi - brute) / (h - brute))


def test_ami_identical_relabelled_and_independent():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 2000)
    assert adjusted_mutual_information(a, (a + 2) % 5) == pytest.approx(1.0)  # the same partition, new names
    assert abs(adjusted_mutual_information(a, rng.integers(0, 5, 2000))) < 0.01  # chance agreement -> ~0
    assert adjusted_mutual_information([3, 3, 3], [1, 1, 1]) == 1.0
