"""Static sparse training and dynamic sparse training (SET, RigL)."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax import masks, schedules
from sparsejax.algorithms.base import SparseAlgorithm

PyTree = Any

__all__ = ["RigL", "SET", "Static"]


@dataclasses.dataclass(frozen=True)
class Static(SparseAlgorithm):
    """A random mask drawn at initialization under the distribution, then fixed.

    Reference: Liu et al. 2022, "The Unreasonable Effectiveness of Random
    Pruning"; the 'Static' baseline of Evci et al. 2020.
    """

    def init_masks(self, params: PyTree, key: jax.Array) -> PyTree:
        return self.random_masks(params, key)


@dataclasses.dataclass(frozen=True)
class SET(SparseAlgorithm):
    """Sparse Evolutionary Training: drop the smallest weights, regrow at random.

    Every ΔT = ``update_every_steps`` steps until T_end = ``end_step``, each
    layer with k live weights drops the n = round(f(t) * k) live weights of
    smallest |w| and grows n connections among the rest, chosen at random (SET)
    or by largest |dL/dw| (RigL). f(t) = α/2 (1 + cos(π t / T_end)) with
    α = ``drop_fraction``. The layer keeps exactly k live weights. Grown weights
    start at zero with zeroed optimizer slots, and the ordinary optimizer step
    is skipped on update steps. With a ``structure`` (blocks, channels), the
    same rule runs on whole units: a unit's |w| and grow score are the sums
    over its weights, and k counts live units.

    References: Mocanu et al. 2018, "Scalable training of artificial neural
    networks with adaptive sparse connectivity inspired by network science";
    Evci et al. 2020, "Rigging the Lottery: Making All Tickets Winners" (the
    cosine drop fraction, zero init of grown weights, ERK).

    Attributes:
      drop_fraction: α, in [0, 1].
      update_every_steps: ΔT.
      end_step: T_end (typically 0.75 of training).
    """

    drop_fraction: float = 0.3
    update_every_steps: int = 100
    end_step: int = 1000

    updates_masks = True
    skip_update_on_mask_step = True
    reset_grown_moments = True

    def __post_init__(self):
        super().__post_init__()
        schedules.periodic(self.update_every_steps, self.end_step)
        # Checked here so the message names this field, not the schedule's argument.
        fraction = self.drop_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real):
            raise ValueError(f"drop_fraction must be a number in [0, 1], got {fraction!r}")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"drop_fraction must be in [0, 1], got {fraction!r}")
        schedules.cosine_drop_fraction(self.drop_fraction, self.end_step)

    def init_masks(self, params: PyTree, key: jax.Array) -> PyTree:
        return self.random_masks(params, key)

    def is_update_step(self, step: jax.Array) -> jax.Array:
        return schedules.periodic(self.update_every_steps, self.end_step)(step)

    def grow_scores(self, params: PyTree, grads: PyTree, key: jax.Array) -> PyTree:
        """Scores of candidate connections: uniform random for SET."""
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(key, max(len(leaves), 1))
        return jax.tree.unflatten(
            treedef, [jax.random.uniform(k, jnp.shape(p)) for k, p in zip(keys, leaves)]
        )

    def update_masks(self, masks_tree, params, grads, step, key, algo_state=()):
        fraction = schedules.cosine_drop_fraction(self.drop_fraction, self.end_step)(step)
        grow = self.grow_scores(params, grads, key)

        def update_leaf(m, w, g):
            if m is None:
                return None
            unit = self.unit_shape(jnp.shape(m))
            # A mask is constant on its units, so any one entry of a unit is its state.
            m = m[tuple(slice(None, None, u) for u in unit)]
            w, g = self.pool(jnp.abs(w), unit), self.pool(g, unit)
            live = jnp.sum(m, dtype=jnp.int32)
            n_drop = jnp.round(fraction * live).astype(jnp.int32)
            keep = masks.topk_mask_by_count(jnp.where(m, w, -jnp.inf), live - n_drop)
            grown = masks.topk_mask_by_count(jnp.where(keep, -jnp.inf, g), n_drop)
            return self.expand(keep | grown, unit)

        return jax.tree.map(update_leaf, masks_tree, params, grow, is_leaf=masks.is_none)


@dataclasses.dataclass(frozen=True)
class RigL(SET):
    """RigL: as `SET`, but grow the connections with the largest dense-gradient magnitude.

    Reference: Evci et al. 2020, "Rigging the Lottery: Making All Tickets
    Winners". The gradient is the one of the current step, taken with respect
    to every weight (pruned weights are exactly zero in the forward pass, so
    their gradient is the dense gradient the paper uses).
    """

    def grow_scores(self, params: PyTree, grads: PyTree, key: jax.Array) -> PyTree:
        del params, key
        return jax.tree.map(jnp.abs, grads)
