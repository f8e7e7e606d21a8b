"""Metrics: their defining cases (perfect, trivial, permuted) and recovery matching."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.sae import metrics

RNG = np.random.default_rng(0)


def test_fvu_is_zero_when_perfect_and_one_for_the_batch_mean():
    x = jnp.asarray(RNG.standard_normal((50, 6)) + 3.0, jnp.float32)
    assert float(metrics.fvu(x, x)) == 0.0
    np.testing.assert_allclose(metrics.fvu(x, jnp.broadcast_to(x.mean(0), x.shape)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(metrics.fvu(x, 0.5 * x + 0.5 * x.mean(0)), 0.25, rtol=1e-5)


def test_l0_dead_fraction_and_shrinkage():
    z = jnp.array([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, -3.0, 0.0], [0.0, 5.0, 0.0, 0.0]])
    np.testing.assert_allclose(metrics.l0(z), 4 / 3)
    np.testing.assert_allclose(metrics.dead_fraction(z), 0.5)
    assert float(metrics.dead_fraction(jnp.ones((3, 7)))) == 0.0
    x = jnp.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(metrics.shrinkage(x, 0.5 * x), 0.5)  # the zero token is left out


def test_mmcs_and_matching_recover_a_permuted_noisy_dictionary():
    true = RNG.standard_normal((20, 16))
    perm = RNG.permutation(30)
    decoder = RNG.standard_normal((30, 16))
    decoder[perm[:20]] = 2.0 * true  # scaled copies: cosine 1
    assert metrics.mmcs(true, decoder) == pytest.approx(1.0)
    np.testing.assert_array_equal(metrics.match_features(true, decoder), perm[:20])
    assert metrics.mmcs(true, RNG.standard_normal((30, 16))) < 0.8  # chance level


def test_mcc_is_one_for_permuted_rescaled_codes_and_low_for_noise():
    codes = np.abs(RNG.standard_normal((500, 8))) * (RNG.random((500, 8)) < 0.2)
    perm = RNG.permutation(12)
    latents = np.zeros((500, 12))
    latents[:, perm[:8]] = 3.0 * codes + 0.1
    assert metrics.mcc(codes, latents) == pytest.approx(1.0)
    assert metrics.mcc(codes, RNG.standard_normal((500, 12))) < 0.3
    # Fewer latents than features: the unmatched features count 0.
    assert metrics.mcc(codes, latents[:, perm[:4]]) == pytest.approx(0.5)


def test_feature_f1_counts_firing_agreement():
    truth = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]], float)
    codes = np.array([[2, 0, 0, 0], [2, 0, 1, 0], [0, 0, 1, 0], [2, 0, 0, 0]], float)
    f1 = metrics.feature_f1(truth, codes, np.array([0, 2, 1]))
    # feature 0: TP 2, FP 1 -> 4 / 5; feature 1: exact; feature 2: never fires, nor latent 1.
    np.testing.assert_allclose(f1, [0.8, 1.0, 1.0])
    np.testing.assert_allclose(metrics.feature_f1(truth, codes, np.array([0, -1, 3])), [0.8, 0, 1])


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="^decoder must have d=4"):
        metrics.mmcs(np.ones((3, 4)), np.ones((3, 5)))
    with pytest.raises(ValueError, match="^true_codes and codes must"):
        metrics.mcc(np.ones((3, 4)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="^latent_of_feature must"):
        metrics.feature_f1(np.ones((3, 4)), np.ones((3, 4)), np.zeros(3, int))
