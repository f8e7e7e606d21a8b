"""Tubal recovery experiment: the problem's invariants, the gradient, and the paper's trend."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import tensornets
from experiments import tubal


def _problem(seed=0, n=6, tube=3, rank=2, m=60):
    return tubal.make_problem(jax.random.key(seed), n=n, tube=tube, rank=rank, num_measurements=m)


def test_target_is_t_symmetric_of_the_stated_tubal_rank_and_unit_norm():
    p = _problem()
    x = np.asarray(p.target)
    np.testing.assert_allclose(x, np.asarray(tensornets.t_transpose(p.target)), atol=1e-6)
    assert int(tensornets.tubal_rank(p.target, rtol=1e-5)) == 2
    faces = np.fft.fft(x.astype(np.float64), axis=-1)
    top = max(np.linalg.svd(faces[..., f], compute_uv=False).max() for f in range(3))
    np.testing.assert_allclose(top, 1.0, rtol=1e-5)
    # Each face is Hermitian positive semidefinite (X = T * T^T).
    for f in range(3):
        eig = np.linalg.eigvalsh(faces[..., f])
        assert eig.min() > -1e-5
    assert p.sensing.shape == (60, 6 * 6 * 3)
    np.testing.assert_allclose(
        np.asarray(p.measurements), np.asarray(p.sensing) @ x.reshape(-1), rtol=1e-5, atol=1e-6
    )


def test_loss_is_zero_at_the_truth_and_matches_the_formula():
    p = _problem()
    n, rank, tube = 6, 2, 3
    t = jax.random.normal(jax.random.key(7), (n, rank, tube))
    # A factor of the truth: X's t-SVD gives X = V * diag(s) * V^T, so V * sqrt(s) works.
    v, s, _ = tensornets.t_svd(p.target)
    sqrt_s = jnp.fft.irfft(jnp.sqrt(jnp.abs(jnp.fft.rfft(s, axis=-1))), n=tube, axis=-1)
    root = tensornets.t_product(v, jnp.einsum("kt,kl->klt", sqrt_s, jnp.eye(n)))
    assert float(tubal.loss(root, p)) < 1e-8
    assert float(tubal.relative_error(root, p.target)) < 1e-4
    gram = np.asarray(tensornets.t_product(t, tensornets.t_transpose(t)), np.float64)
    residual = np.asarray(p.sensing, np.float64) @ gram.reshape(-1) - np.asarray(p.measurements)
    np.testing.assert_allclose(float(tubal.loss(t, p)), 0.25 * residual @ residual, rtol=1e-4)


def test_loss_gradient_matches_finite_differences():
    p = _problem()
    u = 0.5 * jax.random.normal(jax.random.key(1), (6, 4, 3))
    check_grads(lambda v: tubal.loss(v, p), (u,), order=1, modes=("rev",), atol=5e-2, rtol=5e-2)


def test_gradient_descent_records_and_matches_a_python_loop():
    p = _problem()
    u0 = tubal.init_factor(jax.random.key(2), (6, 6, 3), 0.1)
    out = tubal.gradient_descent(p, u0, 0.2, num_steps=6, record_every=3)
    assert out["error"].shape == out["rank"].shape == (3,)
    u = u0
    grad = jax.jit(jax.grad(tubal.loss))
    for _ in range(6):
        u = u - 0.2 * grad(u, p)
    np.testing.assert_allclose(np.asarray(out["u"]), np.asarray(u), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        float(out["error"][0]), float(tubal.relative_error(u0, p.target)), rtol=1e-5
    )
    np.testing.assert_allclose(
        float(out["error"][-1]), float(tubal.relative_error(u, p.target)), rtol=1e-4
    )
    with pytest.raises(ValueError, match="record_every"):
        tubal.gradient_descent(p, u0, 0.2, num_steps=7, record_every=3)


def test_smaller_initialization_gives_lower_error_and_lower_tubal_rank():
    """The paper's trend, on a small problem (a few seconds)."""
    out = tubal.recovery_curves(
        [0, 1], [1e-4, 1e-1], n=6, tube=3, rank=2, num_steps=800, record_every=200
    )
    assert out["steps"].tolist() == [0, 200, 400, 600, 800]
    final_err = out["error"][:, :, -1]
    final_rank = out["rank"][:, :, -1]
    assert np.all(final_err[:, 0] < 0.1 * final_err[:, 1])
    assert np.all(final_err[:, 0] < 1e-2)
    assert np.all(final_rank[:, 0] == 2)
    assert np.all(final_rank[:, 1] > 2)


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="rank"):
        tubal.make_problem(jax.random.key(0), n=3, tube=2, rank=4, num_measurements=5)
    with pytest.raises(ValueError, match="init_scales"):
        tubal.recovery_curves([0], [0.0])
    with pytest.raises(ValueError, match="seeds"):
        tubal.recovery_curves([], [0.1])
