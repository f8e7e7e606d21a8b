"""Straight-through magnitude pruning: dense weights, sparse forward pass."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax import masks, scores
from sparsejax.algorithms.base import SparseAlgorithm

PyTree = Any

__all__ = ["STE"]


@dataclasses.dataclass(frozen=True)
class STE(SparseAlgorithm):
    """Magnitude pruning with a straight-through estimator.

    The optimizer keeps and updates the dense weights w. The forward pass uses
    w ⊙ m, m the top-|w| mask recomputed every ``update_every_steps`` steps,
    and the backward pass treats the masking as the identity:
    dL/dw := dL/d(w ⊙ m). Pruned weights therefore keep learning and can come
    back, unlike in `Prune`; the model must run on `forward_params`.

    Reference: Bengio et al. 2013, "Estimating or Propagating Gradients Through
    Stochastic Neurons" (the estimator); Zhou et al. 2021, "Learning N:M
    Fine-grained Structured Sparse Neural Networks From Scratch" (its use for
    sparse training, the STE baseline there).

    Attributes:
      update_every_steps: how often the mask follows the weights (1 = every step).
    """

    update_every_steps: int = 1

    updates_masks = True
    straight_through = True

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.update_every_steps, int) or self.update_every_steps < 1:
            raise ValueError(
                f"update_every_steps must be a positive integer, got {self.update_every_steps!r}"
            )

    def init_masks(self, params: PyTree, key: jax.Array) -> PyTree:
        del key
        return self.score_masks(scores.magnitude(params), params)

    def is_update_step(self, step: jax.Array) -> jax.Array:
        return jnp.asarray(step) % self.update_every_steps == 0

    def update_masks(self, masks_tree, params, grads, step, key, algo_state=()):
        del masks_tree, grads, step, key, algo_state
        return self.score_masks(scores.magnitude(params), params)

    def forward_params(self, params: PyTree, masks_tree: PyTree) -> PyTree:
        """w ⊙ m in the forward pass, identity in the backward pass."""

        def ste(m, w):
            if m is None:
                return w
            return w + jax.lax.stop_gradient(jnp.where(m, w, jnp.zeros_like(w)) - w)

        return jax.tree.map(ste, masks_tree, params, is_leaf=masks.is_none)
