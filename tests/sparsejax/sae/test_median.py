"""The geometric median against scipy's general-purpose minimiser."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from sparsejax.sae import geometric_median


def _objective(y, points, weights):
    return float(np.sum(weights * np.linalg.norm(points - y, axis=1)))


@pytest.mark.parametrize("seed, n, d", [(0, 7, 2), (1, 40, 5), (2, 200, 16), (3, 3, 3)])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_scipy_minimize_on_random_points(seed, n, d, weighted):
    rng = np.random.default_rng(seed)
    points = rng.standard_normal((n, d))
    points[: max(1, n // 10)] *= 30.0  # a few outliers, where the median and the mean differ
    weights = rng.uniform(0.2, 2.0, n) if weighted else np.ones(n)
    ours = np.asarray(
        geometric_median(
            jnp.asarray(points, jnp.float32), weights=jnp.asarray(weights, jnp.float32)
        ),
        np.float64,
    )
    ref = scipy.optimize.minimize(
        _objective, points.mean(axis=0), args=(points, weights), method="BFGS", tol=1e-10
    ).x
    f_ours, f_ref = _objective(ours, points, weights), _objective(ref, points, weights)
    assert f_ours <= f_ref * (1 + 1e-5), (f_ours, f_ref)
    np.testing.assert_allclose(ours, ref, atol=2e-3 * (1 + np.linalg.norm(ref)))
    assert f_ours < _objective(points.mean(axis=0), points, weights) or n <= 3


def test_a_majority_at_one_point_is_the_median():
    points = np.zeros((9, 3), np.float32)
    points[5:] = [[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0], [4.0, 4.0, 4.0]]
    np.testing.assert_allclose(geometric_median(jnp.asarray(points)), 0.0, atol=1e-4)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="^points must"):
        geometric_median(jnp.ones(3))
    with pytest.raises(ValueError, match="^weights must"):
        geometric_median(jnp.ones((3, 2)), weights=jnp.ones(4))
    with pytest.raises(ValueError, match="^max_iters must"):
        geometric_median(jnp.ones((3, 2)), max_iters=0)
