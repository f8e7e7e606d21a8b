"""Layer pruners: reconstruction quality, exact patterns, identity at sparsity 0, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsejax import masks as masks_lib
from sparsejax import posttrain

PRUNERS = ("magnitude", "wanda", "sparsegpt")


def _layer(seed: int, d_in: int = 32, d_out: int = 16, tokens: int = 128, outliers: bool = True):
    """Correlated random inputs with a few outlier features 20-60x larger, and a kernel."""
    kx, kw, ks, ka = jax.random.split(jax.random.key(seed), 4)
    mixing = jnp.eye(d_in) + jax.random.normal(ka, (d_in, d_in)) / np.sqrt(d_in)
    x = jax.random.normal(kx, (tokens, d_in)) @ mixing
    if outliers:
        idx = jax.random.choice(ks, d_in, (max(d_in // 64, 1),), replace=False)
        x = x * jnp.ones(d_in).at[idx].set(jnp.linspace(20.0, 60.0, idx.size))
    w = jax.random.normal(kw, (d_in, d_out)) / np.sqrt(d_in)
    return w, x


def _error(x, w, pruned):
    return float(jnp.linalg.norm(x @ w - x @ pruned))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("pattern", [{"sparsity": 0.5}, {"sparsity": 0.7}, {"n": 2, "m": 4}])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(seed, pattern):
    # A layer with 256 inputs, so SparseGPT's blocks of 128 are a fraction of them as in the
    # paper (with a single block its mask is chosen once, from the unupdated weights), and
    # correlated inputs, which the OBS updates exploit.
    w, x = _layer(seed, d_in=256, d_out=8, tokens=384)
    errors = {name: _error(x, w, posttrain.METHODS[name](w, x, **pattern)[0]) for name in PRUNERS}
    assert errors["sparsegpt"] < errors["wanda"], errors
    assert errors["sparsegpt"] < errors["magnitude"], errors
    # Outlier features are what Wanda exploits: it beats |W| alone by far.
    assert errors["wanda"] < 0.5 * errors["magnitude"], errors


@pytest.mark.parametrize("name", PRUNERS)
def test_sparsity_zero_returns_the_layer_unchanged(name):
    w, x = _layer(3)
    pruned, mask = posttrain.METHODS[name](w, x, sparsity=0.0)
    np.testing.assert_array_equal(np.asarray(pruned), np.asarray(w))
    assert bool(jnp.all(mask))
    refined, refined_mask = posttrain.dsnot(w, x, mask)
    np.testing.assert_array_equal(np.asarray(refined), np.asarray(w))
    assert bool(jnp.all(refined_mask))


@pytest.mark.parametrize("name", PRUNERS)
@pytest.mark.parametrize("sparsity", [0.55, 0.9])
def test_unstructured_counts_are_exact_and_pruned_entries_zero(name, sparsity):
    w, x = _layer(4, d_in=36)
    pruned, mask = (
        posttrain.METHODS[name](w, x, sparsity=sparsity, block_size=16)
        if (name == "sparsegpt")
        else posttrain.METHODS[name](w, x, sparsity=sparsity)
    )
    assert mask.dtype == jnp.bool_ and mask.shape == w.shape
    assert bool(jnp.all(jnp.where(mask, True, pruned == 0)))
    if name == "wanda":  # compared per output: every output keeps the same count
        per_output = np.asarray(mask).sum(axis=0)
        assert np.all(per_output == masks_lib.num_kept(36, sparsity))
    else:  # over the whole layer (SparseGPT: per block, counts summing to the layer's)
        assert int(mask.sum()) == masks_lib.num_kept(w.size, sparsity)


def _is_nm(mask, n, m):
    groups = np.asarray(mask).reshape(-1, m, mask.shape[1])  # consecutive inputs
    return np.all(groups.sum(axis=1) == n)


@pytest.mark.parametrize("name", PRUNERS)
@pytest.mark.parametrize("n, m", [(2, 4), (1, 8)])
def test_nm_patterns_are_valid(name, n, m):
    w, x = _layer(5)
    pruned, mask = posttrain.METHODS[name](w, x, n=n, m=m)
    assert _is_nm(mask, n, m)
    assert bool(jnp.all(jnp.where(mask, True, pruned == 0)))
    refined, refined_mask = posttrain.dsnot(w, x + 1.0, mask, n=n, m=m)
    assert _is_nm(refined_mask, n, m)
    np.testing.assert_array_equal(np.asarray(refined), np.asarray(jnp.where(refined_mask, w, 0)))


def test_sparsegpt_lazy_blocks_do_not_change_the_result():
    # With N:M the mask is chosen every m inputs whatever the block size, so lazy batching
    # of the OBS updates must give the same layer as one block over all inputs.
    w, x = _layer(6)
    small, small_mask = posttrain.sparsegpt(w, x, n=2, m=4, block_size=8)
    whole, whole_mask = posttrain.sparsegpt(w, x, n=2, m=4, block_size=32)
    np.testing.assert_array_equal(np.asarray(small_mask), np.asarray(whole_mask))
    np.testing.assert_allclose(np.asarray(small), np.asarray(whole), rtol=1e-4, atol=1e-5)


def test_sparsegpt_matches_a_sequential_obs_reference():
    """Plain numpy: prune inputs in order, each time re-solving the remaining weights.

    For one output row and a fixed mask, SparseGPT's result equals the exact least-squares
    reconstruction when the mask is applied column by column with OBS updates: after
    visiting all columns the kept weights minimize ||X w - X ŵ||² + λ||·|| restricted to
    the kept set (the OBS update with the exact inverse of the remaining Hessian)."""
    w, x = _layer(7, d_in=12, d_out=3, tokens=64, outliers=False)
    pruned, mask = posttrain.sparsegpt(w, x, n=2, m=4, dampening=0.01)
    xn, wn, mn = (np.asarray(a, np.float64) for a in (x, w, mask))
    h = xn.T @ xn
    h += 0.01 * np.mean(np.diag(h)) * np.eye(12)
    for j in range(3):
        row = wn[:, j].copy()
        for i in range(12):  # OBS with the inverse Hessian of the not-yet-visited inputs
            rest = np.arange(i, 12)
            h_inv = np.linalg.inv(h[np.ix_(rest, rest)])
            if not mn[i, j]:
                row[rest] -= row[i] / h_inv[0, 0] * h_inv[0]
                row[i] = 0.0
        np.testing.assert_allclose(np.asarray(pruned)[:, j], row, rtol=1e-3, atol=1e-4)


def test_dsnot_swaps_move_the_expected_error_towards_zero_and_keep_counts():
    w, x = _layer(8)
    x = x + 0.5  # a nonzero mean, so the expected output of removed weights is not zero
    _, mask = posttrain.wanda(w, x, sparsity=0.6)
    mean = jnp.mean(x, axis=0)

    def expected_error(m):  # δ per output: expected output carried by the removed weights
        return jnp.sum(jnp.where(m, 0.0, w * mean[:, None]), axis=0)

    before = expected_error(mask)
    _, one = posttrain.dsnot(w, x, mask, max_cycles=1, update_threshold=0.0)
    changed = np.asarray(jnp.any(one != mask, axis=0))
    assert changed.any()
    # One swap grows a weight carrying part of δ and prunes one carrying the opposite sign:
    # both move δ towards zero.
    step = np.asarray(expected_error(one) - before)
    assert np.all(np.sign(step[changed]) == -np.sign(np.asarray(before)[changed]))
    np.testing.assert_array_equal(np.asarray(step[~changed]), 0.0)
    _, refined = posttrain.dsnot(w, x, mask)
    np.testing.assert_array_equal(np.asarray(refined.sum(0)), np.asarray(mask.sum(0)))
    # A threshold above every |δ| leaves the mask alone.
    _, same = posttrain.dsnot(w, x, mask, update_threshold=1e9)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(mask))


@settings(max_examples=4, deadline=None)
@given(
    d_in=st.integers(1, 20),
    d_out=st.integers(1, 7),
    sparsity=st.floats(0.0, 0.95),
)
def test_magnitude_and_wanda_exact_for_random_shapes(d_in, d_out, sparsity):
    w, x = _layer(9, d_in=d_in, d_out=d_out, tokens=16, outliers=False)
    _, mask = posttrain.magnitude(w, sparsity=sparsity)
    assert int(mask.sum()) == masks_lib.num_kept(d_in * d_out, sparsity)
    _, mask = posttrain.wanda(w, x, sparsity=sparsity)
    assert np.all(np.asarray(mask).sum(0) == masks_lib.num_kept(d_in, sparsity))


def test_jit_equals_eager():
    w, x = _layer(10)
    for fn in (posttrain.magnitude, posttrain.wanda):
        eager = fn(w, x, sparsity=0.5)
        jitted = jax.jit(lambda w, x, fn=fn: fn(w, x, sparsity=0.5))(w, x)
        for a, b in zip(eager, jitted):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"n": 2}, "n and m"),
        ({"n": 5, "m": 4}, "n must be <= m"),
        ({"n": 0, "m": 4}, "n must be a positive"),
        ({"n": 2, "m": 5}, "m=5 must divide"),
        ({"sparsity": 0.5, "n": 2, "m": 4}, "either sparsity or n and m"),
    ],
)
@pytest.mark.parametrize("name", PRUNERS)
def test_bad_patterns_are_value_errors(name, kwargs, match):
    w, x = _layer(11)
    with pytest.raises(ValueError, match=match):
        posttrain.METHODS[name](w, x, **kwargs)


def test_bad_shapes_and_options_are_value_errors():
    w, x = _layer(12)
    with pytest.raises(ValueError, match="x must be"):
        posttrain.wanda(w, x[:, :5], sparsity=0.5)
    with pytest.raises(ValueError, match="kernel must be 2D"):
        posttrain.magnitude(w[None], sparsity=0.5)
    with pytest.raises(ValueError, match="block_size"):
        posttrain.sparsegpt(w, x, n=2, m=4, block_size=6)
    with pytest.raises(ValueError, match="mask must have"):
        posttrain.dsnot(w, x, jnp.ones((16, 32), bool))
    with pytest.raises(ValueError, match="max_cycles"):
        posttrain.dsnot(w, x, jnp.ones_like(w, bool), max_cycles=0)
