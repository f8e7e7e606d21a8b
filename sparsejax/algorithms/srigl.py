"""SRigL: dynamic sparse training with constant fan-in and neuron ablation."""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sparsejax import masks, schedules
from sparsejax.algorithms.dst import SET

PyTree = Any

_ABLATION_FAN_INS = ("sparse", "dense")

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


def _natural_key(name: str) -> tuple:
    """Sort key that compares digit runs as numbers: 'Dense_10' sorts after 'Dense_9'."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)
    )


@dataclasses.dataclass(frozen=True)
class SRigL(SET):
    """SRigL: RigL whose every active neuron keeps the same number of incoming weights.

    Masks have *constant fan-in*: each active output neuron of a layer (a column
    of a Dense kernel ``(in, out)``, a filter of a convolution ``(..., in, out)``)
    has the same number k of live incoming weights, and an ablated neuron has
    none, a structure that a condensed dense kernel of width k runs fast. A
    layer's budget is its target count T (`target_counts`: the distribution's
    exact count). With A active neurons, k = floor(T / A), so the layer holds
    A * floor(T / A) weights, more than T - A and at most T; the count is formed
    from T at every update, never from the live weights, so it cannot drift
    down. Every ``update_every_steps`` steps until ``end_step``, with f(t) the
    cosine drop fraction of RigL and L the live weights of the layer:

    1. Salience (RigL's choice over the layer): the L - round(f(t) L) live
       weights of largest |w| and the round(f(t) L) others of largest |dL/dw|
       are *salient*.
    2. Neuron ablation: a neuron stays active when at least
       ceil(gamma_sal * k_ref) of its weights (at least one) are salient, with
       k_ref the layer's fan-in without ablation, floor(T / out)
       (``ablation_fan_in='sparse'``), or its dense fan-in
       (``ablation_fan_in='dense'``). Every neuron is judged at every update,
       so an ablated neuron whose gradients turn salient comes back. The
       ceil(T / fan_in) most salient neurons always stay (ties by position), so
       k never exceeds the fan-in and the budget fits, and no more than T stay.
       Layers named by ``no_ablation`` (by default the output layer) are never
       ablated.
    3. Constant fan-in RigL with k = floor(T / A): of the live weights of the
       active neurons, keep the A k - round(f(t) A k) of largest |w| across the
       layer, at most k in a neuron (dropping by magnitude over the layer, not
       per neuron); then every active neuron grows, by largest |dL/dw|, the
       weights it lacks to reach exactly k.

    Grown weights start at zero with reset optimizer slots and the ordinary step
    is skipped on update steps (as RigL). Initial masks are random with
    k = floor(T / out) for every neuron, at least one: a layer whose budget is
    below one weight a neuron holds one in each until its first update (the
    output layer, never ablated, keeps holding one in each).

    Reference: Lasby et al. 2024, "Dynamic Sparse Training with Structured
    Sparsity" (SRigL; gamma_sal = 0.3 in the paper, relative to the sparse
    fan-in in the authors' experiment configs; their code's default is the
    dense fan-in; they never ablate the output layer).

    Attributes:
      gamma_sal: ablation threshold, the fraction of k_ref a neuron must keep
        salient, in [0, 1]; 0 never ablates.
      ablation_fan_in: k_ref of the threshold: 'sparse' (the layer's constant
        fan-in without ablation) or 'dense' (its dense fan-in, stricter: at 90%
        sparsity and gamma_sal = 0.3 it keeps about the fewest neurons).
      no_ablation: substrings of leaf names (as ``keep_dense``, e.g. 'head')
        whose neurons are never ablated. None exempts the output layer, taken
        to be the last sparsified leaf in natural order of its name ('Dense_10'
        after 'Dense_9', 'output' after 'hidden_3'; see `ablation_exempt`):
        name the output layer when it is not last in that order (a ResNet's
        'head' sorts before its 'stem'). () lets every layer ablate neurons.
    """

    gamma_sal: float = 0.3
    ablation_fan_in: str = "sparse"
    no_ablation: Sequence[str] | None = None

    # Constant fan-in is a structure of its own.
    supports_structure = False

    def __post_init__(self):
        super().__post_init__()
        gamma = self.gamma_sal
        if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0 <= gamma <= 1:
            raise ValueError(f"gamma_sal must be in [0, 1], got gamma_sal={gamma!r}")
        if self.distribution == "global":
            raise ValueError("distribution='global' cannot keep a layer's fan-in constant")
        if self.ablation_fan_in not in _ABLATION_FAN_INS:
            raise ValueError(
                f"ablation_fan_in must be one of {_ABLATION_FAN_INS}, "
                f"got ablation_fan_in={self.ablation_fan_in!r}"
            )
        names = self.no_ablation
        if isinstance(names, str):
            names = (names,)
        if names is not None:
            if not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
                raise ValueError(
                    "no_ablation must be None or substrings of leaf names, got "
                    f"no_ablation={self.no_ablation!r}"
                )
            names = tuple(names)
        object.__setattr__(self, "no_ablation", names)

    def ablation_exempt(self, params: PyTree) -> PyTree:
        """Per sparsified leaf, whether its neurons are exempt from ablation (None elsewhere).

        With ``no_ablation=None``: only the last sparsified leaf in natural order
        of its 'layer/kernel' name (digit runs compared as numbers); otherwise the
        leaves whose name contains one of ``no_ablation``.
        """
        targets = self.target_counts(params)
        flat, treedef = jax.tree_util.tree_flatten_with_path(targets, is_leaf=masks.is_none)
        names = [masks.path_name(path) for path, _ in flat]
        sparsified = [n for n, (_, t) in zip(names, flat) if t is not None]
        if self.no_ablation is None:
            exempt = {max(sparsified, key=_natural_key)} if sparsified else set()
        else:
            exempt = {n for n in sparsified if any(k in n for k in self.no_ablation)}
        return jax.tree.unflatten(
            treedef, [None if t is None else n in exempt for n, (_, t) in zip(names, flat)]
        )

    def init_masks(self, params: PyTree, key: jax.Array) -> PyTree:
        targets = self.target_counts(params)
        leaves, treedef = jax.tree.flatten(targets, is_leaf=masks.is_none)
        keys = jax.random.split(key, max(len(leaves), 1))
        out = []
        for target, k, p in zip(leaves, keys, treedef.flatten_up_to(params)):
            if target is None:
                out.append(None)
                continue
            shape = jnp.shape(p)
            fan_in = math.prod(shape[:-1])
            per_neuron = max(1, min(fan_in, target // shape[-1]))
            scores = jax.random.uniform(k, (fan_in, shape[-1]))
            count = jnp.full((shape[-1],), per_neuron, jnp.int32)
            out.append(_per_neuron_topk(scores, count).reshape(shape))
        return jax.tree.unflatten(treedef, out)

    def grow_scores(self, params: PyTree, grads: PyTree, key: jax.Array) -> PyTree:
        del params, key
        return jax.tree.map(jnp.abs, grads)

    def _active_neurons(self, salient: jax.Array, target: int, fan_in: int) -> jax.Array:
        """bool[out]: the neurons that keep weights after this update (step 2)."""
        out = salient.shape[0]
        k_ref = fan_in if self.ablation_fan_in == "dense" else max(1, target // out)
        # Rounded first so that float noise (0.3 * 10 = 3.0000000000000004) does not add one.
        threshold = max(1, math.ceil(round(self.gamma_sal * k_ref, 9)))
        fewest = -(-target // fan_in)  # ceil(T / fan_in): the budget fits at dense fan-in
        active = (salient >= threshold) | masks.topk_mask_by_count(salient, fewest)
        if target < out:
            # No more neurons than weights, so that each active neuron has one.
            active &= masks.topk_mask_by_count(jnp.where(active, salient, -1), target)
        return active

    def update_masks(self, masks_tree, params, grads, step, key, algo_state=()):
        fraction = schedules.cosine_drop_fraction(self.drop_fraction, self.end_step)(step)
        grow = self.grow_scores(params, grads, key)
        targets = self.target_counts(params)
        exempt = self.ablation_exempt(params)

        def update_leaf(m, w, g, target, exempt_leaf):
            if m is None:
                return None
            shape = m.shape
            m2 = m.reshape(-1, shape[-1])
            fan_in, out = m2.shape
            w2 = jnp.abs(w).reshape(m2.shape)
            g2 = g.reshape(m2.shape)
            live = jnp.sum(m2, dtype=jnp.int32)
            # 1. RigL's salient set over the layer.
            n_drop = jnp.round(fraction * live).astype(jnp.int32)
            kept = masks.topk_mask_by_count(jnp.where(m2, w2, -jnp.inf), live - n_drop) & m2
            grown = masks.topk_mask_by_count(jnp.where(kept, -jnp.inf, g2), n_drop)
            # 2. Active neurons, judged afresh (an ablated neuron may come back).
            if exempt_leaf or self.gamma_sal == 0:
                active = jnp.ones((out,), bool)
            else:
                active = self._active_neurons(fan_in_counts(kept | grown), target, fan_in)
            n_active = jnp.sum(active, dtype=jnp.int32)
            k = jnp.maximum(target // n_active, 1)
            # 3. Drop by |w| across the layer (at most k a neuron), then grow each neuron to k.
            budget = n_active * k
            n_keep = budget - jnp.round(fraction * budget).astype(jnp.int32)
            candidates = m2 & active[None, :]
            capped = _per_neuron_topk(jnp.where(candidates, w2, -jnp.inf), jnp.full((out,), k))
            capped = capped & candidates
            keep = masks.topk_mask_by_count(jnp.where(capped, w2, -jnp.inf), n_keep) & capped
            need = jnp.where(active, k - fan_in_counts(keep), 0)
            regrown = _per_neuron_topk(jnp.where(keep, -jnp.inf, g2), need)
            return (keep | regrown).reshape(shape)

        return jax.tree.map(
            update_leaf, masks_tree, params, grow, targets, exempt, is_leaf=masks.is_none
        )
