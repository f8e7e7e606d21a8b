"""Importance scores for pruning: larger score means more worth keeping.

Each score function maps a parameter pytree (and, where needed, gradients or a
key) to a pytree of scores of the same structure. All are pure and jit-able.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

__all__ = ["get", "grasp", "magnitude", "random", "saliency", "synflow"]


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


def _tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def grasp(loss_fn: Callable[[PyTree], jax.Array], params: PyTree) -> PyTree:
    """GraSP keep-scores θ ⊙ (H g): high means keep.

    Args:
      loss_fn: params -> scalar loss on a fixed batch (the paper divides the
        logits by a temperature T = 200 inside the loss).
      params: parameter pytree.

    Returns:
      Pytree of θ ⊙ H g, H the Hessian and g the gradient of the loss at θ.

    Reference: Wang et al. 2020, "Picking Winning Tickets Before Training by
    Preserving Gradient Flow". Removing weights δ changes the gradient norm
    g^T g to first order by 2 δ^T H g, so the paper scores each weight by
    S(-θ) = -θ ⊙ H g and removes the weights with the highest S; keeping the
    highest θ ⊙ H g is the same rule. H g is a Hessian-vector product:
    the gradient of g(θ)·stop_gradient(g).
    """
    grad_fn = jax.grad(loss_fn)
    g = jax.lax.stop_gradient(grad_fn(params))
    hg = jax.grad(lambda p: _tree_vdot(grad_fn(p), g))(params)
    return jax.tree.map(lambda w, h: w * h, params, hg)


def synflow(
    apply_fn: Callable[[PyTree, jax.Array], jax.Array], params: PyTree, input_shape
) -> PyTree:
    """SynFlow scores θ ⊙ dR/dθ of the data-free synaptic-flow objective.

    Args:
      apply_fn: (params, x) -> outputs of the model.
      params: parameter pytree (pruned entries already zero).
      input_shape: shape of one example, without the batch axis.

    Returns:
      Pytree of nonnegative scores.

    Reference: Tanaka et al. 2020, "Pruning neural networks without any data
    by iteratively conserving synaptic flow". With every parameter replaced by
    its absolute value and an all-ones input, R = 1ᵀ f(1) is the sum over all
    input-output paths of the product of |weights| on the path (ReLUs pass
    everything, since every pre-activation is positive); the score of a weight
    is |θ| ⊙ dR/d|θ|, the total flow through it. No data is used.
    """
    abs_params = jax.tree.map(jnp.abs, params)
    ones = jnp.ones((1, *tuple(input_shape)), jnp.float32)
    flow = jax.grad(lambda p: jnp.sum(apply_fn(p, ones)))(abs_params)
    return jax.tree.map(lambda w, r: w * r, abs_params, flow)


_SCORES = {"magnitude": magnitude, "random": random, "saliency": saliency, "snip": saliency}


def get(name: str):
    """Looks a score function up by name ('magnitude', 'random', 'saliency' or 'snip')."""
    if name not in _SCORES:
        raise ValueError(f"score={name!r} is unknown; known scores: {sorted(_SCORES)}")
    return _SCORES[name]
