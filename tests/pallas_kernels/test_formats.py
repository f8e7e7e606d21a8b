"""Properties of `pallas_kernels.formats`: exact round trips, metadata, bytes, validation."""

from __future__ import annotations

import copy
import pickle

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import formats
from pallas_kernels.formats import BSR, NM

_SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)

# One compile per shape instead of one per eager op.
_to_dense = jax.jit(lambda x: x.to_dense())


def _bsr_case(kb, nb, bk, bn, density, seed, elementwise=False):
    rng = np.random.default_rng(seed)
    k, n = kb * bk, nb * bn
    w = rng.standard_normal((k, n)).astype(np.float32)
    blocks = rng.random((kb, nb)) < density
    mask = np.kron(blocks, np.ones((bk, bn), bool))
    if elementwise:  # holes inside kept blocks must come back as exact zeros
        mask &= rng.random((k, n)) < 0.7
    return w, mask


def nm_mask(rng, shape, n, m, keep_fewer=False):
    scores = rng.random((shape[0] // m, m, shape[1]))
    rank = np.argsort(np.argsort(-scores, axis=1), axis=1)
    mask = rank < n
    if keep_fewer:  # some groups keep fewer than n: stored as explicit zeros
        mask &= rng.random(mask.shape) < 0.7
    return mask.reshape(shape)


@_SETTINGS
@given(
    kb=st.integers(1, 4),
    nb=st.integers(1, 4),
    bk=st.sampled_from([1, 2, 4, 8]),
    bn=st.sampled_from([1, 4, 8]),
    density=st.floats(0.0, 1.0),
    elementwise=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bsr_round_trip_and_metadata(kb, nb, bk, bn, density, elementwise, seed):
    w, mask = _bsr_case(kb, nb, bk, bn, density, seed, elementwise)
    bsr = BSR.from_dense(w, mask, block_shape=(bk, bn))
    np.testing.assert_array_equal(np.asarray(_to_dense(bsr)), w * mask)
    lay = bsr.layout
    kept = mask.reshape(kb, bk, nb, bn).any(axis=(1, 3))
    assert bsr.nnz_blocks == kept.sum() == bsr.values.shape[0]
    # CSC order, pointers per block column.
    np.testing.assert_array_equal(np.diff(lay.col_ptr), kept.sum(axis=0))
    assert np.all(np.diff(lay.col_indices) >= 0)
    for j in range(nb):
        rows = lay.row_indices[lay.col_ptr[j] : lay.col_ptr[j + 1]]
        np.testing.assert_array_equal(rows, np.nonzero(kept[:, j])[0])
    # Transpose metadata lists the same blocks by row, then column.
    np.testing.assert_array_equal(np.diff(lay.row_ptr), kept.sum(axis=1))
    perm = lay.transpose_perm
    order = np.lexsort((lay.col_indices[perm], lay.row_indices[perm]))
    np.testing.assert_array_equal(order, np.arange(len(perm)))
    assert sorted(perm.tolist()) == list(range(bsr.nnz_blocks))


def test_bsr_empty_matrix_and_empty_columns():
    w = np.ones((8, 12), np.float32)
    empty = BSR.from_dense(w, np.zeros_like(w, bool), block_shape=(4, 4))
    assert empty.nnz_blocks == 0 and empty.values.shape == (0, 4, 4)
    np.testing.assert_array_equal(np.asarray(empty.to_dense()), np.zeros_like(w))
    mask = np.zeros_like(w, bool)
    mask[:, 4:8] = True  # only the middle block column is kept
    bsr = BSR.from_dense(w, mask, block_shape=(4, 4))
    np.testing.assert_array_equal(bsr.layout.col_ptr, [0, 0, 2, 2])


def test_bsr_mask_none_keeps_nonzeros():
    w = np.zeros((4, 4), np.float32)
    w[0, 3] = 2.0
    bsr = BSR.from_dense(w, block_shape=(2, 2))
    assert bsr.nnz_blocks == 1
    np.testing.assert_array_equal(np.asarray(bsr.to_dense()), w)


def test_bsr_nbytes_counts_values_and_indices():
    w, mask = _bsr_case(8, 8, 16, 16, 0.25, seed=1)
    bsr = BSR.from_dense(w, mask, block_shape=(16, 16))
    nnz = bsr.nnz_blocks
    value_bytes = nnz * 16 * 16 * 4
    index_bytes = 4 * (3 * nnz + (8 + 1) + (8 + 1))  # rows, cols, perm, two pointer arrays
    assert bsr.nbytes == value_bytes + index_bytes
    assert bsr.nbytes < 0.3 * w.nbytes


def test_bsr_is_a_pytree_with_values_as_only_leaf():
    w, mask = _bsr_case(2, 3, 4, 4, 0.6, seed=2)
    bsr = BSR.from_dense(w, mask, block_shape=(4, 4))
    leaves, treedef = jax.tree.flatten(bsr)
    assert len(leaves) == 1 and leaves[0] is bsr.values
    doubled = jax.tree.map(lambda v: 2 * v, bsr)
    assert doubled.layout == bsr.layout
    np.testing.assert_array_equal(np.asarray(doubled.to_dense()), 2 * w * mask)
    # Same pattern from another array: equal layouts, so jit reuses its trace.
    again = BSR.from_dense(3 * w, mask, block_shape=(4, 4))
    assert again.layout == bsr.layout and hash(again.layout) == hash(bsr.layout)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def total(b):
        return jnp.sum(b.to_dense())

    total(bsr)
    total(again)


_LAYOUT_ARRAYS = ("row_indices", "col_indices", "col_ptr", "row_ptr", "transpose_perm")


def test_bsr_layout_arrays_are_read_only():
    """A layout is a static jit argument: writing into it would change a cached trace."""
    w, mask = _bsr_case(3, 2, 4, 4, 0.6, seed=4)
    lay = BSR.from_dense(w, mask, block_shape=(4, 4)).layout
    for name in _LAYOUT_ARRAYS:
        array = getattr(lay, name)
        assert array.dtype == np.int32
        with pytest.raises(ValueError, match="read-only"):
            array[...] = 0
        with pytest.raises(ValueError, match="WRITEABLE"):
            array.setflags(write=True)  # not even by turning the flag back on
    with pytest.raises(AttributeError):
        lay.row_indices = np.zeros_like(lay.row_indices)
    # Copies and pickles go through the constructor: still read-only, still equal.
    for other in (copy.copy(lay), copy.deepcopy(lay), pickle.loads(pickle.dumps(lay))):
        assert other == lay and hash(other) == hash(lay)
        assert not any(getattr(other, n).flags.writeable for n in _LAYOUT_ARRAYS)


def test_bsr_layout_owns_its_arrays():
    """The constructor copies: the caller's arrays stay writable and changing them later
    changes neither the layout nor its hash."""
    w, mask = _bsr_case(2, 3, 4, 4, 0.7, seed=5)
    lay = BSR.from_dense(w, mask, block_shape=(4, 4)).layout
    arrays = {n: np.array(getattr(lay, n)) for n in _LAYOUT_ARRAYS}
    mine = formats.BSRLayout(shape=lay.shape, block_shape=lay.block_shape, **arrays)
    assert mine == lay and hash(mine) == hash(lay)
    arrays["row_indices"][...] = 0
    assert mine == lay and hash(mine) == hash(lay)
    assert mine.row_indices is not arrays["row_indices"]


@_SETTINGS
@given(density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_bsr_layouts_of_one_mask_are_equal_and_hash_equal(density, seed):
    w, mask = _bsr_case(3, 4, 2, 4, density, seed, elementwise=True)
    a = BSR.from_dense(w, mask, block_shape=(2, 4)).layout
    b = BSR.from_dense(-5 * w, mask, block_shape=(2, 4)).layout
    assert a is not b and a == b and hash(a) == hash(b)
    # Another pattern (block (0, 0) flipped), or the same mask cut another way, is another
    # layout.
    other = mask.copy()
    other[:2, :4] = not mask[:2, :4].any()
    assert a != BSR.from_dense(w, other, block_shape=(2, 4)).layout
    assert a != BSR.from_dense(w, mask, block_shape=(1, 4)).layout


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(shape=(8, 0)), r"shape must be two positive ints, got \(8, 0\)"),
        (dict(block_shape=(3, 4)), r"block_shape=\(3, 4\) must divide the weight shape"),
        (dict(col_ptr=[0, 1]), r"col_ptr must have 3 entries, got 2"),
        (dict(row_indices=[0, 2]), r"row_indices entries must lie in \[0, 1\], got \[0, 2\]"),
        (dict(row_indices=[0.0, 1.0]), r"row_indices must be a 1D integer array, got float64"),
        (dict(row_indices=[[0, 1]]), r"row_indices must be a 1D integer array, got int64\[1, 2\]"),
        (dict(transpose_perm=0), r"transpose_perm must be a 1D integer array"),
    ],
)
def test_bsr_layout_validation(change, match):
    fields = dict(
        shape=(8, 8),
        block_shape=(4, 4),
        row_indices=[0, 1],
        col_indices=[0, 1],
        col_ptr=[0, 1, 2],
        row_ptr=[0, 1, 2],
        transpose_perm=[0, 1],
    )
    formats.BSRLayout(**fields)
    with pytest.raises(ValueError, match=match):
        formats.BSRLayout(**{**fields, **change})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_shape=(3, 4)), r"block_shape=\(3, 4\) must divide the weight shape \(8, 8\)"),
        (dict(block_shape=(0, 4)), r"block_shape must be two positive ints, got \(0, 4\)"),
        (dict(block_shape=(4,)), r"block_shape must be two positive ints, got \(4,\)"),
        (dict(block_shape=(True, 4)), r"block_shape must be two positive ints"),
        (dict(block_shape=(4, 4), mask=np.ones((8, 4), bool)), r"mask shape \(8, 4\) must equal"),
    ],
)
def test_bsr_validation(kwargs, match):
    w = np.ones((8, 8), np.float32)
    mask = kwargs.pop("mask", np.ones((8, 8), bool))
    with pytest.raises(ValueError, match=match):
        BSR.from_dense(w, mask, **kwargs)


def test_bsr_validation_rank_and_tracing():
    with pytest.raises(ValueError, match=r"w must be a 2D \(K, N\) array, got shape \(8,\)"):
        BSR.from_dense(np.ones(8, np.float32), block_shape=(2, 2))
    with pytest.raises(ValueError, match="outside jax.jit"):
        jax.jit(lambda w: BSR.from_dense(w, block_shape=(2, 2)).values)(jnp.ones((4, 4)))


def test_tpu_block_shape_rule():
    formats.check_tpu_block_shape((128, 256), (1024, 1024))
    formats.check_tpu_block_shape((64, 32), (64, 32))  # equal to the full dims is allowed
    with pytest.raises(ValueError, match=r"block_shape=\(32, 32\) breaks the TPU tiling rule"):
        formats.check_tpu_block_shape((32, 32), (2048, 2048))
    with pytest.raises(ValueError, match="multiples of 128"):
        formats.check_tpu_block_shape((128, 64), (256, 256))


@_SETTINGS
@given(
    nm=st.sampled_from([(2, 4), (1, 4), (2, 8), (1, 2), (3, 3), (4, 16)]),
    groups=st.integers(1, 4),
    cols=st.integers(1, 6),
    packed=st.booleans(),
    keep_fewer=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_nm_round_trip(nm, groups, cols, packed, keep_fewer, seed):
    n, m = nm
    rng = np.random.default_rng(seed)
    shape = (groups * m, cols)
    w = rng.standard_normal(shape).astype(np.float32)
    mask = nm_mask(rng, shape, n, m, keep_fewer)
    comp = NM.from_dense(w, mask, n=n, m=m, packed=packed)
    assert comp.values.shape == (groups * n, cols)
    np.testing.assert_array_equal(np.asarray(_to_dense(comp)), w * mask)
    idx = np.asarray(comp.int8_indices())
    assert idx.dtype == np.int8 and idx.min() >= 0 and idx.max() < m
    # Positions inside a group are distinct and ascending for the kept entries.
    assert np.all(np.diff(idx.reshape(groups, n, cols).astype(int), axis=1) != 0)


def test_nm_storage_bytes():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 128)).astype(np.float32)
    mask = nm_mask(rng, w.shape, 2, 4)
    int8 = NM.from_dense(w, mask, n=2, m=4)
    packed = NM.from_dense(w, mask, n=2, m=4, packed=True)
    assert int8.nbytes / w.nbytes == pytest.approx(0.625)
    assert int8.nbytes <= 0.63 * w.nbytes
    assert packed.index_bits == 2
    assert packed.nbytes / w.nbytes == pytest.approx(0.5 + 0.5 / 16)
    np.testing.assert_array_equal(np.asarray(packed.int8_indices()), np.asarray(int8.indices))


@_SETTINGS
@given(bits=st.sampled_from([1, 2, 4, 8]), rows=st.integers(1, 13), seed=st.integers(0, 99))
def test_pack_unpack_round_trip(bits, rows, seed):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, min(2**bits, 128), (rows, 3)).astype(np.int8)
    packed = jax.jit(formats.pack_indices, static_argnums=1)(jnp.asarray(idx), bits)
    assert packed.dtype == jnp.uint8 and packed.shape == (-(-rows // (8 // bits)), 3)
    unpack = jax.jit(formats.unpack_indices, static_argnums=(1, 2))
    np.testing.assert_array_equal(np.asarray(unpack(packed, bits, rows)), idx)


@pytest.mark.parametrize(
    "shape, n, m, mask_fn, match",
    [
        ((6, 4), 2, 4, None, r"m=4 must divide K=6"),
        ((8, 4), 3, 2, None, r"n must be <= m for N:M sparsity, got n=3, m=2"),
        ((8, 4), 0, 4, None, r"n must be a positive int, got 0"),
        ((256, 4), 2, 256, None, r"m must be <= 128"),
        ((8, 4), 2, 4, lambda s: np.ones(s, bool), r"mask keeps 4 > n=2 entries in group 0"),
        ((8, 4), 2, 4, lambda s: np.ones((4, 8), bool), r"mask shape \(4, 8\) must equal"),
    ],
)
def test_nm_validation(shape, n, m, mask_fn, match):
    w = np.zeros(shape, np.float32)
    mask = None if mask_fn is None else mask_fn(shape)
    with pytest.raises(ValueError, match=match):
        NM.from_dense(w, mask, n=n, m=m)


def test_nm_pytree_leaves():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    comp = NM.from_dense(w, nm_mask(rng, w.shape, 2, 4), n=2, m=4)
    leaves = jax.tree.leaves(comp)
    assert len(leaves) == 2 and leaves[0] is comp.values
    out = jax.jit(lambda c: c.to_dense())(comp)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(comp.to_dense()))


@pytest.mark.parametrize("fmt", ["bsr", "nm"])
def test_from_dense_refuses_integer_or_non_finite_kept_weights(fmt):
    mask = np.tile(np.array([1, 1, 0, 0], bool)[:, None], (2, 8))  # 2:4 along K, 4x4 blocks
    build = {
        "bsr": lambda w: BSR.from_dense(w, mask, block_shape=(4, 4)),
        "nm": lambda w: NM.from_dense(w, mask, n=2, m=4),
    }[fmt]
    with pytest.raises(ValueError, match="w must be a floating-point array, got dtype int32"):
        build(np.ones((8, 8), np.int32))
    w = np.ones((8, 8), np.float32)
    w[1, 3] = np.inf
    with pytest.raises(ValueError, match=r"1 non-finite kept entries \(first at w\[1, 3\] = inf\)"):
        build(w)
    w[1, 3], w[2, 0] = 1.0, np.nan  # outside the mask: dropped, so allowed
    np.testing.assert_array_equal(np.asarray(build(w).to_dense()), np.where(mask, 1.0, 0.0))
