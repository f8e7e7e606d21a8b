"""Rankings of `sparsejax.masks` are exact for every real dtype: no negation overflow, no
precision lost to a float32 cast (integer scores, e.g. counts or quantized magnitudes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsejax import masks, ranking

INTEGER_DTYPES = [np.uint8, np.uint16, np.uint32, np.int8, np.int16, np.int32]
FLOAT_DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32]


def _extremes(dtype) -> np.ndarray:
    """Every boundary value of an integer dtype (where negation wraps or overflows)."""
    info = np.iinfo(dtype)
    values = {info.min, info.min + 1, info.max - 1, info.max, 0, 1, 2}
    if info.min < 0:
        values |= {-1, -2}
    return np.array(sorted(values), dtype)


def _reference(scores: np.ndarray, k: int) -> np.ndarray:
    """The k largest in exact (int64 / float64) arithmetic, ties by flat position."""
    wide = scores.astype(np.float64 if scores.dtype.kind == "f" else np.int64).reshape(-1)
    order = sorted(range(wide.size), key=lambda i: (-wide[i], i))
    keep = np.zeros(wide.size, bool)
    keep[order[:k]] = True
    return keep.reshape(scores.shape)


def test_uint8_scores_keep_the_largest():
    # -x wraps for uint8: 0 became the largest and 1 the smallest.
    scores = np.arange(8, dtype=np.uint8)
    np.testing.assert_array_equal(masks.topk_mask(scores, 0.5), np.arange(8) >= 4)


def test_int8_minimum_ranks_last():
    # -(-128) overflows to -128 in int8, which made the smallest score the largest.
    scores = np.array([-128, 0, 127, -1], np.int8)
    np.testing.assert_array_equal(masks.topk_mask(scores, 0.5), [False, True, True, False])


@pytest.mark.parametrize("dtype", INTEGER_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("k", [1, 3, 5])
def test_topk_by_count_is_exact_on_integer_extremes(dtype, k):
    rng = np.random.default_rng(k)
    scores = rng.permutation(_extremes(dtype))
    want = _reference(scores, k)
    np.testing.assert_array_equal(masks.topk_mask_by_count(scores, k), want)
    np.testing.assert_array_equal(jax.jit(masks.topk_mask_by_count)(scores, k), want)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: np.dtype(d).name)
def test_topk_by_count_on_low_precision_floats_keeps_nan_last(dtype):
    scores = np.array([0.5, np.nan, -np.inf, np.inf, -0.0, 0.0, -65504.0], dtype)
    keep = np.asarray(masks.topk_mask_by_count(scores, 6))
    np.testing.assert_array_equal(keep, [True, False, True, True, True, True, True])
    np.testing.assert_array_equal(masks.topk_mask_by_count(scores, 3), [1, 0, 0, 1, 1, 0, 0])


def test_bool_scores_rank_true_first():
    scores = np.array([False, True, False, True])
    np.testing.assert_array_equal(masks.topk_mask_by_count(scores, 1), [False, True, False, False])
    np.testing.assert_array_equal(masks.topk_mask_by_count(scores, 3), [True, True, False, True])


@settings(max_examples=20, deadline=None)
@given(
    dtype=st.sampled_from(INTEGER_DTYPES),
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 32),
)
def test_nm_mask_over_large_groups_is_exact_for_integers(dtype, seed, n):
    # m > 16 takes the argsort path (m <= 16 compares pairwise, which never negated).
    info = np.iinfo(dtype)
    rng = np.random.default_rng(seed)
    scores = rng.integers(info.min, int(info.max) + 1, (3, 64), dtype=np.int64).astype(dtype)
    boundary = _extremes(dtype)
    scores[0, : boundary.size] = boundary
    keep = np.asarray(masks.nm_mask(scores, n, 32))
    for row, kept in zip(scores.reshape(-1, 32), keep.reshape(-1, 32)):
        np.testing.assert_array_equal(kept, _reference(row, n))


def test_nm_mask_with_m_32_on_uint8_drops_zero():
    scores = np.arange(32, dtype=np.uint8)
    np.testing.assert_array_equal(masks.nm_mask(scores, 2, 32), np.arange(32) >= 30)


def test_group_ranks_of_large_int8_groups_are_a_descending_permutation():
    groups = np.array([[-128, 127, 0, -1] * 5], np.int8)  # m = 20 > 16
    ranks = np.asarray(masks.group_ranks(groups))[0]
    np.testing.assert_array_equal(ranks[:4], [15, 0, 5, 10])
    np.testing.assert_array_equal(np.sort(ranks), np.arange(20))


def test_global_topk_keeps_integer_scores_apart_beyond_float32_precision():
    # 2**30 and 2**30 + 1 are the same float32: the cast made them tie, and the first won.
    scores = {"a": jnp.array([2**30, 2**30 + 1, 0, 0], jnp.int32), "b": jnp.zeros(3, jnp.int32)}
    kept = masks.global_topk_masks(scores, 0.75, {"a": 0.75, "b": None})
    np.testing.assert_array_equal(kept["a"], [False, True, False, False])
    assert kept["b"] is None


def test_global_topk_pools_leaves_of_dtypes_that_promote_exactly():
    scores = {"a": jnp.array([200, 3], jnp.uint8), "b": jnp.array([-128, 100], jnp.int8)}
    kept = masks.global_topk_masks(scores, 0.5, {"a": 0.5, "b": 0.5})
    np.testing.assert_array_equal(kept["a"], [True, False])
    np.testing.assert_array_equal(kept["b"], [False, True])


def test_global_topk_refuses_dtypes_without_an_exact_common_type():
    scores = {"a": jnp.array([2**30 + 1], jnp.int32), "b": jnp.array([1.5], jnp.float32)}
    with pytest.raises(ValueError, match="scores.*int32.*float32"):
        masks.global_topk_masks(scores, 0.5, {"a": 0.5, "b": 0.5})


def test_block_and_channel_masks_take_the_magnitude_of_int8_minimum():
    # |-128| wraps to -128 in int8, so the largest magnitude ranked below every other.
    scores = np.array([[-128, 1], [2, 3]], np.int8)
    np.testing.assert_array_equal(
        masks.block_mask(scores, 0.5, (1, 2)), [[True, True], [False, False]]
    )
    np.testing.assert_array_equal(
        masks.channel_mask(scores, 0.5, axis=0), [[True, True], [False, False]]
    )


@pytest.mark.parametrize("kind", ["normal", "ties", "specials", "bool", "float16"])
def test_linear_time_selection_keeps_exactly_what_the_stable_sort_keeps(kind):
    """Float and bool scores take the bisection path; the sort ranking is the reference."""
    rng = np.random.default_rng(7)
    select = jax.jit(masks.topk_mask_by_count)

    @jax.jit
    def by_sort(s, k):
        return (
            ranking.rank_descending(s.astype(jnp.float32) if s.dtype == bool else s) < k
        ).reshape(s.shape)

    for n in (1, 7, 64, 257):
        if kind == "normal":
            s = rng.normal(size=n).astype(np.float32)
        elif kind == "ties":
            s = rng.integers(-3, 3, size=n).astype(np.float32)
        elif kind == "specials":
            s = rng.normal(size=n).astype(np.float32)
            for v in (np.nan, -np.nan, -np.inf, np.inf, 0.0, -0.0):
                s[rng.random(n) < 0.15] = v
        elif kind == "bool":
            s = rng.random(n) < 0.5
        else:
            s = rng.normal(size=n).astype(np.float16)
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            got = np.asarray(select(s, k))
            np.testing.assert_array_equal(got, np.asarray(by_sort(jnp.asarray(s), k)))
            assert got.sum() == k
