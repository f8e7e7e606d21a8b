"""Properties of `sparsejax.masks`: exact counts, structure, deterministic ties, jit == eager."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sparsejax import masks

_SETTINGS = settings(max_examples=20, deadline=None)

shapes = st.lists(st.integers(1, 5), min_size=0, max_size=4).map(tuple)
# Under jit every new shape is a new compilation: draw those from a fixed, varied pool.
pooled_shapes = st.sampled_from([(), (1,), (5,), (2, 5), (7, 3), (4, 4, 4), (3, 3, 2, 4)])
sparsities = st.floats(0.0, 1.0, exclude_max=True, allow_nan=False)
seeds = st.integers(0, 2**31 - 1)

# Compiled once per input shape; the sparsity (or count) is a traced argument.
_topk_jit = jax.jit(masks.topk_mask)
_topk_by_count_jit = jax.jit(masks.topk_mask_by_count)


def _scores(shape, seed, ties=False) -> np.ndarray:
    """float32 scores; with ``ties`` drawn from {0, 1, 2} so most scores are tied."""
    rng = np.random.default_rng(seed)
    if ties:
        return rng.integers(0, 3, shape).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def _rounded_reference(size: int, sparsity: float) -> int:
    """round-half-even((1 - s) * size) in float32, the dtype a sparsity has under jit."""
    one = np.float32(1.0)
    return int(np.round((one - np.float32(sparsity)) * np.float32(size)))


def _num_kept_reference(size: int, sparsity: float) -> int:
    """The rounded count, and one entry when it rounds to none: no array is emptied."""
    return max(_rounded_reference(size, sparsity), min(1, size))


def _topk_reference(scores: np.ndarray, k: int) -> np.ndarray:
    """The k best entries, ties broken by flat position (a stable sort of -score)."""
    order = np.argsort(-scores.reshape(-1), kind="stable")
    keep = np.zeros(scores.size, bool)
    keep[order[:k]] = True
    return keep.reshape(scores.shape)


def _assert_separates(scores: np.ndarray, keep: np.ndarray) -> None:
    """Every kept entry scores at least as much as every dropped one."""
    if keep.any() and (~keep).any():
        assert scores[keep].min() >= scores[~keep].max()


# --------------------------------------------------------------------------------------
# topk_mask


@_SETTINGS
@given(shape=shapes, sparsity=sparsities, seed=seeds, ties=st.booleans())
def test_topk_mask_keeps_exactly_the_best_round_one_minus_s_times_size(shape, sparsity, seed, ties):
    scores = _scores(shape, seed, ties)
    keep = np.asarray(masks.topk_mask(scores, sparsity))
    size = scores.size
    k = _num_kept_reference(size, sparsity)

    assert keep.shape == shape and keep.dtype == bool
    assert keep.sum() == k
    # float32 rounding moves (1 - s) * size by at most a few ulps of size.
    rounded = _rounded_reference(size, sparsity)
    assert abs(rounded - (1.0 - sparsity) * size) <= 0.5 + 4 * size * np.finfo(np.float32).eps
    assert k == max(rounded, min(1, size))
    np.testing.assert_array_equal(keep, _topk_reference(scores, k))
    _assert_separates(scores, keep)


@_SETTINGS
@given(shape=shapes, sparsity=sparsities, value=st.floats(-10, 10, width=32))
def test_topk_mask_all_equal_scores_keep_the_first_k_by_flat_index(shape, sparsity, value):
    scores = np.full(shape, value, np.float32)
    keep = np.asarray(masks.topk_mask(scores, sparsity))
    k = _num_kept_reference(scores.size, sparsity)
    np.testing.assert_array_equal(keep.reshape(-1), np.arange(scores.size) < k)


@_SETTINGS
@given(shape=pooled_shapes, sparsity=sparsities, seed=seeds, ties=st.booleans())
# (1 - 0.9) * 5 is 0.4999... in float64 but 0.5000001 in float32; 0.85 of 10 likewise.
@example(shape=(5,), sparsity=0.9, seed=0, ties=False)
@example(shape=(2, 5), sparsity=0.85, seed=0, ties=True)
def test_topk_mask_under_jit_with_traced_sparsity_equals_eager(shape, sparsity, seed, ties):
    scores = _scores(shape, seed, ties)
    eager = np.asarray(masks.topk_mask(scores, sparsity))
    jitted = np.asarray(_topk_jit(scores, sparsity))
    np.testing.assert_array_equal(jitted, eager)


@_SETTINGS
@given(shape=pooled_shapes, seed=seeds, data=st.data())
def test_topk_mask_by_count_keeps_k_under_jit_and_eager(shape, seed, data):
    scores = _scores(shape, seed, ties=True)
    k = data.draw(st.integers(0, scores.size), label="k")
    eager = np.asarray(masks.topk_mask_by_count(scores, k))
    jitted = np.asarray(_topk_by_count_jit(scores, k))
    np.testing.assert_array_equal(eager, _topk_reference(scores, k))
    np.testing.assert_array_equal(jitted, eager)


def test_topk_mask_ranks_nan_last():
    scores = np.array([1.0, np.nan, 3.0, -np.nan, 2.0], np.float32)
    np.testing.assert_array_equal(masks.topk_mask(scores, 0.4), [True, False, True, False, True])


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
@pytest.mark.parametrize(
    "build",
    [
        lambda s: masks.topk_mask(jnp.ones((4, 4)), s),
        lambda s: masks.block_mask(jnp.ones((4, 4)), s, (2, 2)),
        lambda s: masks.channel_mask(jnp.ones((4, 4)), s),
        lambda s: masks.validate_sparsity(s),
    ],
    ids=["topk", "block", "channel", "validate"],
)
def test_sparsity_outside_unit_interval_raises_naming_it(build, sparsity):
    with pytest.raises(
        ValueError, match=re.escape(f"sparsity must be in [0, 1), got {sparsity!r}")
    ):
        build(sparsity)


@pytest.mark.parametrize("sparsity", ["0.5", (0.5,), None])
def test_non_scalar_sparsity_raises(sparsity):
    with pytest.raises(ValueError, match="sparsity must be a scalar in"):
        masks.topk_mask(jnp.ones(4), sparsity)


# --------------------------------------------------------------------------------------
# nm_mask


@st.composite
def nm_cases(draw):
    """(shape, n, m, axis) with rank 1-4 and ``m`` dividing ``shape[axis]``."""
    rank = draw(st.integers(1, 4), label="rank")
    axis = draw(st.integers(-rank, rank - 1), label="axis")
    m = draw(st.integers(1, 5), label="m")
    n = draw(st.integers(1, m), label="n")
    shape = draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank), label="shape")
    shape[axis] = m * draw(st.integers(1, 3), label="groups")
    return tuple(shape), n, m, axis


def _groups(x: np.ndarray, m: int, axis: int) -> np.ndarray:
    """(..., groups, m) view of ``x`` with the grouped axis last."""
    moved = np.moveaxis(x, axis, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)


@_SETTINGS
@given(case=nm_cases(), seed=seeds, ties=st.booleans())
# A conv kernel (kh, kw, c_in, c_out) grouped along c_in, as 2:4 hardware wants it.
@example(case=((3, 3, 8, 4), 2, 4, -2), seed=0, ties=False)
@example(case=((2, 4, 3), 1, 2, 1), seed=1, ties=True)
def test_nm_mask_keeps_the_n_largest_of_every_group(case, seed, ties):
    shape, n, m, axis = case
    scores = _scores(shape, seed, ties)
    keep = np.asarray(masks.nm_mask(scores, n, m, axis=axis))

    assert keep.shape == shape and keep.dtype == bool
    keep_groups = _groups(keep, m, axis).reshape(-1, m)
    score_groups = _groups(scores, m, axis).reshape(-1, m)
    np.testing.assert_array_equal(keep_groups.sum(-1), n)
    for kg, sg in zip(keep_groups, score_groups):
        np.testing.assert_array_equal(kg, _topk_reference(sg, n))
        _assert_separates(sg, kg)


@pytest.mark.parametrize(
    ("shape", "n", "m", "axis", "message"),
    [
        ((4, 4), 3, 2, -1, "n must be <= m, got n=3, m=2"),
        ((4, 4), 0, 2, -1, "n must be a positive integer, got 0"),
        ((4, 4), -1, 2, -1, "n must be a positive integer, got -1"),
        ((4, 4), 1, 0, -1, "m must be a positive integer, got 0"),
        ((4, 4), 1, -2, -1, "m must be a positive integer, got -2"),
        ((4, 6), 2, 4, -1, "m=4 must divide the length 6 of axis 1"),
        ((3, 3, 6, 4), 2, 4, -2, "m=4 must divide the length 6 of axis 2"),
        ((4, 4), 1, 2, 2, "axis=2 is out of range for an array of rank 2"),
        ((4, 4), 1, 2, -3, "axis=-3 is out of range for an array of rank 2"),
    ],
)
def test_nm_mask_bad_arguments_raise_naming_them(shape, n, m, axis, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        masks.nm_mask(jnp.ones(shape), n, m, axis=axis)


# --------------------------------------------------------------------------------------
# block_mask


@st.composite
def block_cases(draw):
    """(grid, block_shape) of equal rank 1-3."""
    rank = draw(st.integers(1, 3), label="rank")
    grid = tuple(draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank), label="grid"))
    block = tuple(draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank), label="block"))
    return grid, block


def _blocked(x: np.ndarray, grid, block) -> np.ndarray:
    """(num_blocks, block_size) view: one row per block."""
    split = [d for pair in zip(grid, block) for d in pair]
    order = list(range(0, 2 * len(grid), 2)) + list(range(1, 2 * len(grid), 2))
    return x.reshape(split).transpose(order).reshape(int(np.prod(grid)), -1)


@_SETTINGS
@given(case=block_cases(), sparsity=sparsities, seed=seeds)
def test_block_mask_is_constant_on_blocks_and_keeps_the_exact_number(case, sparsity, seed):
    grid, block = case
    shape = tuple(g * b for g, b in zip(grid, block))
    scores = _scores(shape, seed)
    keep = np.asarray(masks.block_mask(scores, sparsity, block))

    assert keep.shape == shape and keep.dtype == bool
    keep_blocks = _blocked(keep, grid, block)
    assert (keep_blocks == keep_blocks[:, :1]).all(), "mask varies inside a block"
    kept = keep_blocks[:, 0]
    assert kept.sum() == _num_kept_reference(kept.size, sparsity)
    _assert_separates(np.abs(_blocked(scores, grid, block)).sum(-1), kept)


@pytest.mark.parametrize(
    ("block_shape", "message"),
    [
        ((2,), "block_shape=(2,) must have one entry per axis of scores (shape (4, 6))"),
        ((2, 2, 1), "block_shape=(2, 2, 1) must have one entry per axis"),
        ((3, 2), "block_shape=(3, 2) must be positive and divide scores.shape=(4, 6)"),
        ((2, 4), "block_shape=(2, 4) must be positive and divide scores.shape=(4, 6)"),
        ((0, 2), "block_shape=(0, 2) must be positive"),
        ((-2, 2), "block_shape=(-2, 2) must be positive"),
    ],
)
def test_block_mask_bad_block_shape_raises_naming_it(block_shape, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        masks.block_mask(jnp.ones((4, 6)), 0.5, block_shape)


# --------------------------------------------------------------------------------------
# channel_mask


@st.composite
def channel_cases(draw):
    rank = draw(st.integers(1, 4), label="rank")
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank), label="shape"))
    axis = draw(st.integers(-rank, rank - 1), label="axis")
    return shape, axis


@_SETTINGS
@given(case=channel_cases(), sparsity=sparsities, seed=seeds)
def test_channel_mask_keeps_whole_slices_and_the_exact_number(case, sparsity, seed):
    shape, axis = case
    scores = _scores(shape, seed)
    keep = np.asarray(masks.channel_mask(scores, sparsity, axis=axis))

    assert keep.shape == shape and keep.dtype == bool
    per_channel = np.moveaxis(keep, axis, 0).reshape(shape[axis], -1)
    assert (per_channel == per_channel[:, :1]).all(), "a channel is partly kept"
    kept = per_channel[:, 0]
    assert kept.sum() == _num_kept_reference(shape[axis], sparsity)
    l1 = np.abs(np.moveaxis(scores, axis, 0).reshape(shape[axis], -1)).sum(-1)
    _assert_separates(l1, kept)


@pytest.mark.parametrize("axis", [2, -3, 7])
def test_channel_mask_axis_out_of_range_raises_naming_it(axis):
    with pytest.raises(ValueError, match=re.escape(f"axis={axis} is out of range")):
        masks.channel_mask(jnp.ones((4, 4)), 0.5, axis=axis)


def test_scalar_scores_raise_for_structured_masks():
    with pytest.raises(ValueError, match="scores must have at least one axis"):
        masks.channel_mask(jnp.ones(()), 0.5)
    with pytest.raises(ValueError, match="scores must have at least one axis"):
        masks.nm_mask(jnp.ones(()), 1, 1)


# --------------------------------------------------------------------------------------
# apply_masks, summary, sparsity_of


def _tree_and_masks(seed: int, sparsity: float):
    """A parameter tree with no exact zeros, and masks with a None (dense) bias."""
    rng = np.random.default_rng(seed)
    nonzero = lambda shape: (rng.uniform(0.5, 1.5, shape) * rng.choice([-1, 1], shape)).astype(
        np.float32
    )
    params = {
        "dense": {"kernel": nonzero((5, 7)), "bias": nonzero((7,))},
        "conv": {"kernel": nonzero((3, 3, 2, 4))},
    }
    tree_masks = {
        "dense": {"kernel": masks.topk_mask(rng.random((5, 7)), sparsity), "bias": None},
        "conv": {"kernel": masks.topk_mask(rng.random((3, 3, 2, 4)), sparsity)},
    }
    return params, tree_masks


@_SETTINGS
@given(seed=seeds, sparsity=sparsities)
def test_apply_masks_zeroes_exactly_the_masked_out_entries(seed, sparsity):
    params, tree_masks = _tree_and_masks(seed, sparsity)
    out = masks.apply_masks(params, tree_masks)

    assert out["dense"]["bias"] is params["dense"]["bias"]
    for name in ("dense", "conv"):
        w, m, o = (
            params[name]["kernel"],
            np.asarray(tree_masks[name]["kernel"]),
            out[name]["kernel"],
        )
        o = np.asarray(o)
        assert o.dtype == w.dtype
        np.testing.assert_array_equal(o[m], w[m])
        assert (o[~m] == 0.0).all()


_sparsity_of_jit = jax.jit(masks.sparsity_of)


@_SETTINGS
@given(seed=seeds, sparsity=sparsities)
def test_summary_counts_and_sparsity_of_agree(seed, sparsity):
    params, tree_masks = _tree_and_masks(seed, sparsity)
    sparse = masks.apply_masks(params, tree_masks)

    by_mask = masks.summary(params, tree_masks)
    assert set(by_mask["leaves"]) == {"['dense']['kernel']", "['conv']['kernel']"}
    for name in ("dense", "conv"):
        m = np.asarray(tree_masks[name]["kernel"])
        leaf = by_mask["leaves"][f"['{name}']['kernel']"]
        assert leaf["size"] == m.size and leaf["nonzeros"] == m.sum()
        assert leaf["density"] == m.sum() / m.size
        assert leaf["sparsity"] == 1.0 - m.sum() / m.size
    kernels = [np.asarray(tree_masks[n]["kernel"]) for n in ("dense", "conv")]
    assert by_mask["size"] == sum(m.size for m in kernels)
    assert by_mask["nonzeros"] == sum(m.sum() for m in kernels)
    assert by_mask["density"] == by_mask["nonzeros"] / by_mask["size"]
    assert by_mask["sparsity"] == 1.0 - by_mask["density"]

    # Without masks every leaf counts (the dense bias too) and nonzero entries are live.
    by_value = masks.summary(sparse)
    assert by_value["size"] == by_mask["size"] + 7
    assert by_value["nonzeros"] == by_mask["nonzeros"] + 7

    # sparsity_of divides in float32 (XLA turns the division by the constant size into a
    # multiplication under jit): equal to the float64 summary up to one float32 ulp.
    ulp = float(np.finfo(np.float32).eps)
    jitted = _sparsity_of_jit(sparse, tree_masks)
    eager = masks.sparsity_of(sparse, tree_masks)
    assert eager.dtype == jitted.dtype == jnp.float32
    np.testing.assert_allclose(float(jitted), float(eager), rtol=ulp, atol=0)
    np.testing.assert_allclose(float(eager), by_mask["sparsity"], rtol=ulp, atol=0)


def test_sparsity_of_without_masked_leaves_is_zero():
    params = {"w": jnp.zeros((3, 3)), "b": jnp.zeros(3)}
    out = masks.sparsity_of(params, {"w": None, "b": None})
    assert out.dtype == jnp.float32 and out == 0.0


def test_apply_masks_refuses_a_mask_of_another_shape_or_structure():
    params = {"a": {"kernel": jnp.ones((3, 4))}, "b": jnp.ones(2)}
    with pytest.raises(
        ValueError, match=r"masks\['a'\]\['kernel'\] has shape \(4,\), its parameter \(3, 4\)"
    ):
        masks.apply_masks(params, {"a": {"kernel": jnp.ones((4,), bool)}, "b": None})
    with pytest.raises(ValueError, match="masks must have the structure of params"):
        masks.apply_masks(params, {"a": None})


def test_path_name_joins_dict_keys_attribute_names_and_indices():
    tree = {"conv1": {"kernel": 1}, "blocks": [{"w": 2}]}
    names = [masks.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    assert names == ["blocks/0/w", "conv1/kernel"]
    assert masks.path_name(("a", "b")) == "a/b"
    state = jax.tree_util.tree_leaves_with_path(masks.PackedMask(jnp.zeros(1, jnp.uint8), (3,)))
    assert masks.path_name(state[0][0]) == "bits"
