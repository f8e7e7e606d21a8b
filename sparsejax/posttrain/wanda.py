"""Wanda: pruning by weights and activations, compared within each output."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sparsejax.posttrain import pattern as pattern_lib

__all__ = ["wanda", "wanda_scores"]


def wanda_scores(kernel: jax.Array, x: jax.Array) -> jax.Array:
    """|W_ij| * ||X_i||_2 for a kernel ``[in, out]`` and calibration inputs ``x [tokens, in]``.

    Returns:
      ``float32[in, out]``; ||X_i||_2 is the norm of input feature i over all tokens.
    """
    norms = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=0))
    return jnp.abs(kernel).astype(jnp.float32) * norms[:, None]


def wanda(
    kernel: jax.Array,
    x: jax.Array,
    *,
    sparsity: Any = 0.0,
    n: int | None = None,
    m: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Prunes a layer by |W| times the input norm, keeping the same count in every output.

    Args:
      kernel: ``float[in, out]`` (a conv kernel flattened to ``[window * in, out]``).
      x: calibration inputs to the layer, ``float[tokens, in]`` (conv: im2col patches).
      sparsity: fraction of each output's inputs removed, in [0, 1) (unstructured).
      n, m: N:M instead: ``n`` kept in every ``m`` consecutive inputs of each output.

    Returns:
      ``(pruned kernel, mask)``; every output column keeps exactly
      ``round((1 - sparsity) * in)`` inputs (or an N:M pattern along axis 0). The kept
      weights are unchanged.

    Raises:
      ValueError: for a bad sparsity or (n, m), mismatched shapes, or ``m`` not dividing ``in``.

    Reference: Sun et al. 2024, "A Simple and Effective Pruning Approach for Large Language
    Models". The score S_ij = |W_ij| * ||X_j||_2 (weight times the l2 norm of its input feature
    over the calibration tokens) approximates each weight's contribution to the output; unlike
    magnitude pruning it keeps small weights on outlier features with large activations. Scores
    are compared per output (per row of the paper's ``[out, in]`` weight), which the paper
    finds better than per layer, and there is no weight update.
    """
    pattern = pattern_lib.make_pattern(sparsity, n, m)
    kernel, x = jnp.asarray(kernel), jnp.asarray(x)
    pattern_lib.check_layer(kernel, x, pattern)
    mask = pattern_lib.mask_per_output(wanda_scores(kernel, x), pattern)
    return jnp.where(mask, kernel, 0), mask
