"""Properties of the tubal algebra: t-product identity/associativity, t-SVD, tubal rank."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from tensornets.formats import Tubal, t_identity, t_product, t_svd, t_transpose, tubal_rank

_SETTINGS = settings(max_examples=5, deadline=None, derandomize=True)
dims = st.integers(1, 4)
tubes = st.integers(1, 6)  # odd and even n3 (the Nyquist face is real only for even n3)


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def t_product_reference(a, b):
    """Definition: circular convolution of tubes, summed over the middle index."""
    n3 = a.shape[2]
    out = np.zeros((a.shape[0], b.shape[1], n3))
    for k in range(n3):
        for j in range(n3):
            out[:, :, k] += a[:, :, j] @ b[:, :, (k - j) % n3]
    return out


@_SETTINGS
@given(n1=dims, n2=dims, n4=dims, n5=dims, n3=tubes, seed=st.integers(0, 2**16))
def test_t_product_algebra(n1, n2, n4, n5, n3, seed):
    rng = np.random.default_rng(seed)
    a, b, c = rand(rng, n1, n2, n3), rand(rng, n2, n4, n3), rand(rng, n4, n5, n3)
    np.testing.assert_allclose(t_product(a, b), t_product_reference(a, b), atol=1e-4)
    np.testing.assert_allclose(t_product(t_identity(n1, n3), a), a, atol=1e-5)
    np.testing.assert_allclose(t_product(a, t_identity(n2, n3)), a, atol=1e-5)
    np.testing.assert_allclose(
        t_product(t_product(a, b), c), t_product(a, t_product(b, c)), atol=1e-4
    )
    np.testing.assert_allclose(
        t_transpose(t_product(a, b)), t_product(t_transpose(b), t_transpose(a)), atol=1e-4
    )


@_SETTINGS
@given(n1=dims, n2=dims, n3=tubes, seed=st.integers(0, 2**16))
def test_t_svd_is_exact_and_orthogonal(n1, n2, n3, seed):
    a = rand(np.random.default_rng(seed), n1, n2, n3)
    u, s, v = t_svd(a)
    k = min(n1, n2)
    assert u.shape == (n1, k, n3) and s.shape == (k, n3) and v.shape == (n2, k, n3)
    np.testing.assert_allclose(Tubal(u, s, v).to_dense(), a, atol=1e-4)
    np.testing.assert_allclose(t_product(t_transpose(u), u), t_identity(k, n3), atol=1e-4)
    np.testing.assert_allclose(t_product(t_transpose(v), v), t_identity(k, n3), atol=1e-4)


@_SETTINGS
@given(
    n1=st.integers(3, 5),
    n2=st.integers(3, 5),
    r=st.integers(1, 2),
    n3=tubes,
    seed=st.integers(0, 2**16),
)
def test_t_svd_recovers_low_tubal_rank_exactly(n1, n2, r, n3, seed):
    rng = np.random.default_rng(seed)
    a = np.asarray(t_product(rand(rng, n1, r, n3), rand(rng, r, n2, n3)))
    assert int(tubal_rank(a)) == r
    tub = Tubal.from_dense(a, r)
    assert tub.ranks == (r,) and tub.num_params == (n1 + n2 + 1) * r * n3
    np.testing.assert_allclose(tub.to_dense(), a, atol=1e-4 * np.abs(a).max())


def test_error_never_increases_with_rank_and_matches_eckart_young():
    a = rand(np.random.default_rng(0), 6, 5, 4)
    faces = np.fft.fft(a.astype(np.float64), axis=2)
    svals = np.linalg.svd(np.moveaxis(faces, 2, 0), compute_uv=False)  # (n3, 5)
    errors = []
    for r in range(1, 6):
        err = np.linalg.norm(Tubal.from_dense(a, r).to_dense() - a)
        # Parseval: the error is the discarded singular values of all faces / sqrt(n3)
        np.testing.assert_allclose(
            err, np.sqrt((svals[:, r:] ** 2).sum() / 4), rtol=1e-3, atol=1e-5
        )
        errors.append(err)
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:]))


@pytest.mark.parametrize("method", ["factorized", "dense"])
def test_apply_equals_t_product_with_reconstruction(method):
    rng = np.random.default_rng(1)
    tub = Tubal.from_dense(rand(rng, 5, 4, 6), 2)
    x = rand(rng, 4, 3, 6)
    np.testing.assert_allclose(tub.apply(x, method), t_product(tub.to_dense(), x), atol=1e-4)
    costs = tub.apply_costs(3)
    assert costs["factorized"] < costs["dense"]


def test_gradients():
    rng = np.random.default_rng(0)
    a, b = jnp.asarray(rand(rng, 2, 3, 4)), jnp.asarray(rand(rng, 3, 2, 4))
    check_grads(t_product, (a, b), order=1, modes=("fwd", "rev"), eps=1e-2, atol=1e-2)
    tub = Tubal(
        jnp.asarray(rand(rng, 3, 2, 5)),
        jnp.asarray(rand(rng, 2, 5)),
        jnp.asarray(rand(rng, 4, 2, 5)),
    )
    x = jnp.asarray(rand(rng, 4, 2, 5))
    check_grads(lambda t, x: t.apply(x), (tub, x), order=1, modes=("rev",), eps=1e-2, atol=1e-2)


@pytest.mark.parametrize("rank, match", [(0, "rank"), (5, "rank=5 is larger"), (-1.0, "rank")])
def test_bad_ranks_raise(rank, match):
    with pytest.raises(ValueError, match=match):
        Tubal.from_dense(np.ones((4, 6, 3), np.float32), rank)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="3-d"):
        Tubal.from_dense(np.ones((4, 6), np.float32), 1)
    with pytest.raises(ValueError, match="t_product needs"):
        t_product(np.ones((2, 3, 4)), np.ones((2, 3, 4)))
