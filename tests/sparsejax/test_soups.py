"""Sparse model soups: averaging keeps the shared mask exactly; mask checks; SWA average."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsejax import masks as masks_lib
from sparsejax import soups


def _ingredients(k: int, shape=(6, 5), sparsity=0.7, seed=0):
    """k models that share one mask (as if retrained from one pruned model) and a bias."""
    key_mask, key_w, key_b = jax.random.split(jax.random.key(seed), 3)
    mask = masks_lib.topk_mask(jax.random.uniform(key_mask, shape), sparsity)
    w = jax.random.normal(key_w, (k, *shape)) * mask
    b = jax.random.normal(key_b, (k, shape[1]))
    return {"dense": {"kernel": w, "bias": b}}, {"dense": {"kernel": mask, "bias": None}}


@settings(max_examples=10, deadline=None)
@given(k=st.integers(1, 5), sparsity=st.floats(0.0, 0.95), seed=st.integers(0, 100))
def test_uniform_soup_keeps_the_shared_mask_exactly(k, sparsity, seed):
    stacked, mask = _ingredients(k, sparsity=sparsity, seed=seed)
    soup = soups.average(stacked, mask)
    kernel, m = np.asarray(soup["dense"]["kernel"]), np.asarray(mask["dense"]["kernel"])
    assert np.all(kernel[~m] == 0)
    # float32: Σ θ_i / k and the mean differ by rounding only.
    np.testing.assert_allclose(
        kernel, np.asarray(stacked["dense"]["kernel"]).mean(0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        soup["dense"]["bias"], np.asarray(stacked["dense"]["bias"]).mean(0), rtol=1e-5, atol=1e-6
    )
    # Same mask as every ingredient: exactly the same number of live weights.
    assert int(np.sum(kernel != 0)) <= int(m.sum())


def test_weighted_soup_normalizes_weights_and_matches_the_formula():
    stacked, mask = _ingredients(3)
    soup = soups.average(stacked, mask, weights=[2.0, 1.0, 1.0])
    expected = 0.5 * stacked["dense"]["kernel"][0] + 0.25 * stacked["dense"]["kernel"][1:].sum(0)
    np.testing.assert_allclose(soup["dense"]["kernel"], expected, rtol=1e-6, atol=1e-7)
    for bad in ([1.0, 2.0], [-1.0, 1.0, 1.0], [0.0, 0.0, 0.0]):
        with pytest.raises(ValueError, match="weights must be 3"):
            soups.average(stacked, mask, weights=bad)


def test_ingredients_off_the_mask_and_different_masks_are_refused():
    stacked, mask = _ingredients(3)
    off = jnp.argmin(mask["dense"]["kernel"].reshape(-1))  # a pruned position
    kernel = stacked["dense"]["kernel"].reshape(3, -1).at[1, off].set(0.5)
    bad = {"dense": {"kernel": kernel.reshape(3, 6, 5), "bias": stacked["dense"]["bias"]}}
    with pytest.raises(ValueError, match="nonzero weights off the shared mask"):
        soups.average(bad, mask)
    soups.check_shared_mask(stacked, mask)  # the good stack passes
    stacked_masks = {"dense": {"kernel": jnp.stack([mask["dense"]["kernel"]] * 3), "bias": None}}
    np.testing.assert_array_equal(
        soups.shared_mask(stacked_masks)["dense"]["kernel"], mask["dense"]["kernel"]
    )
    flipped = stacked_masks["dense"]["kernel"].at[2, 0, 0].set(~mask["dense"]["kernel"][0, 0])
    with pytest.raises(ValueError, match="different masks"):
        soups.shared_mask({"dense": {"kernel": flipped, "bias": None}})
    with pytest.raises(ValueError, match="leading"):
        soups.average({"a": jnp.zeros((3, 2)), "b": jnp.zeros((2, 2))})


def test_swa_update_is_the_running_mean_and_keeps_zeros():
    snapshots = jax.random.normal(jax.random.key(0), (5, 4, 3)) * (jnp.arange(3) > 0)
    swa = snapshots[0]
    for count in range(1, 5):
        swa = soups.swa_update(swa, snapshots[count], count)
    np.testing.assert_allclose(swa, snapshots.mean(0), rtol=1e-5, atol=1e-6)
    assert bool(jnp.all(swa[:, 0] == 0))
    jitted = jax.jit(soups.swa_update)(snapshots[0], snapshots[1], jnp.asarray(1))
    np.testing.assert_allclose(jitted, snapshots[:2].mean(0), rtol=1e-6)


def test_swa_update_starts_from_the_first_snapshot_whatever_the_initial_average():
    """At count 0 the average is the snapshot: a NaN (uninitialized) start must not stay."""
    snapshot = {"w": jnp.arange(3.0)}
    for start in (jnp.full(3, jnp.nan), jnp.full(3, jnp.inf)):
        np.testing.assert_array_equal(soups.swa_update({"w": start}, snapshot, 0)["w"], [0, 1, 2])
        jitted = jax.jit(soups.swa_update)({"w": start}, snapshot, jnp.asarray(0))
        np.testing.assert_array_equal(jitted["w"], [0, 1, 2])


def test_soup_without_a_mask_refuses_ingredients_with_different_masks():
    stacked, mask = _ingredients(3)
    other = masks_lib.topk_mask(jax.random.uniform(jax.random.key(9), (6, 5)), 0.7)
    kernel = stacked["dense"]["kernel"].at[2].set(jnp.where(other, 1.0, 0.0))
    bad = {"dense": {"kernel": kernel, "bias": stacked["dense"]["bias"]}}
    with pytest.raises(ValueError, match=r"stacked_params\['dense'\]\['kernel'\]: ingredient 2"):
        soups.average(bad)
    # Sharing a mask (or dense), the soup without a mask is the plain mean.
    np.testing.assert_allclose(
        soups.average(stacked)["dense"]["kernel"], stacked["dense"]["kernel"].mean(0), rtol=1e-6
    )


def test_check_shared_mask_matches_leaves_by_name_not_position():
    stacked, mask = _ingredients(2)
    renamed = {"dense": {"bias": None, "kernel_": mask["dense"]["kernel"]}}
    with pytest.raises(ValueError, match=r"mask\['dense'\]\['kernel_'\] is not a parameter"):
        soups.check_shared_mask(stacked, renamed)


def test_greedy_soup_never_scores_below_its_best_ingredient():
    stacked, mask = _ingredients(4, seed=3)
    target = stacked["dense"]["kernel"][2]

    def evaluate(params):  # higher is better: closeness to ingredient 2
        return -float(jnp.sum((params["dense"]["kernel"] - target) ** 2))

    soup, chosen = soups.greedy_soup(stacked, evaluate, mask)
    assert chosen[0] == 2
    assert evaluate(soup) >= max(
        evaluate(jax.tree.map(lambda p, i=i: p[i], stacked)) for i in range(4)
    )
    assert bool(jnp.all(jnp.where(mask["dense"]["kernel"], True, soup["dense"]["kernel"] == 0)))
