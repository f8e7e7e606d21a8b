"""SRigL: dynamic sparse training with constant fan-in and neuron ablation."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax import masks, schedules
from sparsejax.algorithms.dst import SET

PyTree = Any

__all__ = ["SRigL", "fan_in_counts"]


def fan_in_counts(mask: jax.Array) -> jax.Array:
    """Live incoming weights of every neuron: the sum over all axes but the last (outputs).

    Args:
      mask: bool kernel mask ``(..., in, out)``.

    Returns:
      int32 ``[out]``.
    """
    return jnp.sum(mask.reshape(-1, mask.shape[-1]), axis=0, dtype=jnp.int32)


def _per_neuron_topk(scores: jax.Array, k: jax.Array) -> jax.Array:
    """Keeps the ``k[j]`` largest scores of every column j of a ``(fan_in, out)`` array."""
    order = jnp.argsort(-scores, axis=0, stable=True)
    ranks = jnp.argsort(order, axis=0, stable=True)
    return ranks < k[None, :]


@dataclasses.dataclass(frozen=True)
class SRigL(SET):
    """SRigL: RigL whose every neuron keeps the same number of incoming weights.

    Masks have *constant fan-in*: each output neuron of a layer (a column of a
    Dense kernel ``(in, out)``, a filter of a convolution ``(..., in, out)``)
    has the same number k of live incoming weights, a structure that a
    condensed dense kernel of width k can run fast. Every ``update_every_steps``
    steps until ``end_step``, with f(t) the cosine drop fraction of RigL:

    1. Salience (RigL's unstructured choice, per layer): with L live weights and
       D = round(f(t) L), the L - D live weights of largest |w| and the D missing
       ones of largest |dL/dw| are *salient*.
    2. Neuron ablation: an active neuron with fewer than ``gamma_sal * k``
       salient weights is removed entirely (at least one neuron stays), and the
       layer's budget L is spread over the remaining A neurons: k' = floor(L / A)
       (capped at the fan-in), so the layer density stays at its target up to
       that rounding.
    3. Per neuron, constant fan-in RigL: keep its k' - round(f(t) k') live weights
       of largest |w| and grow the rest, up to exactly k', by largest |dL/dw|.

    Grown weights start at zero with reset optimizer slots and the ordinary step
    is skipped on update steps (as RigL). Initial masks are random with the
    layer's constant fan-in k = round(density * fan_in).

    Reference: Lasby et al. 2024, "Dynamic Sparse Training with Structured
    Sparsity" (SRigL; gamma_sal = 0.3 in the paper).

    Attributes:
      gamma_sal: ablation threshold, the fraction of k a neuron must keep salient,
        in [0, 1]; 0 never ablates.
    """

    gamma_sal: float = 0.3

    # Constant fan-in is a structure of its own.
    supports_structure = False

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.gamma_sal, (int, float)) or not 0.0 <= self.gamma_sal <= 1.0:
            raise ValueError(f"gamma_sal must be in [0, 1], got gamma_sal={self.gamma_sal!r}")
        if self.distribution == "global":
            raise ValueError("distribution='global' cannot keep a layer's fan-in constant")

    def init_masks(self, params: PyTree, key: jax.Array) -> PyTree:
        sparsities = self.layer_sparsities(params)
        leaves, treedef = jax.tree.flatten(sparsities, is_leaf=masks.is_none)
        keys = jax.random.split(key, max(len(leaves), 1))
        out = []
        for s, k, p in zip(leaves, keys, treedef.flatten_up_to(params)):
            if s is None:
                out.append(None)
                continue
            shape = jnp.shape(p)
            fan_in = math.prod(shape[:-1])
            per_neuron = max(1, min(fan_in, round((1.0 - s) * fan_in)))
            scores = jax.random.uniform(k, (fan_in, shape[-1]))
            count = jnp.full((shape[-1],), per_neuron, jnp.int32)
            out.append(_per_neuron_topk(scores, count).reshape(shape))
        return jax.tree.unflatten(treedef, out)

    def grow_scores(self, params: PyTree, grads: PyTree, key: jax.Array) -> PyTree:
        del params, key
        return jax.tree.map(jnp.abs, grads)

    def update_masks(self, masks_tree, params, grads, step, key, algo_state=()):
        fraction = schedules.cosine_drop_fraction(self.drop_fraction, self.end_step)(step)
        grow = self.grow_scores(params, grads, key)

        def update_leaf(m, w, g):
            if m is None:
                return None
            shape = m.shape
            m2 = m.reshape(-1, shape[-1])
            w2 = jnp.abs(w).reshape(m2.shape)
            g2 = g.reshape(m2.shape)
            fan_in = m2.shape[0]
            live = jnp.sum(m2, dtype=jnp.int32)
            # 1. RigL's salient set over the layer.
            n_drop = jnp.round(fraction * live).astype(jnp.int32)
            kept = masks.topk_mask_by_count(jnp.where(m2, w2, -jnp.inf), live - n_drop)
            grown = masks.topk_mask_by_count(jnp.where(kept, -jnp.inf, g2), n_drop)
            salient = fan_in_counts(kept | grown)
            # 2. Ablate neurons with too few salient weights (keep the best one at least).
            counts = fan_in_counts(m2)
            active = counts > 0
            k_now = jnp.max(counts)
            keep_neuron = active & (salient >= self.gamma_sal * k_now)
            best = jnp.argmax(jnp.where(active, salient, -1))
            keep_neuron = keep_neuron.at[best].set(True)
            n_active = jnp.sum(keep_neuron, dtype=jnp.int32)
            k_new = jnp.minimum(live // n_active, fan_in)
            # 3. Constant fan-in RigL inside every kept neuron.
            n_regrow = jnp.round(fraction * k_new).astype(jnp.int32)
            k_keep = jnp.where(keep_neuron, k_new - n_regrow, 0)
            keep = _per_neuron_topk(jnp.where(m2, w2, -jnp.inf), k_keep) & m2
            # After an ablation k grows: a neuron then keeps what it has and grows the rest.
            k_grow = jnp.where(keep_neuron, k_new - fan_in_counts(keep), 0)
            regrown = _per_neuron_topk(jnp.where(keep, -jnp.inf, jnp.abs(g2)), k_grow)
            return (keep | regrown).reshape(shape)

        return jax.tree.map(update_leaf, masks_tree, params, grow, is_leaf=masks.is_none)
