"""Sparse momentum (SNFS): prune by magnitude, regrow by momentum, redistribute across layers."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax import masks, schedules
from sparsejax.algorithms.base import SparseAlgorithm

PyTree = Any

__all__ = ["SNFS"]


@dataclasses.dataclass(frozen=True)
class SNFS(SparseAlgorithm):
    """Sparse Networks from Scratch: momentum-guided regrowth and layer redistribution.

    The algorithm keeps M_t = β M_{t-1} + (1 - β) g_t, an exponentially smoothed
    dense gradient, for every sparsified weight. Every ΔT steps until T_end:

    1. each layer i removes p_t of its live weights, those of smallest |w|
       (p_t = ``prune_rate`` decayed by a cosine to 0 at T_end), K removals in all;
    2. layer i gets the share c_i = m_i / Σ_j m_j of the K regrowths, m_i the
       mean |M| over its live weights, so layers whose weights are still moving
       get more capacity (capped by the room a layer has; the rest is handed
       on, so exactly K weights regrow and the total stays constant);
    3. each layer regrows its share at the missing weights with the largest |M|.
    Regrown weights start at zero with zeroed optimizer slots.

    Reference: Dettmers & Zettlemoyer 2019, "Sparse Networks from Scratch:
    Faster Training without Losing Performance" (β = 0.9, prune rate 0.5 with
    cosine decay).

    Attributes:
      momentum: β in [0, 1).
      prune_rate: p_0 in [0, 1].
      update_every_steps: ΔT.
      end_step: T_end.
    """

    momentum: float = 0.9
    prune_rate: float = 0.5
    update_every_steps: int = 100
    end_step: int = 1000

    updates_masks = True
    reset_grown_moments = True
    # Redistribution moves single weights between layers.
    supports_structure = False

    def __post_init__(self):
        super().__post_init__()
        # Both are checked here so the messages name these fields: prune_rate goes on to
        # the drop-fraction schedule, whose own argument is called initial_fraction.
        momentum, rate = self.momentum, self.prune_rate
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
            raise ValueError(f"prune_rate must be a number in [0, 1], got {rate!r}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"prune_rate must be in [0, 1], got {rate!r}")
        schedules.periodic(self.update_every_steps, self.end_step)
        schedules.cosine_drop_fraction(rate, self.end_step)

    def init_masks(self, params: PyTree, key: jax.Array) -> PyTree:
        return self.random_masks(params, key)

    def init_state(self, params: PyTree) -> PyTree:
        return jax.tree.map(jnp.zeros_like, params)

    def update_state(self, state, params, grads, step):
        del params, step
        b = self.momentum
        return jax.tree.map(lambda m, g: b * m + (1.0 - b) * g, state, grads)

    def is_update_step(self, step: jax.Array) -> jax.Array:
        return schedules.periodic(self.update_every_steps, self.end_step)(step)

    def update_masks(self, masks_tree, params, grads, step, key, algo_state=()):
        rate = schedules.cosine_drop_fraction(self.prune_rate, self.end_step)(step)
        leaves, treedef = jax.tree.flatten(masks_tree, is_leaf=masks.is_none)
        weights = treedef.flatten_up_to(params)
        momenta = treedef.flatten_up_to(algo_state)
        idx = [i for i, m in enumerate(leaves) if m is not None]
        if not idx:
            return masks_tree

        keeps, mean_mom, n_prune, room = {}, {}, {}, {}
        for i in idx:
            m, w, mom = leaves[i], weights[i], jnp.abs(momenta[i])
            live = jnp.sum(m, dtype=jnp.int32)
            n_prune[i] = jnp.round(rate * live).astype(jnp.int32)
            keeps[i] = masks.topk_mask_by_count(
                jnp.where(m, jnp.abs(w), -jnp.inf), live - n_prune[i]
            )
            mean_mom[i] = jnp.sum(jnp.where(m, mom, 0.0)) / jnp.maximum(live, 1)
            room[i] = m.size - (live - n_prune[i])
        total = sum(n_prune.values())
        norm = sum(mean_mom.values())
        even = 1.0 / len(idx)
        grow = {}
        for i in idx:
            share = jnp.where(norm > 0, mean_mom[i] / jnp.where(norm > 0, norm, 1.0), even)
            grow[i] = jnp.minimum(jnp.floor(share * total).astype(jnp.int32), room[i])
        # Hand the rounding remainder (and anything a full layer could not take)
        # to the layers with room, in order, so exactly `total` weights regrow.
        leftover = total - sum(grow.values())
        for i in idx:
            extra = jnp.clip(leftover, 0, room[i] - grow[i])
            grow[i] = grow[i] + extra
            leftover = leftover - extra

        out = list(leaves)
        for i in idx:
            candidates = jnp.where(keeps[i], -jnp.inf, jnp.abs(momenta[i]))
            out[i] = keeps[i] | masks.topk_mask_by_count(candidates, grow[i])
        return jax.tree.unflatten(treedef, out)
