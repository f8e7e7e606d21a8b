"""Properties of `sparsejax.distributions`: exact global budgets, ERK/ER proportions, filters."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsejax import distributions, masks
from sparsejax.masks import is_none

_SETTINGS = settings(max_examples=30, deadline=None)
sparsities = st.floats(0.0, 1.0, exclude_max=True, allow_nan=False)

dense_shapes = st.tuples(st.integers(1, 24), st.integers(1, 24))
conv_shapes = st.tuples(
    st.sampled_from([1, 2, 3]), st.sampled_from([1, 2, 3]), st.integers(1, 8), st.integers(1, 8)
).map(lambda s: (s[0], s[0], s[2], s[3]))
kernel_shapes = st.lists(st.one_of(dense_shapes, conv_shapes), min_size=1, max_size=5)


def _params(shapes) -> dict:
    """{'layer{i}': {'kernel', 'bias'}} of zeros: only shapes matter to a distribution."""
    return {
        f"layer{i}": {"kernel": np.zeros(s, np.float32), "bias": np.zeros(s[-1], np.float32)}
        for i, s in enumerate(shapes)
    }


def _erk_raw(shape) -> float:
    return float(np.sum(shape) / np.prod(shape))


def _er_raw(shape) -> float:
    return (shape[-2] + shape[-1]) / (shape[-2] * shape[-1])


def _implied_counts(params, sparsities_tree):
    """[(name, size, round((1 - s_l) * n_l), raw shape)] over the sparsified leaves."""
    out = []
    flat_s = jax.tree_util.tree_leaves_with_path(sparsities_tree, is_leaf=is_none)
    flat_p = jax.tree.leaves(params)
    for (path, s_l), p in zip(flat_s, flat_p):
        if s_l is None:
            continue
        n = p.size
        out.append((masks.path_name(path), n, int(round((1.0 - s_l) * n)), p.shape))
    return out


def _assert_valid_allocation(params, sparsity, result):
    """Structure, None biases, densities in [0, 1] and the exact global count."""
    assert jax.tree.structure(result, is_leaf=is_none) == jax.tree.structure(
        jax.tree.map(lambda _: 0, params)
    )
    for name, layer in result.items():
        assert layer["bias"] is None, name
        assert isinstance(layer["kernel"], float), name
        assert 0.0 <= layer["kernel"] <= 1.0, name
    counts = _implied_counts(params, result)
    for _, n, c, _ in counts:
        assert 1 <= c <= n  # no sparsified layer is emptied (masks.num_kept's rule)
    total = sum(n for _, n, _, _ in counts)
    # Exact, unless the target is below one weight a layer: then one weight a layer.
    assert sum(c for _, _, c, _ in counts) == max(round((1.0 - sparsity) * total), len(counts))
    return counts


def _assert_proportional(counts, raw_fn):
    """Some eps gives every layer count_l within one weight of min(eps * raw_l * n_l, n_l)."""
    lower, upper = 0.0, np.inf
    for _, n, c, shape in counts:
        share = raw_fn(shape) * n  # eps * share is the layer's real-valued count
        if c == n:  # dense (or rounded up to dense): eps * share >= n - 1
            lower = max(lower, (n - 1) / share)
        else:
            lower = max(lower, (c - 1) / share)
            upper = min(upper, (c + 1) / share)
    assert lower <= upper * (1 + 1e-9), (lower, upper, counts)


@pytest.mark.parametrize(
    "distribution, raw_fn",
    [(distributions.erk, _erk_raw), (distributions.er, _er_raw)],
    ids=["erk-sum-over-product", "er-channel-ratio"],
)
@_SETTINGS
@given(shapes=kernel_shapes, sparsity=sparsities)
def test_counts_are_exact_and_proportional_to_the_raw_density(
    distribution, raw_fn, shapes, sparsity
):
    params = _params(shapes)
    counts = _assert_valid_allocation(params, sparsity, distribution(params, sparsity))
    _assert_proportional(counts, raw_fn)


@_SETTINGS
@given(shapes=kernel_shapes, sparsity=sparsities)
def test_erk_with_power_scale_zero_is_uniform_up_to_one_weight(shapes, sparsity):
    params = _params(shapes)
    result = distributions.erk(params, sparsity, power_scale=0.0)
    for _, n, c, _ in _assert_valid_allocation(params, sparsity, result):
        assert abs(c - (1.0 - sparsity) * n) < 1.0


@_SETTINGS
@given(shapes=kernel_shapes, sparsity=sparsities)
def test_uniform_gives_every_kernel_the_target_and_biases_none(shapes, sparsity):
    params = _params(shapes)
    result = distributions.uniform(params, sparsity)
    for layer in result.values():
        assert layer == {"kernel": float(sparsity), "bias": None}


@pytest.mark.parametrize("name", ["uniform", "er", "erk"])
@_SETTINGS
@given(shapes=kernel_shapes.filter(lambda s: len(s) >= 2), sparsity=sparsities)
def test_keep_dense_names_give_none_and_the_rest_stays_exact(name, shapes, sparsity):
    params = _params(shapes)
    fn = distributions.get(name)
    result = fn(params, sparsity, keep_dense=("layer0",))
    assert result["layer0"] == {"kernel": None, "bias": None}
    assert fn(params, sparsity, keep_dense="layer0") == result
    rest = {k: v for k, v in params.items() if k != "layer0"}
    assert {k: v for k, v in result.items() if k != "layer0"} == fn(rest, sparsity)


@pytest.mark.parametrize("name", ["uniform", "er", "erk"])
@_SETTINGS
@given(shapes=kernel_shapes.filter(lambda s: len(s) >= 2), sparsity=sparsities)
def test_custom_filter_fn_chooses_the_sparsified_leaves(name, shapes, sparsity):
    params = _params(shapes)
    seen = []

    def only_last_kernel(leaf_name, param):
        seen.append((leaf_name, np.shape(param)))
        return leaf_name == f"layer{len(shapes) - 1}/kernel"

    fn = distributions.get(name)
    result = fn(params, sparsity, filter_fn=only_last_kernel)
    expected_names = {f"layer{i}/{leaf}" for i in range(len(shapes)) for leaf in ("bias", "kernel")}
    assert {n for n, _ in seen} == expected_names
    last = f"layer{len(shapes) - 1}"
    for layer_name, layer in result.items():
        assert layer["bias"] is None
        assert (layer["kernel"] is None) == (layer_name != last)
    # A single sparsified leaf carries the whole global target (at least one weight).
    n = params[last]["kernel"].size
    kept = max(1, round((1.0 - result[last]["kernel"]) * n))
    assert kept == max(1, round((1.0 - sparsity) * n))


@pytest.mark.parametrize("name", ["uniform", "er", "erk"])
def test_results_depend_only_on_shapes_and_are_static_under_jit(name):
    params = _params([(3, 3, 4, 8), (32, 10), (10, 10)])
    fn = distributions.get(name)
    traced = []

    @jax.jit
    def f(p):
        traced.append(fn(p, 0.8))
        return jax.tree.leaves(p)[0]

    f(params)
    assert traced == [fn(params, 0.8)]


def test_no_sparsified_leaves_give_all_none():
    params = {"bias": np.zeros(4), "scale": np.zeros(4), "empty": np.zeros((0, 3))}
    for name in ("uniform", "er", "erk"):
        assert distributions.get(name)(params, 0.9) == {"bias": None, "scale": None, "empty": None}


@pytest.mark.parametrize("name", ["uniform", "er", "erk"])
@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_bad_sparsity_raises_naming_it(name, sparsity):
    with pytest.raises(
        ValueError, match=re.escape(f"sparsity must be in [0, 1), got {sparsity!r}")
    ):
        distributions.get(name)(_params([(4, 4)]), sparsity)


@pytest.mark.parametrize("name", ["erk_fixed", "ERK", "random"])
def test_get_unknown_name_raises_listing_known_ones(name):
    with pytest.raises(ValueError, match=re.escape(f"distribution={name!r} is unknown")) as info:
        distributions.get(name)
    for known in ("er", "erk", "uniform"):
        assert repr(known) in str(info.value)
