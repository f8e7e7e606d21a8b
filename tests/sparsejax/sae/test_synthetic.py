"""The synthetic generator: firing rates as requested, hierarchy exclusivity, correlations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.sae import synthetic
from tests.sparsejax.sae.conftest import SYNTHETIC

TOKENS, F = SYNTHETIC["n_tokens"], SYNTHETIC["n_features"]


def _rate_tolerance(p, tokens=TOKENS):
    """Five binomial standard deviations: a false failure is a one-in-a-million event."""
    return 5 * np.sqrt(p * (1 - p) / tokens) + 1e-6


@pytest.mark.parametrize("correlation", [0.0, 0.6])
def test_firing_rates_match_the_requested_zipf_probabilities(synthetic_draw, correlation):
    data = synthetic_draw(mean_active=4.0, zipf_exponent=1.2, correlation=correlation)
    p = np.asarray(data.firing_probs)
    np.testing.assert_allclose(p, synthetic.zipf_firing_probs(F, 4.0, 1.2), rtol=1e-6)
    assert np.all(np.diff(p) <= 0) and abs(p.sum() - 4.0) < 1e-4 and p[0] == 1.0
    rates = np.asarray(jnp.mean(data.codes != 0, axis=0))
    assert np.all(np.abs(rates - p) <= _rate_tolerance(p)), np.abs(rates - p).max()
    assert abs(float(jnp.mean(jnp.sum(data.codes != 0, axis=1))) - 4.0) < 0.05


def test_correlation_couples_firing_and_zero_leaves_it_independent(synthetic_draw):
    def mean_abs_offdiag(codes):
        # Feature 0 fires always at these rates (p saturates at 1): leave it out.
        c = np.corrcoef(np.asarray(codes != 0, np.float64)[:, 1:11].T)
        return np.abs(c[~np.eye(10, dtype=bool)]).mean()

    independent = mean_abs_offdiag(
        synthetic_draw(mean_active=4.0, zipf_exponent=1.2, correlation=0.0).codes
    )
    coupled = mean_abs_offdiag(
        synthetic_draw(mean_active=4.0, zipf_exponent=1.2, correlation=0.6).codes
    )
    assert independent < 0.02, independent
    assert coupled > 0.05 and coupled > 3 * independent, (coupled, independent)


def test_hierarchy_children_are_exclusive_and_fire_only_with_their_parent(synthetic_draw):
    n_parents, per_parent = 3, 4
    data = synthetic_draw(mean_active=3.0, hierarchy=(n_parents, per_parent), child_prob=0.8)
    fire = np.asarray(data.codes != 0)
    parents = np.asarray(data.parents)
    n_children = n_parents * per_parent
    np.testing.assert_array_equal(parents[: F - n_children], -1)
    np.testing.assert_array_equal(
        parents[F - n_children :], np.repeat(np.arange(n_parents), per_parent)
    )
    for parent in range(n_parents):
        children = np.flatnonzero(parents == parent)
        active_children = fire[:, children].sum(axis=1)
        assert active_children.max() == 1  # mutually exclusive (and some fire)
        assert not np.any(active_children & ~fire[:, parent])  # never without the parent
        # A firing parent has a child with probability child_prob.
        with_child = active_children[fire[:, parent]].mean()
        n = fire[:, parent].sum()
        assert abs(with_child - 0.8) <= _rate_tolerance(0.8, n)
    p = np.asarray(data.firing_probs)
    rates = fire.mean(axis=0)
    assert np.all(np.abs(rates - p) <= _rate_tolerance(p)), np.abs(rates - p).max()
    np.testing.assert_allclose(
        p[F - n_children :], np.repeat(p[:n_parents] * 0.8 / per_parent, per_parent), rtol=1e-6
    )


def test_activations_are_the_codes_through_the_unit_dictionary_plus_noise(synthetic_draw):
    clean = synthetic_draw(mean_active=4.0, magnitude_range=(0.5, 2.0))
    np.testing.assert_allclose(jnp.linalg.norm(clean.dictionary, axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(clean.x, clean.codes @ clean.dictionary, rtol=1e-5, atol=1e-5)
    active = np.asarray(clean.codes)[np.asarray(clean.codes) != 0]
    assert active.min() >= 0.5 and active.max() <= 2.0
    noisy = synthetic_draw(mean_active=4.0, magnitude_range=(0.5, 2.0), noise_std=0.1)
    residual = np.asarray(noisy.x - noisy.codes @ noisy.dictionary)
    assert abs(residual.std() - 0.1) < 0.005


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"n_tokens": 0}, "n_tokens"),
        ({"mean_active": 0.0}, "mean_active"),
        ({"mean_active": 40.0}, "mean_active"),
        ({"magnitude_range": (1.0, 0.5)}, "magnitude_range"),
        ({"correlation": 1.0}, "correlation"),
        ({"hierarchy": (5, 6)}, "hierarchy"),
        ({"hierarchy": (2,)}, "hierarchy"),
        ({"child_prob": 1.5}, "child_prob"),
        ({"noise_std": -0.1}, "noise_std"),
    ],
)
def test_bad_arguments_are_named(kwargs, name):
    args = {"n_tokens": 10, "d": 4, "n_features": F, **kwargs}
    with pytest.raises(ValueError, match=f"^{name} must"):
        synthetic.generate(jax.random.key(0), **args)
