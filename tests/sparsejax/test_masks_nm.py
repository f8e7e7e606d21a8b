"""N:M masks along any axis, group ranks, and transposable N:M masks."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsejax import masks

NM_PAIRS = [(2, 4), (3, 4), (1, 8), (5, 20)]


def _groups(mask: np.ndarray, m: int, axis: int) -> np.ndarray:
    moved = np.moveaxis(mask, axis, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)


_jit_nm_mask = jax.jit(masks.nm_mask, static_argnums=(1, 2, 3))


@st.composite
def nm_problems(draw):
    # Few distinct shapes, so eager ops compile once per shape and the test stays fast.
    n, m = draw(st.sampled_from(NM_PAIRS))
    rank = draw(st.sampled_from([1, 3]))
    axis = draw(st.integers(-rank, rank - 1))
    shape = [2] * rank
    shape[axis] = m
    seed = draw(st.integers(0, 2**31 - 1))
    ties = draw(st.booleans())
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=shape).astype(np.float32)
    if ties:  # few distinct values: ties must be broken exactly
        scores = np.round(scores).astype(np.float32)
    return scores, n, m, axis


@settings(max_examples=25, deadline=None)
@given(nm_problems())
def test_nm_mask_keeps_exactly_n_largest_in_every_group(problem):
    scores, n, m, axis = problem
    mask = np.asarray(_jit_nm_mask(jnp.asarray(scores), n, m, axis))
    assert mask.shape == scores.shape and mask.dtype == bool
    groups = _groups(mask, m, axis)
    np.testing.assert_array_equal(groups.sum(-1), n)
    # Every kept score is >= every dropped score of its group.
    values = _groups(scores, m, axis)
    kept_min = np.where(groups, values, np.inf).min(-1)
    dropped_max = np.where(groups, -np.inf, values).max(-1)
    assert np.all(kept_min >= dropped_max)


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([1, 3, 4, 8, 16, 17]), st.integers(0, 2**31 - 1), st.booleans())
def test_group_ranks_equal_stable_argsort_with_ties_and_nan(m, seed, with_nan):
    rng = np.random.default_rng(seed)
    g = rng.integers(-2, 3, size=(64, m)).astype(np.float32)
    if with_nan:
        g[rng.random(g.shape) < 0.3] = np.nan
    reference = np.argsort(np.argsort(-g, axis=-1, kind="stable"), axis=-1, kind="stable")
    np.testing.assert_array_equal(np.asarray(masks.group_ranks(jnp.asarray(g))), reference)


def test_nm_mask_on_a_conv_kernel_groups_input_channels():
    kernel = np.random.default_rng(0).normal(size=(5, 8, 6)).astype(np.float32)  # (w, in, out)
    mask = np.asarray(masks.nm_mask(jnp.abs(kernel), 2, 4, axis=1))
    per_group = mask.reshape(5, 2, 4, 6).sum(axis=2)
    np.testing.assert_array_equal(per_group, 2)


def test_transposable_pattern_counts():
    # 4x4 0/1 matrices with all row and column sums 2: 90; permutation matrices: 24.
    assert masks.transposable_nm_patterns(2, 4).shape == (90, 4, 4)
    assert masks.transposable_nm_patterns(1, 4).shape == (24, 4, 4)
    for n, m in [(1, 8), (2, 8), (4, 8), (2, 4), (3, 4)]:
        p = masks.transposable_nm_patterns(n, m)
        np.testing.assert_array_equal(p.sum(axis=1), n)
        np.testing.assert_array_equal(p.sum(axis=2), n)
        assert len({x.tobytes() for x in p}) == len(p)  # no duplicates
    with pytest.raises(ValueError):
        masks.transposable_nm_patterns(2, 4)[0, 0, 0] = True  # cached: read-only


@st.composite
def transposable_problems(draw):
    n, m = draw(st.sampled_from([(1, 4), (2, 4), (3, 4), (1, 8), (2, 8), (4, 8)]))
    lead = draw(st.sampled_from([(), (2,)]))
    rows, cols = m * draw(st.integers(1, 2)), m * draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**31 - 1))
    scores = np.random.default_rng(seed).normal(size=(*lead, rows, cols)).astype(np.float32)
    return scores, n, m


@settings(max_examples=20, deadline=None)
@given(transposable_problems())
def test_transposable_mask_is_nm_along_both_axes(problem):
    scores, n, m = problem
    mask = np.asarray(masks.transposable_nm_mask(jnp.abs(jnp.asarray(scores)), n, m))
    assert mask.shape == scores.shape
    np.testing.assert_array_equal(_groups(mask, m, -1).sum(-1), n)
    np.testing.assert_array_equal(_groups(mask, m, -2).sum(-1), n)


def test_transposable_mask_on_other_axes_matches_moved_axes():
    scores = np.abs(np.random.default_rng(1).normal(size=(8, 3, 4))).astype(np.float32)
    got = np.asarray(masks.transposable_nm_mask(scores, 2, 4, axes=(0, 2)))
    ref = np.asarray(masks.transposable_nm_mask(np.moveaxis(scores, 1, 0), 2, 4))
    np.testing.assert_array_equal(got, np.moveaxis(ref, 0, 1))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_transposable_mask_is_optimal_for_m4(n):
    """The chosen 4x4 block has the largest score of all valid blocks (brute force)."""
    rng = np.random.default_rng(n)
    for _ in range(5):
        block = np.abs(rng.normal(size=(4, 4))).astype(np.float32)
        best = -np.inf
        for cells in itertools.combinations(range(16), 4 * n):
            cand = np.zeros(16, bool)
            cand[list(cells)] = True
            cand = cand.reshape(4, 4)
            if (cand.sum(0) == n).all() and (cand.sum(1) == n).all():
                best = max(best, float(block[cand].sum()))
        mask = np.asarray(masks.transposable_nm_mask(block, n, 4))
        np.testing.assert_allclose(block[mask].sum(), best, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 5, "m": 4}, "n must be <= m, got n=5, m=4"),
        ({"n": 0, "m": 4}, "n must be a positive integer, got 0"),
        ({"n": 2, "m": 0}, "m must be a positive integer, got 0"),
        ({"n": 2.0, "m": 4}, "n must be a positive integer"),
        ({"n": 2, "m": 3}, "m=3 must divide the length 8 of axis 1"),
        ({"n": 2, "m": 4, "axis": 2}, "axis=2 is out of range for an array of rank 2"),
        ({"n": 2, "m": 4, "axis": -3}, "axis=-3 is out of range"),
    ],
)
def test_nm_mask_bad_input_raises_naming_it(kwargs, message):
    with pytest.raises(ValueError, match=message):
        masks.nm_mask(jnp.ones((4, 8)), **kwargs)


@pytest.mark.parametrize(
    "shape, kwargs, message",
    [
        ((8, 8), {"n": 5, "m": 4}, "n must be <= m"),
        ((8, 6), {"n": 2, "m": 4}, "m=4 must divide the length 6 of axis 1"),
        ((8,), {"n": 2, "m": 4}, "rank >= 2"),
        ((8, 8), {"n": 2, "m": 4, "axes": (0, 2)}, r"axes\[1\]=2 is out of range"),
        ((8, 8), {"n": 2, "m": 4, "axes": (1, -1)}, "two different axes"),
    ],
)
def test_transposable_mask_bad_input_raises_naming_it(shape, kwargs, message):
    with pytest.raises(ValueError, match=message):
        masks.transposable_nm_mask(jnp.ones(shape), **kwargs)
