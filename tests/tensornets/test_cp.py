"""Properties of `tensornets.formats.CP`: exactness at full rank, ALS vs tensorly, apply, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorly as tl
from hypothesis import given, settings
from jax.test_util import check_grads
from tensorly.decomposition import parafac

from tensornets.formats import CP
from tests.tensornets.conftest import RTOL, add_noise, gaussian_tensors, rel_err

_SETTINGS = settings(max_examples=6, deadline=None, derandomize=True)


def low_rank_plus_noise(shape, rank, noise, seed):
    """A random rank-``rank`` CP tensor plus Gaussian noise of relative size ``noise``."""
    rng = np.random.default_rng(seed)
    factors = [rng.standard_normal((d, rank)) for d in shape]
    letters = "abcdefgh"[: len(shape)]
    x = np.einsum(",".join(c + "r" for c in letters) + "->" + letters, *factors)
    return add_noise(x, noise, rng)


@_SETTINGS
@given(x=gaussian_tensors(max_dim=4, max_ndim=3))
def test_full_rank_reconstructs_exactly(x):
    cp = CP.from_dense(x, CP.max_rank(x.shape))
    assert cp.shape == x.shape
    assert rel_err(cp.to_dense(), x) < RTOL


def test_error_never_increases_with_rank():
    x = low_rank_plus_noise((6, 7, 8), 4, 0.1, seed=0)
    errors = [rel_err(CP.from_dense(x, r).to_dense(), x) for r in range(1, 7)]
    assert all(b <= a * (1 + 1e-4) for a, b in zip(errors, errors[1:])), errors
    assert errors[3] < 0.1  # the true rank reaches the noise floor


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_tensorly_parafac(seed):
    x = low_rank_plus_noise((8, 9, 10), 5, 0.05, seed)
    assert tl.get_backend() == "numpy"
    ours = rel_err(CP.from_dense(x, 5).to_dense(), x)
    ref = rel_err(tl.cp_to_tensor(parafac(x.astype(np.float64), 5, init="svd")), x)
    assert ours <= 1.05 * ref, (ours, ref)


@pytest.mark.parametrize("n_in", [1, 2])
@pytest.mark.parametrize("method", ["factorized", "dense", "auto"])
def test_apply_equals_matmul_with_reconstruction(n_in, method):
    x = low_rank_plus_noise((3, 4, 5), 3, 0.1, seed=3)
    cp = CP.from_dense(x, 3)
    w = np.asarray(cp.to_dense()).reshape(int(np.prod(cp.shape[:n_in])), -1)
    inp = np.random.default_rng(0).standard_normal((2, 6, *cp.shape[:n_in])).astype(np.float32)
    y = cp.apply(inp, n_in, method=method)
    assert y.shape == (2, 6, *cp.shape[n_in:])
    expected = inp.reshape(12, -1) @ w
    np.testing.assert_allclose(np.asarray(y).reshape(12, -1), expected, rtol=1e-4, atol=1e-4)


def test_gradients():
    rng = np.random.default_rng(0)
    cp = CP(
        weights=jnp.asarray(rng.standard_normal(3), jnp.float32),
        factors=tuple(jnp.asarray(rng.standard_normal((d, 3)), jnp.float32) for d in (2, 3, 4)),
    )
    x = jnp.asarray(rng.standard_normal((5, 2)), jnp.float32)
    check_grads(lambda c: c.to_dense(), (cp,), order=1, modes=("rev",), eps=1e-2, atol=1e-2)
    check_grads(lambda c, x: c.apply(x, 1), (cp, x), order=1, modes=("rev",), eps=1e-2, atol=1e-2)


def test_pytree_jit_and_counts():
    x = low_rank_plus_noise((3, 4, 5), 2, 0.0, seed=1)
    cp = jax.jit(CP.from_dense, static_argnames="rank")(x, rank=2)
    assert len(jax.tree.leaves(cp)) == 4
    assert cp.ranks == (2,)
    assert cp.num_params == 2 + 2 * (3 + 4 + 5)
    costs = cp.apply_costs(8, 1)
    assert cp.flops(8, 1) == min(costs["factorized"], costs["dense"])
    assert cp.to_dense().dtype == jnp.float32


def test_float_rank_is_a_parameter_fraction():
    shape = (8, 8, 8)
    r = CP.resolve_rank(shape, 0.1)
    assert CP.num_params_for(shape, r) <= 0.1 * 512 < CP.num_params_for(shape, r + 1)


@pytest.mark.parametrize(
    "rank, match",
    [
        (0, "rank"),
        (-2, "rank"),
        (21, "rank=21 is larger"),
        (0.0, "rank"),
        (float("nan"), "rank"),
        ((2, 3), "rank"),
        (True, "rank"),
    ],
)
def test_bad_ranks_raise(rank, match):
    with pytest.raises(ValueError, match=match):
        CP.from_dense(np.ones((4, 5, 6), np.float32), rank)
