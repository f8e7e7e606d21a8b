"""The t-product dense layer as a matrix: default tube length, apply, kernel <-> operator.

A ``"tubal"`` dense layer (Newman, Horesh, Avron & Kilmer 2018, "Stable Tensor Neural
Networks for Rapid Deep Learning") reads its input (n2 n3,) as a lateral slice (n2, 1,
n3) of tubes and returns W * x (n1, 1, n3) for a weight tensor W (n1, n2, n3). As a
matrix its kernel is block-circulant, K[(j, s), (i, t)] = W[i, j, (t - s) mod n3]; the
functions here move between that kernel and W.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from tensornets import contract as contract_lib
from tensornets.formats.tubal import Tubal

__all__ = ["default_tube", "kernel_to_tubal", "tubal_apply", "tubal_to_kernel"]


def default_tube(n_in: int, n_out: int) -> int:
    """Largest common divisor of n_in and n_out that is at most sqrt(min(n_in, n_out))."""
    g, bound = math.gcd(n_in, n_out), math.isqrt(min(n_in, n_out))
    return max(d for d in range(1, min(g, bound) + 1) if g % d == 0)


def tubal_apply(fmt: Tubal, x: jax.Array, method: str) -> jax.Array:
    """x (..., n2 n3) -> W * x (..., n1 n3): each row of x is a lateral slice of tubes.

    Args:
      fmt: the operator W (n1, n2, n3) as a truncated t-SVD.
      x: inputs (..., n2 * n3).
      method: "auto" (fewer FLOPs) | "factorized" | "dense", as in `tensornets.contract`.

    Returns:
      (..., n1 * n3).
    """
    n1, n2, n3 = fmt.shape
    xb = x.reshape(-1, n2, n3)
    if method == "auto":
        costs = fmt.apply_costs(xb.shape[0])
        method = contract_lib.choose_method(costs["factorized"], costs["dense"])
    elif method not in contract_lib.METHODS:
        raise ValueError(f"contraction must be one of {contract_lib.METHODS}, got {method!r}")
    y = fmt.apply(jnp.swapaxes(xb, 0, 1), method=method)  # (n1, batch, n3)
    return jnp.swapaxes(y, 0, 1).reshape(x.shape[:-1] + (n1 * n3,))


def tubal_to_kernel(w: jax.Array) -> jax.Array:
    """W (n1, n2, n3) -> the block-circulant kernel K (n2 n3, n1 n3) of x -> W * x.

    K[(j, s), (i, t)] = W[i, j, (t - s) mod n3].
    """
    n1, n2, n3 = w.shape
    shift = (jnp.arange(n3)[None, :] - jnp.arange(n3)[:, None]) % n3  # [s, t]
    k = jnp.take(jnp.swapaxes(w, 0, 1), shift, axis=2)  # (n2, n1, s, t)
    return jnp.transpose(k, (0, 2, 1, 3)).reshape(n2 * n3, n1 * n3)


def kernel_to_tubal(kernel: jax.Array, n1: int, n2: int, n3: int) -> jax.Array:
    """Orthogonal projection of a kernel (n2 n3, n1 n3) onto t-product operators (n1, n2, n3).

    The nearest block-circulant kernel in the Frobenius norm averages each
    circulant diagonal: W[i, j, d] = mean_s K[(j, s), (i, (s + d) mod n3)]. Since
    ||bcirc(A)||_F^2 = n3 ||A||_F^2 and the projection is orthogonal, truncating
    the t-SVD of this W gives the best tubal-rank-k kernel for K itself.
    """
    k4 = kernel.reshape(n2, n3, n1, n3)  # [j, s, i, t]
    shift = (jnp.arange(n3)[:, None] + jnp.arange(n3)[None, :]) % n3  # [s, d] -> t
    diag = jnp.take_along_axis(k4, shift[None, :, None, :], axis=3)  # [j, s, i, d]
    return jnp.swapaxes(diag.mean(axis=1), 0, 1)  # (n1, n2, n3)
