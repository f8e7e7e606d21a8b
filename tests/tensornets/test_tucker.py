"""Properties of `tensornets.formats.Tucker`: HOSVD/HOOI exactness, monotone error, vs tensorly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorly as tl
from hypothesis import given, settings
from jax.test_util import check_grads
from tensorly.decomposition import partial_tucker, tucker

from tensornets.formats import Tucker
from tests.tensornets.conftest import RTOL, add_noise, gaussian_tensors, rel_err

_SETTINGS = settings(max_examples=6, deadline=None, derandomize=True)


def tucker_plus_noise(shape, ranks, noise, seed):
    rng = np.random.default_rng(seed)
    core = rng.standard_normal(ranks)
    x = tl.tucker_to_tensor((core, [rng.standard_normal((d, r)) for d, r in zip(shape, ranks)]))
    return add_noise(x, noise, rng)


@_SETTINGS
@given(x=gaussian_tensors(max_dim=5, max_ndim=4))
def test_full_rank_reconstructs_exactly(x):
    t = Tucker.from_dense(x, max(x.shape))
    assert t.shape == x.shape
    assert rel_err(t.to_dense(), x) < RTOL


def test_error_never_increases_with_rank():
    x = np.random.default_rng(0).standard_normal((6, 7, 8)).astype(np.float32)
    errors = [rel_err(Tucker.from_dense(x, r).to_dense(), x) for r in (1, 2, 3, 5, 8)]
    assert all(b <= a * (1 + 1e-5) for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < RTOL


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_tensorly_tucker(seed):
    x = tucker_plus_noise((8, 9, 10), (3, 4, 5), 0.1, seed)
    assert tl.get_backend() == "numpy"
    ours = rel_err(Tucker.from_dense(x, (3, 4, 5)).to_dense(), x)
    ref = rel_err(tl.tucker_to_tensor(tucker(x.astype(np.float64), rank=[3, 4, 5])), x)
    assert ours <= 1.05 * ref, (ours, ref)


def test_partial_tucker_matches_tensorly():
    x = tucker_plus_noise((3, 3, 8, 9), (3, 3, 4, 5), 0.1, seed=2)
    t = Tucker.from_dense(x, (4, 5), modes=(2, 3))
    assert t.core.shape == (3, 3, 4, 5) and t.modes == (2, 3) and t.ranks == (4, 5)
    (core, factors), _ = partial_tucker(x.astype(np.float64), rank=[4, 5], modes=[2, 3])
    ref = rel_err(tl.tenalg.multi_mode_dot(core, factors, modes=[2, 3]), x)
    assert rel_err(t.to_dense(), x) <= 1.05 * ref


@pytest.mark.parametrize("method", ["factorized", "dense"])
def test_apply_equals_matmul_with_reconstruction(method):
    x = tucker_plus_noise((3, 4, 5, 2), (2, 3, 3, 2), 0.1, seed=3)
    t = Tucker.from_dense(x, (2, 3, 3, 2))
    w = np.asarray(t.to_dense()).reshape(12, 10)
    inp = np.random.default_rng(0).standard_normal((7, 3, 4)).astype(np.float32)
    y = t.apply(inp, 2, method=method)
    np.testing.assert_allclose(np.asarray(y).reshape(7, -1), inp.reshape(7, -1) @ w, atol=1e-4)


def test_gradients():
    rng = np.random.default_rng(0)
    t = Tucker(
        core=jnp.asarray(rng.standard_normal((2, 3, 2)), jnp.float32),
        factors=tuple(
            jnp.asarray(rng.standard_normal((d, r)), jnp.float32)
            for d, r in ((3, 2), (4, 3), (2, 2))
        ),
    )
    x = jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)
    check_grads(lambda t: t.to_dense(), (t,), order=1, modes=("rev",), eps=1e-2, atol=1e-2)
    check_grads(lambda t, x: t.apply(x, 1), (t, x), order=1, modes=("rev",), eps=1e-2, atol=1e-2)


def test_pytree_jit_and_counts():
    x = tucker_plus_noise((4, 5, 6), (2, 2, 2), 0.0, seed=1)
    t = jax.jit(Tucker.from_dense, static_argnames=("rank", "modes"))(x, rank=(2, 3, 3))
    assert t.ranks == (2, 3, 3)
    assert t.num_params == 2 * 3 * 3 + 4 * 2 + 5 * 3 + 6 * 3
    leaves, treedef = jax.tree.flatten(t)
    assert len(leaves) == 4
    assert jax.tree.unflatten(treedef, leaves).modes == (0, 1, 2)


@pytest.mark.parametrize(
    "rank, match",
    [
        (0, "rank"),
        (9, "rank=9 is larger"),
        ((5, 2, 2), r"rank\[0\]=5 is larger"),
        ((1, 1, 3), r"rank\[2\]=3 is larger"),
        ((2, 2), "3 entries"),
        (-0.5, "rank"),
    ],
)
def test_bad_ranks_raise(rank, match):
    with pytest.raises(ValueError, match=match):
        Tucker.from_dense(np.ones((4, 5, 6), np.float32), rank)
