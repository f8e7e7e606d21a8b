"""Implicit regularization of gradient descent on an over-parameterized tubal factorization.

Reproduces the experiment of Karnik, Veselovska, Iwen & Krahmer, "Implicit
Regularization for Tubal Tensor Factorizations via Gradient Descent" (ICML 2025,
arXiv 2024): recover a low tubal-rank tensor from few random linear
measurements by running plain gradient descent on a factorization that has far
more tubal rank than needed, started from a small random initialization.

The problem, in this module's notation (``*`` is the t-product of
`tensornets.t_product`, ``^T`` the t-transpose):

  ground truth   X = T * T^T,  T (n, r, k) Gaussian, so X (n, n, k) is
                 t-positive-semidefinite with tubal rank r; it is scaled so the
                 largest singular value over its Fourier faces is 1;
  measurements   y_i = <A_i, X> / sqrt(m), i = 1..m, A_i with i.i.d. N(0, 1)
                 entries; m < n^2 k, so y alone does not determine X and the
                 factorization has many global minimizers;
  model          U (n, R, k) with R >= r (here R = n: full tubal rank);
  loss           f(U) = 1/4 || A(U * U^T) - y ||^2;
  descent        U_{t+1} = U_t - mu grad f(U_t),  U_0 = alpha G,  G_ij ~ N(0, 1/R).

The paper's claim: with a small scale alpha, gradient descent first aligns U
with the top tubal subspace (a spectral phase, where U stays small), then fits
X there while the other R - r components stay of order alpha, so the iterate
U * U^T has approximately tubal rank r and its error to X shrinks with alpha;
a large alpha leaves large spurious components (high tubal rank, large error).
We record the relative error ||U * U^T - X||_F / ||X||_F and the effective
tubal rank (singular values of the Fourier faces above ``rtol`` times the
largest, `tensornets.tubal_rank`) along the iterations.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import tensornets

__all__ = [
    "TubalProblem",
    "gradient_descent",
    "init_factor",
    "loss",
    "make_problem",
    "measure",
    "recovery_curves",
    "relative_error",
]


class TubalProblem(NamedTuple):
    """A low tubal-rank recovery problem.

    Attributes:
      target: X (n, n, k), t-PSD of tubal rank r.
      sensing: the measurement operator as a matrix (m, n n k), entries N(0, 1/m).
      measurements: y = sensing @ vec(X), (m,).
    """

    target: jax.Array
    sensing: jax.Array
    measurements: jax.Array


def _check_int(value: Any, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _gram(u: jax.Array) -> jax.Array:
    """U * U^T, (n, n, k)."""
    return tensornets.t_product(u, tensornets.t_transpose(u))


@functools.partial(jax.jit, static_argnames=("n", "tube", "rank", "num_measurements"))
def make_problem(
    key: jax.Array, *, n: int, tube: int, rank: int, num_measurements: int
) -> TubalProblem:
    """Draws X = T * T^T of tubal rank ``rank`` and ``num_measurements`` Gaussian measurements.

    Args:
      key: ``jax.random.key``.
      n: X is (n, n, tube).
      tube: k, the tube length.
      rank: r, the tubal rank of X (1 <= r <= n).
      num_measurements: m.

    Returns:
      A `TubalProblem`; X is scaled so the largest singular value of its Fourier
      faces (the t-product operator norm) is 1.
    """
    _check_int(n, "n")
    _check_int(tube, "tube")
    _check_int(num_measurements, "num_measurements")
    if _check_int(rank, "rank") > n:
        raise ValueError(f"rank must be at most n={n}, got {rank}")
    k_t, k_a = jax.random.split(key)
    t = jax.random.normal(k_t, (n, rank, tube))
    x = _gram(t)
    norm = jnp.max(jnp.linalg.svd(jnp.moveaxis(jnp.fft.fft(x, axis=-1), -1, 0), compute_uv=False))
    x = x / norm
    sensing = jax.random.normal(k_a, (num_measurements, x.size)) / math.sqrt(num_measurements)
    return TubalProblem(x, sensing, sensing @ x.reshape(-1))


def measure(problem: TubalProblem, x: jax.Array) -> jax.Array:
    """A(x) = (<A_i, x> / sqrt(m))_i for x (n, n, k); returns (m,)."""
    return problem.sensing @ x.reshape(-1)


def loss(u: jax.Array, problem: TubalProblem) -> jax.Array:
    """f(U) = 1/4 ||A(U * U^T) - y||^2 for U (n, R, k); scalar."""
    residual = measure(problem, _gram(u)) - problem.measurements
    return 0.25 * jnp.sum(residual**2)


def relative_error(u: jax.Array, target: jax.Array) -> jax.Array:
    """||U * U^T - X||_F / ||X||_F."""
    return jnp.linalg.norm(_gram(u) - target) / jnp.linalg.norm(target)


def init_factor(key: jax.Array, shape: tuple[int, int, int], scale: Any) -> jax.Array:
    """U_0 = scale * G with G_ij ~ N(0, 1/R) i.i.d., for U of ``shape`` (n, R, k)."""
    n, big_r, tube = shape
    return scale * jax.random.normal(key, (n, big_r, tube)) / math.sqrt(big_r)


@functools.partial(jax.jit, static_argnames=("num_steps", "record_every", "rtol"))
def gradient_descent(
    problem: TubalProblem,
    u0: jax.Array,
    step_size: Any,
    *,
    num_steps: int,
    record_every: int,
    rtol: float = 1e-3,
) -> dict[str, jax.Array]:
    """Runs ``num_steps`` of U <- U - step_size grad f(U), recording every ``record_every``.

    Args:
      problem: from `make_problem`.
      u0: (n, R, k) initial factor.
      step_size: mu.
      num_steps: total steps, a multiple of ``record_every``.
      record_every: steps between records.
      rtol: relative threshold of the effective tubal rank.

    Returns:
      ``{"error": (num_steps // record_every + 1,), "rank": int32 same shape, "u": final U}``
      where record j is taken after j * record_every steps (record 0: at U_0).
    """
    _check_int(num_steps, "num_steps")
    _check_int(record_every, "record_every")
    if num_steps % record_every:
        raise ValueError(f"num_steps={num_steps} must be a multiple of record_every={record_every}")
    grad = jax.grad(loss)

    def record(u):
        gram = _gram(u)
        error = jnp.linalg.norm(gram - problem.target) / jnp.linalg.norm(problem.target)
        return error, tensornets.tubal_rank(gram, rtol=rtol)

    def chunk(u, _):
        u = jax.lax.fori_loop(0, record_every, lambda _, v: v - step_size * grad(v, problem), u)
        return u, record(u)

    u, (errors, ranks) = jax.lax.scan(chunk, u0, None, length=num_steps // record_every)
    error0, rank0 = record(u0)
    return {
        "error": jnp.concatenate([error0[None], errors]),
        "rank": jnp.concatenate([rank0[None], ranks]),
        "u": u,
    }


def recovery_curves(
    seeds: list[int],
    init_scales: list[float],
    *,
    n: int = 10,
    tube: int = 4,
    rank: int = 2,
    factor_rank: int | None = None,
    num_measurements: int | None = None,
    step_size: float = 0.3,
    num_steps: int = 6000,
    record_every: int = 100,
    rtol: float = 1e-3,
) -> dict[str, np.ndarray]:
    """Error and effective tubal rank over iterations, for every seed and init scale.

    Seed s draws the problem (X and the measurements) and the Gaussian G of U_0;
    every init scale of a seed shares both, so scales differ only by alpha. All
    runs go through one compiled, doubly vmapped program.

    Args:
      seeds: problem / init seeds.
      init_scales: the alphas.
      n, tube, rank: X is (n, n, tube) of tubal rank ``rank``.
      factor_rank: R, the factorization's tubal rank (default n: full).
      num_measurements: m (default 3 r n k, below the n^2 k entries of X).
      step_size, num_steps, record_every, rtol: as in `gradient_descent`.

    Returns:
      ``{"steps": (records,), "error": (seeds, scales, records),
      "rank": same, int}`` as NumPy arrays.
    """
    if not seeds:
        raise ValueError("seeds must not be empty")
    if not init_scales or any(not float(a) > 0 for a in init_scales):
        raise ValueError(f"init_scales must be positive numbers, got {init_scales!r}")
    factor_rank = n if factor_rank is None else _check_int(factor_rank, "factor_rank")
    m = 3 * rank * n * tube if num_measurements is None else num_measurements

    def one(seed_key, scale):
        k_problem, k_init = jax.random.split(seed_key)
        problem = make_problem(k_problem, n=n, tube=tube, rank=rank, num_measurements=m)
        u0 = init_factor(k_init, (n, factor_rank, tube), scale)
        out = gradient_descent(
            problem, u0, step_size, num_steps=num_steps, record_every=record_every, rtol=rtol
        )
        return out["error"], out["rank"]

    run = jax.jit(jax.vmap(jax.vmap(one, in_axes=(None, 0)), in_axes=(0, None)))
    keys = jnp.stack([jax.random.key(int(s)) for s in seeds])
    errors, ranks = run(keys, jnp.asarray(init_scales, jnp.float32))
    steps = np.arange(num_steps // record_every + 1) * record_every
    return {"steps": steps, "error": np.asarray(errors), "rank": np.asarray(ranks)}
