"""Properties of `tensornets.formats.TT` and `TTMatrix`: TT-SVD exactness, vs tensorly, apply."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorly as tl
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads
from tensorly.decomposition import tensor_train, tensor_train_matrix

from tensornets.formats import TT, TTMatrix
from tensornets.formats.tt import bond_limits
from tests.tensornets.conftest import RTOL, add_noise, gaussian_tensors, rel_err

_SETTINGS = settings(max_examples=8, deadline=None, derandomize=True)


def tt_plus_noise(shape, rank, noise, seed):
    rng = np.random.default_rng(seed)
    full = [1] + [rank] * (len(shape) - 1) + [1]
    cores = [rng.standard_normal((full[k], d, full[k + 1])) for k, d in enumerate(shape)]
    return add_noise(tl.tt_to_tensor(cores), noise, rng)


@_SETTINGS
@given(x=gaussian_tensors(max_dim=5, max_ndim=4))
def test_full_rank_reconstructs_exactly(x):
    t = TT.from_dense(x, max((*bond_limits(x.shape), 1)))
    assert t.shape == x.shape and t.ranks == bond_limits(x.shape)
    assert rel_err(t.to_dense(), x) < RTOL


@_SETTINGS
@given(seed=st.integers(0, 2**16))
def test_error_never_increases_with_rank(seed):
    x = np.random.default_rng(seed).standard_normal((3, 4, 5, 3)).astype(np.float32)
    errors = [rel_err(TT.from_dense(x, r).to_dense(), x) for r in (1, 2, 3, 5, 8, 12)]
    assert all(b <= a * (1 + 1e-5) + 1e-6 for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_tensorly_tensor_train(seed):
    x = tt_plus_noise((5, 6, 7, 4), 3, 0.1, seed)
    assert tl.get_backend() == "numpy"
    ours = rel_err(TT.from_dense(x, 3).to_dense(), x)
    ref = rel_err(tl.tt_to_tensor(tensor_train(x.astype(np.float64), rank=[1, 3, 3, 3, 1])), x)
    assert ours <= 1.05 * ref, (ours, ref)


def test_tt_matrix_matches_tensorly_and_is_exact_at_full_rank():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 30)).astype(np.float32)
    full = TTMatrix.from_dense(w, (2, 3, 4), (5, 3, 2), 10)
    assert full.ranks == (10, 8)
    assert rel_err(full.to_dense(), w) < RTOL
    low = TTMatrix.from_dense(w, (2, 3, 4), (5, 3, 2), 4)
    t = w.reshape(2, 3, 4, 5, 3, 2).transpose(0, 3, 1, 4, 2, 5).reshape(10, 9, 8)
    ref_t = tl.tt_to_tensor(tensor_train(t.astype(np.float64), rank=[1, 4, 4, 1]))
    ref = rel_err(ref_t.reshape(2, 5, 3, 3, 4, 2).transpose(0, 2, 4, 1, 3, 5).reshape(24, 30), w)
    assert rel_err(low.to_dense(), w) <= 1.05 * ref
    # tensorly's own TT-matrix on the (m_1..m_d, n_1..n_d) tensor gives the same error
    ttm = tensor_train_matrix(w.reshape(2, 3, 4, 5, 3, 2).astype(np.float64), rank=[1, 4, 4, 1])
    ref2 = rel_err(tl.tt_matrix_to_tensor(ttm).reshape(24, 30), w)
    assert rel_err(low.to_dense(), w) <= 1.05 * ref2


@pytest.mark.parametrize("method", ["factorized", "dense"])
def test_apply_equals_matmul_with_reconstruction(method):
    rng = np.random.default_rng(1)
    m = TTMatrix.from_dense(
        rng.standard_normal((24, 30)).astype(np.float32), (2, 3, 4), (5, 3, 2), 3
    )
    w = np.asarray(m.to_dense())
    x = rng.standard_normal((2, 3, 24)).astype(np.float32)
    np.testing.assert_allclose(m.apply(x, method=method), x @ w, atol=1e-4)
    q = rng.standard_normal((4, 30)).astype(np.float32)
    np.testing.assert_allclose(m.apply(q, method=method, transpose=True), q @ w.T, atol=1e-4)
    idx = np.array([[0, 5, 23], [7, 7, 1]])
    np.testing.assert_allclose(m.take(idx), w[idx], atol=1e-5)
    t = TT.from_dense(rng.standard_normal((3, 4, 5, 2)).astype(np.float32), 3)
    inp = rng.standard_normal((6, 3, 4)).astype(np.float32)
    w2 = np.asarray(t.to_dense()).reshape(12, 10)
    np.testing.assert_allclose(
        np.asarray(t.apply(inp, 2, method=method)).reshape(6, 10),
        inp.reshape(6, 12) @ w2,
        atol=1e-4,
    )


def test_gradients():
    rng = np.random.default_rng(0)
    cores = tuple(
        jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((1, 2, 3, 2), (2, 3, 2, 1))
    )
    m = TTMatrix(cores=cores)
    x = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)
    check_grads(lambda m: m.to_dense(), (m,), order=1, modes=("rev",), eps=1e-2, atol=1e-2)
    check_grads(lambda m, x: m.apply(x), (m, x), order=1, modes=("rev",), eps=1e-2, atol=1e-2)
    t = TT(cores=tuple(c[:, :, 0] for c in cores))
    check_grads(lambda t: t.to_dense(), (t,), order=1, modes=("rev",), eps=1e-2, atol=1e-2)


def test_counts_and_flops():
    m = TTMatrix.from_dense(np.ones((1024, 1024), np.float32), (8, 8, 16), (8, 8, 16), 16)
    assert m.ranks == (16, 16)
    assert m.num_params == 64 * 16 + 16 * 64 * 16 + 16 * 256
    costs = m.apply_costs(4)
    assert costs["factorized"] < costs["dense"]
    assert m.flops(4) == costs["factorized"]
    assert jax.jit(TT.from_dense, static_argnames="rank")(np.ones((2, 3)), rank=1).ranks == (1,)


@pytest.mark.parametrize(
    "rank, match",
    [
        (0, "rank"),
        (13, "rank=13 is larger"),
        ((5, 2), r"rank\[0\]=5 is larger"),
        ((1, 5), r"rank\[1\]=5 is larger"),
        ((2,), "2 entries"),
        ((2, 2, 2, 2), "start and end"),
    ],
)
def test_bad_ranks_raise(rank, match):
    with pytest.raises(ValueError, match=match):
        TT.from_dense(np.ones((4, 3, 4), np.float32), rank)


def test_bad_factorization_raises():
    with pytest.raises(ValueError, match=r"in_shape=\(2, 3, 5\) multiplies to 30, not to .* 24"):
        TTMatrix.from_dense(np.ones((24, 30)), (2, 3, 5), (5, 3, 2), 2)
    with pytest.raises(ValueError, match="out_shape"):
        TTMatrix.from_dense(np.ones((24, 30)), (2, 3, 4), (5, 3, 3), 2)
    with pytest.raises(ValueError, match="same number of factors"):
        TTMatrix.from_dense(np.ones((24, 30)), (2, 3, 4), (5, 6), 2)
