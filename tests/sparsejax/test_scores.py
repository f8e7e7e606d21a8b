"""Properties of `sparsejax.scores`: each score is its equation, leaf by leaf, and jit-able."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsejax import scores

_SETTINGS = settings(max_examples=20, deadline=None)
seeds = st.integers(0, 2**31 - 1)

# Module-level so that hypothesis examples reuse one compilation.
_magnitude_jit = jax.jit(scores.magnitude)
_saliency_jit = jax.jit(scores.saliency)
_random_jit = jax.jit(lambda params, key: scores.random(params, key=key))


def _tree(seed: int):
    rng = np.random.default_rng(seed)
    normal = lambda shape: rng.standard_normal(shape).astype(np.float32)
    return {"dense": {"kernel": normal((4, 3)), "bias": normal((3,))}, "conv": normal((2, 2, 3, 2))}


def _assert_tree_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


@_SETTINGS
@given(seed=seeds)
def test_magnitude_is_abs_w(seed):
    params = _tree(seed)
    _assert_tree_equal(scores.magnitude(params), jax.tree.map(np.abs, params))
    _assert_tree_equal(_magnitude_jit(params), jax.tree.map(np.abs, params))


@_SETTINGS
@given(seed=seeds)
def test_saliency_is_abs_w_times_g(seed):
    params, grads = _tree(seed), _tree(seed + 1)
    expected = jax.tree.map(lambda w, g: np.abs(w * g), params, grads)
    _assert_tree_equal(scores.saliency(params, grads), expected)
    _assert_tree_equal(_saliency_jit(params, grads), expected)
    assert scores.get("snip") is scores.saliency


@_SETTINGS
@given(seed=seeds)
def test_random_scores_are_uniform_in_unit_interval_per_leaf_and_deterministic(seed):
    params = _tree(0)
    key = jax.random.key(seed)
    out = scores.random(params, key=key)
    assert jax.tree.structure(out) == jax.tree.structure(params)
    leaves = [np.asarray(x) for x in jax.tree.leaves(out)]
    for leaf, p in zip(leaves, jax.tree.leaves(params)):
        assert leaf.shape == p.shape and leaf.dtype == np.float32
        assert (leaf >= 0.0).all() and (leaf < 1.0).all()
    # Each leaf gets its own key: the first entries of two leaves never coincide.
    assert len({leaf.reshape(-1)[0] for leaf in leaves}) == len(leaves)
    _assert_tree_equal(_random_jit(params, key), out)
    other = scores.random(params, key=jax.random.fold_in(key, 1))
    assert not np.array_equal(jax.tree.leaves(other)[0], leaves[0])


def test_missing_key_or_grads_raise():
    params = _tree(0)
    with pytest.raises(ValueError, match="key must be a jax.random.key"):
        scores.random(params, key=None)
    with pytest.raises(ValueError, match="grads must be given"):
        scores.saliency(params, None)


@pytest.mark.parametrize("name", ["magnitude", "random", "saliency", "snip"])
def test_get_known_names(name):
    assert callable(scores.get(name))


@pytest.mark.parametrize("name", ["taylor", "Magnitude", ""])
def test_get_unknown_name_raises_listing_known_ones(name):
    with pytest.raises(ValueError, match=re.escape(f"score={name!r} is unknown")) as info:
        scores.get(name)
    for known in ("magnitude", "random", "saliency", "snip"):
        assert repr(known) in str(info.value)
