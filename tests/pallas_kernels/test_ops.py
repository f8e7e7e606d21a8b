"""Every path of the sparse matmuls equals its dense reference, in values and gradients.

Paths: the XLA path (the CPU default), the Pallas TPU kernels and the GPU kernels run by
the Pallas interpreter. Grids are kept small because interpreter cost grows with grid steps.
Tolerances: float32 sums in another order, so ``atol = rtol = 1e-4`` on O(1) data.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import pallas_kernels as pk
from pallas_kernels import block_sparse, nm
from tests.pallas_kernels.test_formats import nm_mask

_SETTINGS = settings(max_examples=6, deadline=None, derandomize=True)
_TOL = dict(atol=1e-4, rtol=1e-4)
IMPLS = ("xla", "pallas_interpret")
# The XLA path densifies dense-enough matrices (`ops._prefer_dense`); "xla_grouped" forces
# the grouped sparse path at every density so both branches are held to the reference.
BSR_PATHS = ("xla", "xla_grouped", "pallas_interpret")


def _path(path):
    """(impl, context manager) for a BSR test path."""
    if path == "xla_grouped":
        return "xla", mock.patch.object(pk.ops, "_prefer_dense", lambda layout: False)
    return path, contextlib.nullcontext()


def _bsr(kb, nb, bk, bn, density, seed, empty_col=False):
    rng = np.random.default_rng(seed)
    k, n = kb * bk, nb * bn
    w = rng.standard_normal((k, n)).astype(np.float32)
    blocks = rng.random((kb, nb)) < density
    if empty_col:
        blocks[:, 0] = False
    mask = np.kron(blocks, np.ones((bk, bn), bool))
    return pk.BSR.from_dense(w, mask, block_shape=(bk, bn)), rng


def _loss(matmul):
    # A nonlinear scalar of the output, so the cotangent dY is not constant.
    return lambda x, w: jnp.sum(jnp.sin(matmul(x, w)))


def _assert_matches_reference(op, reference, x, w, grad_kwargs=None):
    # Jitted so each hypothesis example compiles a few programs instead of many eager ops.
    chex.assert_trees_all_close(jax.jit(op)(x, w), jax.jit(reference)(x, w), **_TOL)
    grad_kwargs = grad_kwargs or {}
    got = jax.jit(jax.grad(_loss(op), argnums=(0, 1), **grad_kwargs))(x, w)
    want = jax.jit(jax.grad(_loss(reference), argnums=(0, 1), **grad_kwargs))(x, w)
    chex.assert_trees_all_close(got[0], want[0], **_TOL)
    chex.assert_trees_all_close(got[1].values, want[1].values, **_TOL)


@pytest.mark.parametrize("path", BSR_PATHS)
@_SETTINGS
@given(
    kb=st.integers(1, 3),
    nb=st.integers(1, 3),
    bk=st.sampled_from([8, 16]),
    bn=st.sampled_from([8, 16]),
    density=st.floats(0.0, 1.0),
    rows=st.integers(1, 12),
    empty_col=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_block_sparse_matches_reference(path, kb, nb, bk, bn, density, rows, empty_col, seed):
    w, rng = _bsr(kb, nb, bk, bn, density, seed, empty_col)
    x = jnp.asarray(rng.standard_normal((rows, w.shape[0])).astype(np.float32))
    impl, context = _path(path)
    op = lambda x, w: pk.block_sparse_matmul(x, w, impl=impl)
    with context:
        _assert_matches_reference(op, pk.block_sparse_matmul_reference, x, w)


@pytest.mark.parametrize("impl", IMPLS)
def test_block_sparse_fully_empty_matrix(impl):
    w = pk.BSR.from_dense(
        np.ones((16, 24), np.float32), np.zeros((16, 24), bool), block_shape=(8, 8)
    )
    x = jnp.ones((3, 16))
    y = pk.block_sparse_matmul(x, w, impl=impl)
    np.testing.assert_array_equal(np.asarray(y), np.zeros((3, 24)))
    dx, dw = jax.grad(_loss(lambda x, w: pk.block_sparse_matmul(x, w, impl=impl)), (0, 1))(x, w)
    np.testing.assert_array_equal(np.asarray(dx), np.zeros((3, 16)))
    assert dw.values.shape == (0, 8, 8)


@pytest.mark.parametrize("path", BSR_PATHS)
def test_block_sparse_check_grads_and_batch_dims(path):
    impl, context = _path(path)
    with context:
        _check_grads_and_batch_dims(impl)


def _check_grads_and_batch_dims(impl):
    w, rng = _bsr(3, 2, 8, 16, 0.6, seed=7, empty_col=True)
    x = jnp.asarray(rng.standard_normal((2, 3, w.shape[0])).astype(np.float32))
    y = pk.block_sparse_matmul(x, w, impl=impl)
    assert y.shape == (2, 3, w.shape[1])
    chex.assert_trees_all_close(y, pk.block_sparse_matmul_reference(x, w), **_TOL)
    # The op is bilinear, so central differences are exact up to rounding at any eps;
    # a large eps keeps float32 rounding out of the comparison.
    f = lambda x, v: pk.block_sparse_matmul(x, pk.BSR(v, w.layout), impl=impl)
    check_grads(f, (x, w.values), order=1, modes=["rev"], eps=1.0, atol=1e-2, rtol=1e-2)


def test_block_sparse_jit_equals_eager_and_traces_once():
    w, rng = _bsr(4, 4, 16, 16, 0.3, seed=3)
    x = jnp.asarray(rng.standard_normal((5, w.shape[0])).astype(np.float32))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(x, w):
        return pk.block_sparse_matmul(x, w)

    eager = pk.block_sparse_matmul(x, w)
    chex.assert_trees_all_close(f(x, w), eager, **_TOL)
    chex.assert_trees_all_close(f(2 * x, jax.tree.map(lambda v: -v, w)), -2 * eager, **_TOL)


def test_gpu_kernels_in_interpreter():
    w, rng = _bsr(3, 2, 16, 16, 0.5, seed=11, empty_col=True)
    x = jnp.asarray(rng.standard_normal((20, w.shape[0])).astype(np.float32))
    dy = jnp.asarray(rng.standard_normal((20, w.shape[1])).astype(np.float32))
    dense = w.to_dense()
    kw = dict(layout=w.layout, interpret=True)
    chex.assert_trees_all_close(block_sparse.dsd_gpu(x, w.values, **kw), x @ dense, **_TOL)
    chex.assert_trees_all_close(
        block_sparse.dsd_gpu(dy, w.values, transpose=True, **kw), dy @ dense.T, **_TOL
    )
    want = jax.grad(lambda d: jnp.vdot(x @ d, dy))(dense)
    want_blocks = jnp.stack(
        [
            want[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16]
            for r, c in zip(w.layout.row_indices, w.layout.col_indices)
        ]
    )
    chex.assert_trees_all_close(block_sparse.sdd_gpu(x, dy, **kw), want_blocks, **_TOL)


def test_mixed_dtypes_promote():
    w, rng = _bsr(2, 2, 8, 8, 1.0, seed=5)
    x = jnp.asarray(rng.standard_normal((4, 16))).astype(jnp.bfloat16)
    y = pk.block_sparse_matmul(x, w, impl="xla")
    assert y.dtype == jnp.float32
    chex.assert_trees_all_close(y, pk.block_sparse_matmul_reference(x, w), **_TOL)


def test_impl_validation():
    w, _ = _bsr(2, 2, 8, 8, 1.0, seed=0)
    x = jnp.ones((2, 16))
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'xla', 'pallas', "):
        pk.block_sparse_matmul(x, w, impl="cuda")
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 16\), got \(2, 8\)"):
        pk.block_sparse_matmul(jnp.ones((2, 8)), w)
    with pytest.raises(ValueError, match="impl must be one of"):
        pk.nm_matmul(x, pk.NM.from_dense(np.zeros((16, 4)), n=2, m=4), impl="fast")
    if jax.default_backend() == "cpu":
        assert pk.ops.resolve_impl("auto") == "xla"
        with pytest.raises(ValueError, match="impl='pallas' needs a TPU or GPU backend"):
            pk.block_sparse_matmul(x, w, impl="pallas")


@pytest.mark.parametrize(
    ("version", "supported"),
    [("0.10.2", True), ("0.10.0rc1", True), ("0.9.9", False), ("0.11.0", False), ("1.0", False)],
)
def test_gpu_kernels_are_supported_in_the_stated_jax_range_only(version, supported):
    assert pk.ops.gpu_kernels_supported(version) is supported


def test_auto_on_a_gpu_falls_back_to_xla_outside_the_supported_range(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for ok, auto in ((True, "gpu"), (False, "xla")):
        monkeypatch.setattr(pk.ops, "gpu_kernels_supported", lambda version=None, ok=ok: ok)
        assert pk.ops.resolve_impl("auto") == auto
        assert pk.ops.resolve_impl("pallas") == "gpu"  # asked for explicitly: tried, may fail
        assert pk.ops.resolve_impl("xla") == "xla"


def _nm(n, m, groups, cols, seed, packed=False):
    rng = np.random.default_rng(seed)
    shape = (groups * m, cols)
    w = rng.standard_normal(shape).astype(np.float32)
    return pk.NM.from_dense(w, nm_mask(rng, shape, n, m), n=n, m=m, packed=packed), rng


@pytest.mark.parametrize("impl", IMPLS)
@_SETTINGS
@given(
    nm_=st.sampled_from([(2, 4), (1, 4), (2, 8), (1, 2)]),
    groups=st.sampled_from([1, 2, 4, 8]),
    cols=st.integers(1, 12),
    rows=st.integers(1, 10),
    packed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_nm_matches_reference(impl, nm_, groups, cols, rows, packed, seed):
    w, rng = _nm(*nm_, groups, cols, seed, packed)
    x = jnp.asarray(rng.standard_normal((rows, w.shape[0])).astype(np.float32))
    op = lambda x, w: pk.nm_matmul(x, w, impl=impl)
    _assert_matches_reference(op, pk.nm_matmul_reference, x, w, dict(allow_int=True))


@pytest.mark.parametrize("impl", IMPLS)
def test_nm_check_grads(impl):
    w, rng = _nm(2, 4, 4, 8, seed=1)
    x = jnp.asarray(rng.standard_normal((2, 3, 16)).astype(np.float32))
    f = lambda x, v: pk.nm_matmul(x, pk.NM(v, w.indices, w.shape, w.n, w.m), impl=impl)
    check_grads(f, (x, w.values), order=1, modes=["rev"], eps=1.0, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("transpose", [False, True])
def test_nm_gpu_kernel_in_interpreter(transpose):
    w, rng = _nm(2, 4, 64, 256, seed=2)  # K=256, N=256: several tiles in both loops
    dense = w.to_dense()
    x = jnp.asarray(rng.standard_normal((9, 256)).astype(np.float32))
    got = nm.nm_matmul_pallas(
        x, w.values, w.indices, n=2, m=4, transpose=transpose, interpret=True, backend="gpu"
    )
    chex.assert_trees_all_close(got, x @ (dense.T if transpose else dense), **_TOL)


@pytest.mark.parametrize("unroll", [8, 2])
def test_xla_path_row_pieces(monkeypatch, unroll):
    """Rows run as padded pieces (unrolled, or a loop over groups of pieces); same values
    and gradients."""
    monkeypatch.setattr(pk.ops, "_PIECE_BYTES", 1)  # 8-row pieces
    monkeypatch.setattr(pk.ops, "_UNROLL", unroll)  # 45 rows: 6 pieces, or a 3-step loop
    monkeypatch.setattr(pk.ops, "_prefer_dense", lambda layout: False)
    w, rng = _bsr(3, 2, 8, 16, 0.6, seed=9, empty_col=True)
    x = jnp.asarray(rng.standard_normal((45, w.shape[0])).astype(np.float32))
    assert pk.ops._row_piece(45, 1) == 8
    assert pk.ops._row_piece(5, 1) == 8
    op = lambda x, w: pk.block_sparse_matmul(x, w, impl="xla")
    assert ("while" in jax.jit(op).lower(x, w).as_text()) == (unroll < 6)
    _assert_matches_reference(op, pk.block_sparse_matmul_reference, x, w)


def test_xla_path_densifies_dense_enough_matrices():
    """At 16x16 blocks and 100% density the grouped path would lose to the GEMM."""
    dense_w, rng = _bsr(4, 4, 16, 16, 1.0, seed=12)
    sparse_w, _ = _bsr(8, 8, 32, 32, 0.1, seed=12)
    assert pk.ops._prefer_dense(dense_w.layout)
    assert not pk.ops._prefer_dense(sparse_w.layout)


def test_kernel_block_shape_checks():
    block_sparse.check_gpu_block_shape((16, 64))
    with pytest.raises(ValueError, match=r"power-of-two tiles >= 16 .* got bk=24"):
        block_sparse.check_gpu_block_shape((24, 32))
    w, _ = _bsr(2, 2, 32, 32, 1.0, seed=0)
    assert not pk.ops._kernel_fits(w.layout, "tpu")  # 32x32 breaks the (8, 128) rule
    assert pk.ops._kernel_fits(w.layout, "gpu")
    assert pk.ops._kernel_fits(w.layout, "xla")
