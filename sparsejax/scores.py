"""Importance scores for pruning: larger score means more worth keeping.

Each score function maps a parameter pytree (and, where needed, gradients or a
key) to a pytree of scores of the same structure. All are pure and jit-able.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

__all__ = ["get", "magnitude", "random", "saliency"]


def magnitude(
    params: PyTree, grads: PyTree | None = None, *, key: jax.Array | None = None
) -> PyTree:
    """|w| for every entry.

    Args:
      params: parameter pytree.
      grads: unused (accepted so every score has the same signature).
      key: unused.

    Returns:
      Pytree of |w|, same shapes as ``params``.

    Reference: Han et al. 2015, "Learning both Weights and Connections for
    Efficient Neural Networks"; Zhu & Gupta 2017, "To prune, or not to prune".
    """
    del grads, key
    return jax.tree.map(jnp.abs, params)


def random(params: PyTree, grads: PyTree | None = None, *, key: jax.Array) -> PyTree:
    """Independent uniform scores in [0, 1): a random ranking of the entries.

    Args:
      params: parameter pytree (only shapes are used).
      grads: unused.
      key: a `jax.random.key`; each leaf gets its own folded key.

    Returns:
      Pytree of float32 uniforms with the shapes of ``params``.

    Reference: Liu et al. 2022, "The Unreasonable Effectiveness of Random
    Pruning: Return of the Most Naive Baseline for Sparse Training".
    """
    del grads
    if key is None:
        raise ValueError("key must be a jax.random.key for random scores, got None")
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = [jax.random.uniform(k, jnp.shape(p)) for k, p in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, out)


def saliency(params: PyTree, grads: PyTree, *, key: jax.Array | None = None) -> PyTree:
    """Connection sensitivity |w * dL/dw|.

    Args:
      params: parameter pytree.
      grads: gradient of the loss with respect to ``params`` on a batch.
      key: unused.

    Returns:
      Pytree of |w * g|.

    Reference: Lee et al. 2019, "SNIP: Single-shot Network Pruning based on
    Connection Sensitivity". The sensitivity of connection j is the magnitude of
    the first-order change of the loss when its mask c_j moves from 1 to 0:
    |dL/dc_j| = |g_j w_j| (the paper normalizes by the sum, which does not
    change the ranking).
    """
    del key
    if grads is None:
        raise ValueError("grads must be given for saliency scores, got None")
    return jax.tree.map(lambda w, g: jnp.abs(w * g), params, grads)


_SCORES = {"magnitude": magnitude, "random": random, "saliency": saliency, "snip": saliency}


def get(name: str):
    """Looks a score function up by name ('magnitude', 'random', 'saliency' or 'snip')."""
    if name not in _SCORES:
        raise ValueError(f"score={name!r} is unknown; known scores: {sorted(_SCORES)}")
    return _SCORES[name]
