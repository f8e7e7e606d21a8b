"""Straight-through magnitude pruning: dense weights, sparse forward pass."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sparsejax import masks, scores
from sparsejax.algorithms.base import SparseAlgorithm

PyTree = Any

__all__ = ["STE", "STEState"]


class STEState(NamedTuple):
    """State of `STE` (`MaskedState.algo_state`).

    Attributes:
      num_steps: int32 scalar, the steps taken (the step of the next forward pass).
    """

    num_steps: jax.Array


@dataclasses.dataclass(frozen=True)
class STE(SparseAlgorithm):
    """Magnitude pruning with a straight-through estimator.

    The optimizer keeps and updates the dense weights w. The forward pass uses
    w ⊙ m and the backward pass treats the masking as the identity:
    dL/dw := dL/d(w ⊙ m). Pruned weights therefore keep learning and can come
    back, unlike in `Prune`; the model must run on `forward_params_with_state`.

    The mask m is the top-|w| mask of the current weights: at a step t that is a
    multiple of ``update_every_steps`` (0, k, 2k, ...) the forward pass recomputes
    it from w_t, the weights it runs on (`forward_masks`), and ``update_masks``
    stores that same mask; the forward passes of steps t + 1 ... t + k - 1 hold it
    (they apply the stored mask). With ``update_every_steps=1`` every forward pass
    uses the top-|w| mask of its own weights, as in Zhou et al. 2021.

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

    def init_state(self, params: PyTree) -> STEState:
        del params
        return STEState(num_steps=jnp.zeros((), jnp.int32))

    def update_state(self, state: STEState, params, grads, step) -> STEState:
        del params, grads, step
        return state._replace(num_steps=state.num_steps + 1)

    def is_update_step(self, step: jax.Array) -> jax.Array:
        return jnp.asarray(step) % self.update_every_steps == 0

    def update_masks(self, masks_tree, params, grads, step, key, algo_state=()):
        # ``params`` are the weights this step's forward pass ran on (and took the top-k of).
        del masks_tree, grads, step, key, algo_state
        return self.score_masks(scores.magnitude(params), params)

    def forward_masks(self, params: PyTree, masks_tree: PyTree, algo_state: STEState) -> PyTree:
        """The top-|w| masks of ``params`` on an update step, else the stored ``masks_tree``."""

        def current():
            return self.score_masks(scores.magnitude(jax.lax.stop_gradient(params)), params)

        if self.update_every_steps == 1:
            return current()
        # One branch per step kind: the steps that hold the mask pay no top-k.
        return jax.lax.cond(self.is_update_step(algo_state.num_steps), current, lambda: masks_tree)

    def forward_params(self, params: PyTree, masks_tree: PyTree) -> PyTree:
        """w ⊙ m (m = ``masks_tree``) in the forward pass, identity in the backward pass."""

        def ste(m, w):
            if m is None:
                return w
            return w + jax.lax.stop_gradient(jnp.where(m, w, jnp.zeros_like(w)) - w)

        return jax.tree.map(ste, masks_tree, params, is_leaf=masks.is_none)
