"""The geometric median of a point cloud by Weiszfeld iterations, jit-compiled."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["geometric_median", "weiszfeld"]


def weiszfeld(points, weights, max_iters=200, tol=1e-6, eps=1e-8):
    """Unchecked, unjitted core of `geometric_median` (for use inside other jitted code)."""

    def distances(y):
        return jnp.sqrt(jnp.sum(jnp.square(points - y), axis=-1))

    def body(carry):
        y, _, i = carry
        # Clamping the distance keeps a point that coincides with y from dividing by zero;
        # such a point then pulls with weight 1/eps, which keeps y there if it is the median.
        w = weights / jnp.maximum(distances(y), eps)
        y_new = jnp.sum(w[:, None] * points, axis=0) / jnp.sum(w)
        return y_new, jnp.linalg.norm(y_new - y), i + 1

    def cond(carry):
        y, moved, i = carry
        return (i < max_iters) & (moved > tol * (1.0 + jnp.linalg.norm(y)))

    start = jnp.sum(weights[:, None] * points, axis=0) / jnp.sum(weights)
    y, _, _ = jax.lax.while_loop(cond, body, (start, jnp.asarray(jnp.inf, points.dtype), 0))
    return y


def geometric_median(
    points: jax.Array,
    *,
    weights: jax.Array | None = None,
    max_iters: int = 200,
    tol: float = 1e-6,
    eps: float = 1e-8,
) -> jax.Array:
    """The point minimising the (weighted) sum of Euclidean distances to ``points``.

    Args:
      points: ``float[n, d]``.
      weights: optional ``float[n]`` nonnegative weights (default all 1).
      max_iters: iteration cap of the jitted ``while_loop``.
      tol: stop once an iteration moves the estimate by less than ``tol * (1 + ||y||)``.
      eps: smallest distance used in a weight, so a data point at the estimate is finite.

    Returns:
      ``float[d]``, the geometric median.

    Raises:
      ValueError: for ``points`` that are not 2-D or empty, or ``weights`` of another length.

    Reference: Weiszfeld 1937, "Sur le point pour lequel la somme des distances de n points
    donnés est minimum". Starting from the mean, each step moves to the average of the points
    weighted by the inverse of their distance to the current estimate, a fixed-point
    iteration of the optimality condition sum_i w_i (x_i - y) / ||x_i - y|| = 0 that never
    increases the objective. Gao et al. 2024 initialise an SAE's decoder bias with it, a
    centre of the data that, unlike the mean, outliers barely move.
    """
    points = jnp.asarray(points)
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"points must be a non-empty [n, d] array, got shape {points.shape}")
    if not jnp.issubdtype(points.dtype, jnp.floating):
        points = points.astype(jnp.float32)
    if weights is None:
        weights = jnp.ones(points.shape[0], points.dtype)
    weights = jnp.asarray(weights, points.dtype)
    if weights.shape != (points.shape[0],):
        raise ValueError(
            f"weights must have shape ({points.shape[0]},) like points' rows, got {weights.shape}"
        )
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be a positive int, got {max_iters!r}")
    return _weiszfeld(points, weights, max_iters, tol, eps)


_weiszfeld = jax.jit(weiszfeld, static_argnames=("max_iters",))
