"""Means, 95% confidence intervals and claims checked with them.

A claim is a sentence from a paper ("RigL is at least as accurate as SET")
checked against measured per-seed values. Orderings are decided by the 95%
Welch confidence interval of the difference of means, never by the point
estimates alone:

    "A >= B" (at least as good)  holds unless A is significantly worse:
                                  upper end of CI(mean_A - mean_B) >= 0
    "A > B"  (better)            holds only if A is significantly better:
                                  lower end of CI(mean_A - mean_B) > 0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats as scipy_stats

__all__ = ["Claim", "at_least", "better", "fmt", "mean_ci", "diff_ci"]


class Claim(NamedTuple):
    """A checked statement: the sentence, whether it holds, and the numbers behind it."""

    sentence: str
    holds: bool
    evidence: str

    def line(self) -> str:
        verdict = "HOLDS" if self.holds else "DOES NOT HOLD"
        return f"{verdict}: {self.sentence} ({self.evidence})"


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its Student-t confidence interval (nan for one value)."""
    x = np.asarray(values, np.float64)
    if x.size == 0:
        return math.nan, math.nan
    if x.size == 1:
        return float(x[0]), math.nan
    half = scipy_stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(half)


def diff_ci(
    a: Sequence[float], b: Sequence[float], level: float = 0.95
) -> tuple[float, float, float]:
    """mean(a) - mean(b) and its Welch confidence interval (low, high).

    With a single value on either side there is no interval: low = high = the
    difference of the point estimates.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = float(a.mean() - b.mean())
    if a.size < 2 or b.size < 2:
        return d, d, d
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0:
        return d, d, d
    dof = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    half = scipy_stats.t.ppf(0.5 + level / 2, dof) * se
    return d, d - half, d + half


def fmt(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """'mean ± ci' (in percent by default)."""
    m, h = mean_ci(values)
    if math.isnan(h):
        return f"{scale * m:.{digits}f}"
    return f"{scale * m:.{digits}f} ± {scale * h:.{digits}f}"


def _evidence(name_a: str, a, name_b: str, b) -> str:
    d, lo, hi = diff_ci(a, b)
    return (
        f"{name_a} {fmt(a)} vs {name_b} {fmt(b)}; difference {100 * d:+.1f}, "
        f"95% CI [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    )


def at_least(sentence: str, name_a: str, a, name_b: str, b) -> Claim:
    """Claim that A is at least as good as B (A is not significantly worse)."""
    _, _, hi = diff_ci(a, b)
    return Claim(sentence, bool(hi >= 0), _evidence(name_a, a, name_b, b))


def better(sentence: str, name_a: str, a, name_b: str, b) -> Claim:
    """Claim that A is better than B (significantly, at 95%)."""
    _, lo, _ = diff_ci(a, b)
    return Claim(sentence, bool(lo > 0), _evidence(name_a, a, name_b, b))
