"""Confidence intervals and CI-decided claims."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from experiments import stats


def test_mean_ci_is_the_student_t_interval():
    values = [0.80, 0.82, 0.85, 0.79, 0.81]
    mean, half = stats.mean_ci(values)
    sd = np.std(values, ddof=1)
    assert mean == pytest.approx(np.mean(values))
    assert half == pytest.approx(2.7764451051977934 * sd / math.sqrt(5))
    assert math.isnan(stats.mean_ci([0.5])[1])


def test_diff_ci_matches_welch():
    a, b = [0.9, 0.92, 0.91, 0.95], [0.8, 0.85, 0.83, 0.81]
    d, lo, hi = stats.diff_ci(a, b)
    va, vb = np.var(a, ddof=1) / 4, np.var(b, ddof=1) / 4
    dof = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 3)
    half = scipy_stats.t.ppf(0.975, dof) * math.sqrt(va + vb)
    assert d == pytest.approx(np.mean(a) - np.mean(b))
    assert (lo, hi) == pytest.approx((d - half, d + half))


def test_claims_are_decided_by_the_interval_not_the_point_estimate():
    clearly_better = [0.90, 0.91, 0.92, 0.90, 0.91]
    worse = [0.80, 0.81, 0.79, 0.80, 0.82]
    noisy_slightly_better = [0.86, 0.70, 0.95, 0.75, 0.90]
    assert stats.better("a beats b", "a", clearly_better, "b", worse).holds
    assert not stats.better("b beats a", "b", worse, "a", clearly_better).holds
    # Higher mean but within noise: "better" does not hold, "at least" does.
    assert np.mean(noisy_slightly_better) > np.mean(worse) + 0.0
    assert not stats.better("n > w", "n", noisy_slightly_better, "w", [0.82] * 5).holds
    assert stats.at_least("n >= w", "n", noisy_slightly_better, "w", [0.82] * 5).holds
    assert not stats.at_least("w >= a", "w", worse, "a", clearly_better).holds
    line = stats.better("a beats b", "a", clearly_better, "b", worse).line()
    assert line.startswith("HOLDS: a beats b (") and "95% CI" in line
